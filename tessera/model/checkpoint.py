"""The checkpoint directory, all of it: its on-disk format, the atomic save, the load of its weights (any
TP/PP layout), finding it (``latest``) and rotating old ones. What a training run adds inside it (optimizer,
scheduler, RNG, data position) and resume: tessera.pretrain.checkpointing; SIGTERM: tessera.pretrain.preemption.

Layout of one checkpoint ``CKPT/``::

    tessera.json   {"format": 1, "step": N, "model_config": {...}}
    config.yaml    the run config; the model saved is its ``resolved: model:`` section (a training run: the
                   request and what the run resolved, kept apart) or else its ``model:`` section
    vocab.json     the unified Vocabulary (optional)
    dist/          megatron dist_checkpointing save of {"model": model.sharded_state_dict(), ...} (a training
                   run's keys beside "model": tessera.pretrain.checkpointing)

A run directory holds ``RUN/checkpoints/step_0000100/`` and ``RUN/checkpoints/latest`` (the dir name).

An adapter checkpoint (a LoRA run, tessera.model.lora) holds only the adapters in ``dist/`` (``part=
"adapters"``); its tessera.json adds ``"lora": {rank, alpha, dropout, targets}`` and ``"base": {path,
sha256, step}``: the checkpoint whose weights the adapters adapt, with a digest of its files
(``checkpoint_sha256``) so a changed or different base is refused instead of silently used.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from tessera.config import to_dict
from tessera.model.config import ModelConfig
from tessera.utils import atomic_write_text, rank, swap_in_dir, world_size

FORMAT = 1
META_FILE = "tessera.json"
CONFIG_FILE = "config.yaml"
VOCAB_FILE = "vocab.json"
DIST_DIR = "dist"
LATEST_FILE = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint path is missing, incomplete or of an unknown format; the message names the path."""


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


PARTS = ("all", "base", "adapters")


def _select_part(sd: dict, part: str) -> dict:
    """The base weights (everything but LoRA factors) or only the LoRA factors of a sharded state dict."""
    from tessera.model.lora import is_adapter_key

    if part == "all":
        return sd
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    keep_adapters = part == "adapters"
    return {k: v for k, v in sd.items() if is_adapter_key(k) == keep_adapters}


def model_sharded_state_dict(model: Any, part: str = "all") -> dict:
    """``{"model": ...}`` for a GPTModel (or a DDP/Float16Module wrapper, or a list of virtual-pipeline chunks).

    ``part``: ``all``, ``base`` (without LoRA factors: what a base checkpoint holds) or ``adapters`` (only
    the LoRA factors: what an adapter checkpoint holds).

    The same dict serves saves and load requests, so a checkpoint written by one layer implementation
    (megatron's local layers, Transformer Engine) loads into the other: the weights share their names
    (the local spec's ``sharded_state_dict_keys_map``), and so do the linears' ``_extra_state`` entries;
    the norms' entries, which only TE has, are kept out (``localize_norm_extra_states``)."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    # wrappers forward sharded_state_dict to the GPTModel
    sds = [_select_part(localize_norm_extra_states(c.sharded_state_dict()), part) for c in chunks]
    if len(sds) == 1:
        return {"model": sds[0]}
    # ShardedTensor keys are global (layer offsets included), so the nesting here does not affect loading.
    return {"model": {f"chunk{i}": sd for i, sd in enumerate(sds)}}


def _holds_state(data: Any) -> bool:
    # an empty tensor is what Transformer Engine reports unless it trains in fp8
    return not (data is None or (isinstance(data, torch.Tensor) and data.numel() == 0))


def localize_norm_extra_states(sharded_state_dict: dict) -> dict:
    """Each empty ``_extra_state`` ShardedObject of a norm becomes a LocalNonpersistentObject: not written
    by a save, not requested by a load (which hands the module its own value back), as Megatron-LM's
    ``--ckpt-drop-redundant-extra-state`` does. Transformer Engine's norms (``decoder.final_layernorm``,
    the Swin ``post_*_layernorm``) carry one and torch's norms do not, so without this a TE model asks a
    local checkpoint for keys it lacks. The linears keep theirs: megatron's local linears save a None
    ``_extra_state`` where TE saves its own, so both layouts hold those keys. An entry with content
    (TE fp8 scaling state) is kept."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedObject

    def localize(value):
        if (isinstance(value, ShardedObject) and value.key.endswith("layernorm._extra_state")
                and not _holds_state(value.data)):
            return LocalNonpersistentObject(value.data)
        return value

    return dict_list_map_inplace(localize, sharded_state_dict)


def checkpoint_sha256(ckpt_dir: str | Path) -> str:
    """SHA-256 over a checkpoint's files (tessera.json, config.yaml, vocab.json and everything in dist/,
    names and bytes, in sorted order): what an adapter checkpoint records of its base. Reads every byte
    (a 7B bf16 checkpoint: ~14 GB, seconds to a minute depending on the disk)."""
    import hashlib

    ckpt_dir = Path(ckpt_dir)
    files = [ckpt_dir / n for n in (META_FILE, CONFIG_FILE, VOCAB_FILE) if (ckpt_dir / n).is_file()]
    files += sorted(p for p in (ckpt_dir / DIST_DIR).rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.relative_to(ckpt_dir)}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:  # hashlib.file_digest is Python >= 3.11
            for block in iter(lambda: fh.read(1 << 23), b""):
                digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class BaseReference:
    """The base checkpoint of an adapter checkpoint: where it was, its ``checkpoint_sha256`` and step."""

    path: str
    sha256: str
    step: int

    @classmethod
    def of(cls, ckpt: str | Path) -> BaseReference:
        path = resolve_checkpoint(ckpt)
        return cls(str(path.resolve()), checkpoint_sha256(path), int(read_checkpoint_meta(path).get("step", 0)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_meta(cls, meta: dict, where: Path | str) -> BaseReference:
        base = meta.get("base")
        if not isinstance(base, dict) or not {"path", "sha256"} <= set(base):
            raise CheckpointError(f"{where}: an adapter checkpoint without its base reference ('base' in {META_FILE})")
        return cls(str(base["path"]), str(base["sha256"]), int(base.get("step", 0)))

    def check(self, ckpt: str | Path, where: str) -> Path:
        """``ckpt`` resolved, after checking that its files are the recorded base's (CheckpointError if not)."""
        path = resolve_checkpoint(ckpt)
        got = checkpoint_sha256(path)
        if got != self.sha256:
            raise CheckpointError(f"{where}: its adapters were trained on base {self.path} (sha256 {self.sha256[:16]}…, "
                                  f"step {self.step}) but {path} has sha256 {got[:16]}…: not the same base checkpoint")
        return path


def adapter_meta(meta: dict) -> dict | None:
    """The ``lora`` entry of a checkpoint's tessera.json (None: a full-model checkpoint)."""
    lora = meta.get("lora")
    return lora if isinstance(lora, dict) else None


def _shared_tmp_name(ckpt_dir: Path) -> Path:
    """Every rank must write into the same temporary directory: rank 0's pid names it."""
    pid = [os.getpid()]
    if world_size() > 1:
        dist.broadcast_object_list(pid, src=0)
    return ckpt_dir.with_name(f"{ckpt_dir.name}.tmp-{pid[0]}")


def _use_in_process_results_queue() -> None:
    """megatron's checkpoint writer collects write results through a queue made by a *spawned*
    ``multiprocessing.Manager``: one more Python process per trainer (slow to start at the first save:
    docs/benchmarks.md) that outlives a SIGKILLed trainer and keeps its stdout open. Our saves are synchronous
    (``execute_sync``): the results are put and read by this very process, so a plain thread-safe queue
    does the same job. (An mp.Queue would not: its put is asynchronous and megatron reads with
    get_nowait. megatron's async save, which ships the queue to a spawned worker, is unused here.)"""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "absent") is None:
        filesystem_async._results_queue = queue.Queue()


def save_model_checkpoint(
    model: Any,
    model_cfg: ModelConfig,
    ckpt_dir: str | Path,
    vocab: Any = None,
    extra_config: Any = None,
    step: int = 0,
    extra_state: dict | None = None,
    extra_meta: dict | None = None,
    before_commit: Callable[[Path], None] | None = None,
    save_strategy: Any = None,
    part: str = "all",
) -> Path:
    """Save ``model`` (collective: every rank of the layout calls it) to ``ckpt_dir``.

    Everything is written to ``ckpt_dir.tmp-<pid>`` and renamed at the end, so a crash never leaves a
    directory that looks complete. ``extra_config`` is the run config (dataclass or dict); its ``model``
    section is replaced by ``model_cfg`` unless it has a ``resolved`` section (a training run's config: the
    request stays as asked and ``resolved.model`` names the model saved). ``extra_state`` (optimizer, scheduler, rng, ...)
    goes into the same dist_checkpointing save under its own keys. ``extra_meta`` adds keys to
    tessera.json. ``before_commit(tmp_dir)`` runs on rank 0 after everything is written, before the
    rename (crash-consistency tests kill the process there). ``save_strategy``: a dist_checkpointing save
    strategy (e.g. megatron's fully parallel wrapper); None = the default one. ``part``: which weights
    (``model_sharded_state_dict``): ``adapters`` writes an adapter checkpoint (pass its ``lora`` and
    ``base`` entries in ``extra_meta``).
    """
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    tmp = _shared_tmp_name(ckpt_dir)
    if rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / DIST_DIR).mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()
    state = model_sharded_state_dict(model, part)
    if extra_state:
        clash = set(extra_state) & set(state)
        if clash:
            raise CheckpointError(f"extra_state keys {sorted(clash)} clash with the model's")
        state.update(extra_state)
    _use_in_process_results_queue()
    dist_checkpointing.save(state, str(tmp / DIST_DIR), save_strategy)
    if rank() == 0:
        run_cfg = extra_config
        if dataclasses.is_dataclass(run_cfg) and not isinstance(run_cfg, type):
            run_cfg = to_dict(run_cfg)
        run_cfg = dict(run_cfg or {})
        if "resolved" not in run_cfg:
            run_cfg["model"] = to_dict(model_cfg)
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(run_cfg, sort_keys=False))
        if vocab is not None:
            vocab.save(tmp / VOCAB_FILE)
        meta = {"format": FORMAT, "step": int(step), "model_config": to_dict(model_cfg), **(extra_meta or {})}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))  # written last: marks the save complete
        if before_commit is not None:
            before_commit(tmp)
        swap_in_dir(tmp, ckpt_dir)
    if dist.is_initialized():
        dist.barrier()
    return ckpt_dir


# ---- load --------------------------------------------------------------------------------------
def load_sharded(ckpt_dir: str | Path, sharded_state: dict, strategy: Any = None) -> dict:
    """``dist_checkpointing.load`` of ``ckpt_dir/dist`` into the request ``sharded_state`` (the model's from
    ``model_sharded_state_dict``, plus whatever a training run saved beside it); collective. ``strategy``: a
    dist_checkpointing load strategy (e.g. megatron's fully parallel wrapper); None = the default one. Any
    failure is a CheckpointError naming the directory."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    dist_dir = Path(ckpt_dir) / DIST_DIR
    if not dist_dir.is_dir():
        raise CheckpointError(f"{dist_dir}: missing (incomplete checkpoint)")
    try:
        return dist_checkpointing.load(sharded_state, str(dist_dir), strategy)
    except CheckpointError:
        raise
    # megatron raises several types for missing / mismatched entries; torch.distributed.checkpoint's
    # CheckpointException is a BaseException
    except (Exception, CheckpointException) as exc:
        raise CheckpointError(f"{dist_dir}: cannot load: {exc}") from exc


def load_model_state(model: Any, state: dict, part: str = "all") -> None:
    """Copy the loaded ``state["model"]`` into ``model`` (a module or a list of virtual-pipeline chunks);
    ``part`` (``base`` / ``adapters``) loads a subset, and every key of that subset must be there (the
    other part is left as it is)."""
    from tessera.model.lora import is_adapter_key

    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    states = [state] if len(chunks) == 1 else [state[f"chunk{i}"] for i in range(len(chunks))]
    for c, st in zip(chunks, states, strict=True):  # virtual pipeline: nested under chunk{i}
        if part == "all":
            c.load_state_dict(st)
            continue
        res = c.load_state_dict(st, strict=False)
        missing = [k for k in res.missing_keys if is_adapter_key(k) == (part == "adapters")
                   and not k.endswith("_extra_state")]
        if missing or res.unexpected_keys:
            raise CheckpointError(f"loading the {part}: missing {missing[:4]}, unexpected {res.unexpected_keys[:4]}")


# ---- locate, latest, rotation --------------------------------------------------------------------
def write_latest(checkpoints_dir: str | Path, ckpt_name: str) -> None:
    """Point ``checkpoints_dir/latest`` at ``ckpt_name`` (atomic replace)."""
    atomic_write_text(Path(checkpoints_dir) / LATEST_FILE, ckpt_name + "\n")


def _is_checkpoint(path: Path) -> bool:
    return (path / META_FILE).is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir itself, or a run dir / its ``checkpoints`` dir resolved through ``latest``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    if _is_checkpoint(path):
        return path
    for checkpoints in (path, path / "checkpoints"):
        latest = checkpoints / LATEST_FILE
        if latest.is_file():
            name = latest.read_text().strip()
            target = checkpoints / name
            if not name or not _is_checkpoint(target):
                raise CheckpointError(f"{latest}: points at {name!r}, which is not a complete checkpoint ({META_FILE} missing)")
            return target
    raise CheckpointError(
        f"{path}: not a checkpoint (no {META_FILE}) and no checkpoints/{LATEST_FILE} or {LATEST_FILE} file to follow"
    )


_STEP_DIR = re.compile(r"^step_(\d+)$")


def latest_checkpoint(run: str | Path) -> Path | None:
    """The checkpoint ``RUN/checkpoints/latest`` names, None when there is no ``latest`` file."""
    if not (Path(run) / "checkpoints" / LATEST_FILE).is_file():
        return None
    return resolve_checkpoint(Path(run) / "checkpoints")  # raises if latest names an incomplete dir


def _checkpoint_steps(checkpoints: Path) -> list[tuple[int, Path]]:
    out = []
    for p in checkpoints.iterdir() if checkpoints.is_dir() else []:
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def rotate_checkpoints(checkpoints: str | Path, keep_last_n: int) -> list[Path]:
    """Delete all but the newest ``keep_last_n`` complete step dirs (0 = keep all), never the one ``latest``
    names, and any leftover ``*.tmp-*`` / ``*.old-*`` dirs of killed saves. Call after ``latest`` is written.
    Returns what was removed."""
    checkpoints = Path(checkpoints)
    latest = checkpoints / LATEST_FILE
    keep = {latest.read_text().strip()} if latest.is_file() else set()
    removed = []
    complete = [p for _, p in _checkpoint_steps(checkpoints) if (p / META_FILE).is_file()]
    if keep_last_n > 0:
        removed += [p for p in complete[:-keep_last_n] if p.name not in keep]
    removed += [p for p in checkpoints.iterdir() if p.is_dir() and (".tmp-" in p.name or ".old-" in p.name)]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def read_checkpoint_meta(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint metadata: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r} is not supported (expected {FORMAT})")
    return meta


def read_model_config(ckpt_dir: str | Path) -> ModelConfig:
    """The ModelConfig of the model saved: ``config.yaml``'s ``resolved: model:`` section (training runs),
    else its ``model:`` section."""
    from tessera.config import ConfigError, from_dict

    path = Path(ckpt_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    data = yaml.safe_load(path.read_text()) or {}
    resolved = data.get("resolved") if isinstance(data, dict) else None
    if isinstance(resolved, dict) and isinstance(resolved.get("model"), dict):
        section, where = resolved["model"], "resolved: model"
    elif isinstance(data, dict) and isinstance(data.get("model"), dict):
        section, where = data["model"], "model"
    else:
        raise CheckpointError(f"{path}: no 'model:' section")
    try:
        return from_dict(ModelConfig, section, f"{path}: {where}")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from exc
