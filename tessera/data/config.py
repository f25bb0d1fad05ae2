"""``DataConfig``: the training batch stream, the ``data:`` section of a ``tessera train`` config (also
readable on its own by ``tessera data report`` / ``bench``).

One config for the trainer and the data tools::

    data:
      sources:                                   # a blend of pretokenized directories
        - {name: text, path: data/tok_text, weight: 0.7}
        - {name: interleaved, path: data/tok_interleaved, weight: 0.3}
      blend:                                     # optional: weights that change with the step
        ramp: linear                             # linear | cosine | step
        knots:
          - {step: 0,    weights: {text: 0.9, interleaved: 0.1}}
          - {step: 2000, weights: {text: 0.3, interleaved: 0.7}}
      eval_sources:                              # held-out sets, each evaluated and reported on its own
        - {name: text, path: data/heldout_text}
      seq_length: 2048
      seed: 1234
      document_mask: false

``data.path`` is the one-source shorthand (the source is named ``train``), ``data.eval_path`` the one
held-out set (named ``heldout``). ``weave`` (the blend's earlier name), ``sources`` as a ``{name: path}``
mapping and ``weights`` left empty are read for one more release (``normalize_data_section``).
Batch sizes are the training config's ``parallel.global_batch_size`` / ``micro_batch_size``.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tessera.config import ConfigError, from_dict, read_yaml_mapping
from tessera.data.blend import BlendError, BlendKnot, BlendSchedule

if TYPE_CHECKING:  # the batch stream (megatron's datasets) is imported when it is opened, not with the config
    from tessera.data.batches import BlendedBatchIterator, PackedSource, PackingConfig

TRAIN_NAME, HELDOUT_NAME = "train", "heldout"  # the names data.path / data.eval_path give their one source
# source names become metric keys and TensorBoard tags (``ce/NAME``): keep them to one plain word
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class DataSource:
    path: str = ""  # a directory written by `tessera data pretokenize`
    weight: float | None = None  # share in the blend (normalised); None: 1, or the blend's knots decide
    name: str = ""  # default: the directory's name


@dataclass
class BlendConfig:
    knots: list[BlendKnot] = field(default_factory=list)  # empty: the sources' weights, constant
    ramp: Literal["linear", "cosine", "step"] = "cosine"


@dataclass
class DataConfig:
    path: str = ""  # one source (named "train"): shorthand for sources: [{path: PATH}]
    sources: list[DataSource] = field(default_factory=list)
    blend: BlendConfig = field(default_factory=BlendConfig)
    eval_path: str = ""  # one held-out set (named "heldout"): shorthand for eval_sources: [{path: PATH}]
    eval_sources: list[DataSource] = field(default_factory=list)
    seq_length: int = 64
    seed: int = 1234  # the blend's draws and megatron's document / sample shuffle
    # attention stops at document boundaries, positions restart (THD packing: docs/finetuning.md)
    document_mask: bool = False
    eod_mask_loss: bool = False  # megatron's: no loss on the token after <eos>
    # megatron's <eos>-based masks, for the data tools (the trainer passes no attention mask: use document_mask)
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    create_attention_mask: bool = False
    cache_dir: str | None = None  # megatron's index caches; default: DATASET/cache

    # ---- the sources, resolved and checked ---------------------------------------------------------
    def train_sources(self) -> list[DataSource]:
        """The blend's sources with names and weights filled in; [] when the config names none (the
        trainer then uses the mock dataset). Raises ``ConfigError`` naming the field."""
        if self.path and self.sources:
            raise ConfigError("data.path and data.sources: give one (data.path is the one-source shorthand)")
        if self.path:
            return [DataSource(self.path, 1.0, TRAIN_NAME)]
        out = _resolve("data.sources", self.sources)
        weighted = [i for i, s in enumerate(self.sources) if s.weight is not None]
        if self.blend.knots and weighted:
            raise ConfigError(f"data.sources[{weighted[0]}].weight: give the weights either per source or in "
                              "data.blend.knots, not both")
        for i, s in enumerate(out):
            w = 1.0 if s.weight is None else s.weight
            if not math.isfinite(w) or w < 0:
                raise ConfigError(f"data.sources[{i}].weight: {w} is not a finite number >= 0")
            s.weight = w
        if out and not self.blend.knots and sum(s.weight for s in out) <= 0:
            raise ConfigError("data.sources: every weight is 0")
        return out

    def held_out_sources(self) -> list[DataSource]:
        """The held-out sets (names filled in), each evaluated on its own; [] when there are none."""
        if self.eval_path and self.eval_sources:
            raise ConfigError("data.eval_path and data.eval_sources: give one (data.eval_path is the one-set "
                              "shorthand)")
        if self.eval_path:
            return [DataSource(self.eval_path, None, HELDOUT_NAME)]
        for i, s in enumerate(self.eval_sources):
            if s.weight is not None:
                raise ConfigError(f"data.eval_sources[{i}].weight: held-out sets are evaluated one by one, "
                                  "they have no weight")
        return _resolve("data.eval_sources", self.eval_sources)

    def schedule(self) -> BlendSchedule:
        """The blend over ``train_sources()``: the knots when given, else the sources' weights, constant."""
        sources = self.train_sources()
        if not sources:
            raise ConfigError("data.sources: no sources (give data.path or data.sources)")
        knots = self.blend.knots or [BlendKnot(0, {s.name: float(s.weight) for s in sources})]
        try:
            return BlendSchedule([s.name for s in sources], knots, self.blend.ramp)
        except BlendError as exc:
            raise ConfigError(f"data.{exc}") from exc

    def validate(self) -> None:
        """Every check that needs no file (``ConfigError`` naming the field)."""
        if self.seq_length < 1:
            raise ConfigError(f"data.seq_length must be >= 1, got {self.seq_length}")
        if self.train_sources():
            self.schedule()
        elif self.blend.knots:
            raise ConfigError("data.blend: knots without data.sources")
        self.held_out_sources()
        if self.document_mask and (self.reset_attention_mask or self.create_attention_mask):
            raise ConfigError("data.document_mask: the document boundaries already mask attention; turn "
                              "data.reset_attention_mask and data.create_attention_mask off")

    # ---- opening them -------------------------------------------------------------------------------
    def vocabulary(self):
        """The training data's vocabulary: the first source's (the iterator checks that the others share it)."""
        from tessera.tokenizers.vocab import Vocabulary, VocabularyError

        sources = self.train_sources()
        if not sources:
            raise ConfigError("data.sources: no sources (give data.path or data.sources)")
        try:
            return Vocabulary.load(sources[0].path)
        except VocabularyError as exc:
            raise ConfigError(f"{'data.path' if self.path else 'data.sources[0].path'}: {exc}") from exc

    def packing(self) -> PackingConfig:
        from tessera.data.batches import PackingConfig

        return PackingConfig(
            seq_length=self.seq_length,
            reset_position_ids=self.reset_position_ids,
            reset_attention_mask=self.reset_attention_mask,
            eod_mask_loss=self.eod_mask_loss,
            create_attention_mask=self.create_attention_mask,
            document_mask=self.document_mask,
            shuffle_seed=self.seed,
            cache_dir=self.cache_dir,
        )

    def open_sources(self, num_samples: int | None = None, held_out: bool = False) -> dict[str, PackedSource]:
        """name -> PackedSource of the blend's (or the held-out) sources. ``num_samples``: samples each
        source indexes (None: one epoch, read again in the same order when used up)."""
        from tessera.data.batches import BatchError, PackedSource
        from tessera.data.pretokenize import PretokenizeError
        from tessera.tokenizers.vocab import VocabularyError

        field_name = "data.eval_sources" if held_out else "data.sources"
        sources = self.held_out_sources() if held_out else self.train_sources()
        out = {}
        for i, s in enumerate(sources):
            where = ("data.eval_path" if self.eval_path else f"{field_name}[{i}].path") if held_out else \
                ("data.path" if self.path else f"{field_name}[{i}].path")
            if not Path(s.path).is_dir():
                raise ConfigError(f"{where}: {s.path} is not a directory (a `tessera data pretokenize` output)")
            try:
                out[s.name] = PackedSource(s.path, self.packing(), num_samples, name=s.name)
            except (BatchError, PretokenizeError, VocabularyError, FileNotFoundError) as exc:
                raise ConfigError(f"{where}: {exc}") from exc
        return out

    def iterator(self, global_batch: int, micro_batch: int, dp_rank: int = 0, dp_size: int = 1,
                 start_step: int = 0, num_samples: int | None = None) -> BlendedBatchIterator:
        """This rank's micro-batches of the blended stream (``tessera.data.batches``)."""
        from tessera.data.batches import BatchError, BlendedBatchIterator

        sources = self.open_sources(num_samples)
        try:
            return BlendedBatchIterator(sources, self.schedule(), global_batch, micro_batch, dp_rank, dp_size,
                                        self.seed, start_step)
        except BatchError as exc:  # e.g. sources pretokenized with different tokenizers
            raise ConfigError(f"data: {exc}") from exc


def held_out_iterator(source: PackedSource, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                      seed: int) -> BlendedBatchIterator:
    """One held-out set read from its start (the same batches at every evaluation)."""
    from tessera.data.batches import BlendedBatchIterator

    return BlendedBatchIterator({source.name: source}, BlendSchedule.constant({source.name: 1.0}), global_batch,
                                micro_batch, dp_rank, dp_size, seed)


def _resolve(field_name: str, sources: list[DataSource]) -> list[DataSource]:
    out, seen = [], {}
    for i, s in enumerate(sources):
        if not s.path:
            raise ConfigError(f"{field_name}[{i}].path: missing (a `tessera data pretokenize` directory)")
        name = s.name or Path(s.path.rstrip("/")).name
        if not _NAME.match(name):
            raise ConfigError(f"{field_name}[{i}].name: {name!r} must be one word of letters, digits, '_', '-' "
                              "or '.' (it names metrics)")
        if name in seen:
            raise ConfigError(f"{field_name}[{i}].name: {name!r} is also {field_name}[{seen[name]}]'s name; "
                              "give each source its own name")
        seen[name] = i
        out.append(DataSource(s.path, s.weight, name))
    return out


# ---- the earlier spellings, read for one more release ------------------------------------------------
_MOVED = {
    "global_batch": "parallel.global_batch_size of the training config (the data tools: --global-batch)",
    "micro_batch": "parallel.micro_batch_size of the training config (the data tools: --micro-batch)",
    "shuffle_seed": "data.seed (it seeds megatron's shuffle and the blend's draws)",
    "train_steps": "nothing: each source indexes one epoch and reads it again when used up",
}


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated and will be removed in the next release: {new}", FutureWarning, stacklevel=3)


def normalize_data_section(raw: Any, where: str) -> dict:
    """A ``data:`` mapping as ``DataConfig`` reads it: ``weave`` -> ``blend`` (a ``{ramp, knots}`` mapping, or a
    list of knots), ``sources: {name: path}`` -> a list, empty ``weights`` dropped (a saved run config holds
    them); what moved elsewhere is refused with a line saying where."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: data: expected a mapping, got {raw!r}")
    d = dict(raw)
    if "weave" in d:
        weave = d.pop("weave")
        if weave:
            if "blend" in d:
                raise ConfigError(f"{where}: data.weave and data.blend: give data.blend only (weave is its old name)")
            _deprecated("data.weave", "use data.blend (same fields: ramp, knots)")
            d["blend"] = {"knots": weave} if isinstance(weave, list) else weave
    weights = d.pop("weights", None)
    if weights:
        raise ConfigError(f"{where}: data.weights: give each source's weight in data.sources "
                          "([{path: DIR, weight: W, name: NAME}, ...])")
    for key in ("sources", "eval_sources"):
        if isinstance(d.get(key), dict):
            _deprecated(f"data.{key} as a name: path mapping", f"use a list: data.{key}: [{{name: N, path: P}}, ...]")
            d[key] = [{"name": str(n), "path": p} for n, p in d[key].items()]
    for key, new in _MOVED.items():
        if key in d:
            raise ConfigError(f"{where}: data.{key} is not a data setting: see {new}")
    return d


def rename_weave_override(key: str, prefix: str = "data.") -> str:
    """``--data.weave.ramp`` -> ``data.blend.ramp`` (the old name, for one more release)."""
    old = prefix + "weave"
    if key == old or key.startswith(old + "."):
        _deprecated(f"--{old}", f"use --{prefix}blend")
        return prefix + "blend" + key[len(old):]
    return key


def load_data_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DataConfig:
    """A ``DataConfig`` from a ``tessera train`` config (its ``data:`` section) or a file holding only that
    section, plus ``--key value`` overrides of its fields; validated."""
    from tessera.config import apply_overrides, parse_overrides

    source = str(path) if path is not None else "<defaults>"
    raw = read_yaml_mapping(path) if path is not None else {}
    section = raw.get("data") if isinstance(raw.get("data"), dict) else raw
    data = normalize_data_section(section, source)
    ov = {rename_weave_override(k, ""): v for k, v in parse_overrides(overrides or []).items()}
    data = apply_overrides(data, DataConfig, ov)
    cfg = from_dict(DataConfig, data, source)
    try:
        cfg.validate()
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    return cfg


def batch_sizes(path: str | Path | None) -> tuple[int | None, int | None]:
    """(global, micro) batch size a ``tessera train`` config's ``parallel`` section sets (None where it sets
    none, and for a file holding only a data section)."""
    raw = read_yaml_mapping(path) if path is not None else {}
    par = raw.get("parallel") if isinstance(raw.get("data"), dict) else None
    par = par if isinstance(par, dict) else {}
    return par.get("global_batch_size"), par.get("micro_batch_size")
