"""``tessera convert from-hf / from-meta / to-hf``: Chameleon checkpoints in and out.

An imported checkpoint is an ordinary Tessera checkpoint plus what the way back needs::

    CKPT/{tessera.json, config.yaml, vocab.json, dist/}   written by tessera.model (any TP/PP on load)
    CKPT/hf_id_map.json       Tessera id -> Chameleon id (the vocabulary is permuted, see hf_vocab.py)
    CKPT/hf_config.json       the source transformers config (bookkeeping keys restored by to-hf)
    CKPT/tokenizers/text/     the source tokenizer.json (+ its id map) -> HFTextTokenizer
    CKPT/tokenizers/image/    the VQGAN as an ImageTokenizer (decoder only when the source had one)
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tessera.convert import hf_config as hfc
from tessera.convert.errors import ConvertError
from tessera.convert.hf_tokenizer import (
    PROCESSOR_FILES,
    TOKENIZER_FILES,
    HFTextTokenizer,
    copy_tokenizer_files,
)
from tessera.convert.hf_vocab import (
    HF_IMAGE,
    IMPORT_SPECIALS,
    IdMap,
    native_vocabulary_map,
    vocab_from_chameleon,
)
from tessera.convert.io import atomic_output_dir, load_hf_state_dict, read_json, save_hf_state_dict
from tessera.convert.megatron_map import (
    Shape,
    check_hf_shapes,
    expected_hf_shapes,
    hf_to_tessera,
    tessera_to_hf,
)
from tessera.convert.model_io import load_tessera_state, model_config, save_tessera_checkpoint
from tessera.progress import Progress
from tessera.utils import DTYPE_NAMES

log = logging.getLogger(__name__)

HF_CONFIG_FILE = "hf_config.json"
CONVERT_FILE = "convert.json"
TEXT_DIR = "tokenizers/text"
IMAGE_DIR = "tokenizers/image"
VQ_PREFIX = "model.vqmodel."


@dataclass
class ConvertResult:
    out_dir: Path
    tensors: int
    parameters: int
    seconds: float
    peak_rss_gib: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"wrote {self.out_dir}: {self.tensors} tensors, {self.parameters:,} parameters, "
            f"{self.seconds:.1f} s, peak host RSS {self.peak_rss_gib:.2f} GiB"
        ]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _peak_rss_gib() -> float:
    """Peak RSS of this process: VmHWM (ru_maxrss would include the parent's RSS at fork + exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _choose_dtype(state: dict[str, torch.Tensor], dtype: str) -> str:
    if dtype != "auto":
        name = DTYPE_NAMES.get(str(dtype))
        if name not in ("float32", "bfloat16"):
            raise ConvertError(f"--dtype {dtype!r}: expected auto, fp32 or bf16")
        return name
    w = state.get("lm_head.weight")
    return "bfloat16" if w is not None and w.dtype == torch.bfloat16 else "float32"


def _tokens_per_image(vq: dict) -> int:
    mults = vq.get("channel_multiplier", vq.get("ch_mult", (1, 1, 2, 2, 4)))
    side = int(vq.get("resolution", 512)) // 2 ** (len(mults) - 1)
    return side * side


# ---- import -----------------------------------------------------------------------------------
def import_chameleon(
    cfg: dict[str, Any],
    state: dict[str, torch.Tensor],
    out_dir: str | Path,
    tokenizer_src: Path | None,
    vq_decoder: dict[str, torch.Tensor] | None = None,
    source: str = "hf",
    dtype: str = "auto",
    overwrite: bool = False,
    where: str = "checkpoint",
) -> ConvertResult:
    """Write a Tessera checkpoint for transformers-named ``state`` + config ``cfg`` (consumes ``state``)."""
    from tessera.convert.vq import image_tokenizer_from_taming

    t0 = time.perf_counter()
    params_dtype = _choose_dtype(state, dtype)
    vq_cfg = dict(cfg.get("vq_config") or {})
    vocab, idmap = vocab_from_chameleon(
        cfg.get("vocabulary_map") or {},
        int(cfg["vocab_size"]),
        _tokens_per_image(vq_cfg),
        bos_id=cfg.get("bos_token_id"),
        eos_id=cfg.get("eos_token_id"),
        pad_id=cfg.get("pad_token_id"),
    )
    mcfg = model_config(hfc.model_fields_from_hf(cfg, vocab.padded_size, params_dtype))
    heads, groups = int(cfg["num_attention_heads"]), hfc.num_kv_heads(cfg)
    shape = Shape(int(cfg["num_hidden_layers"]), heads, groups, bool(cfg.get("swin_norm", False)),
                  rotary_interleaved=bool(getattr(mcfg, "rotary_interleaved", False)))
    vq_state = {k[len(VQ_PREFIX) :]: state.pop(k) for k in [k for k in state if k.startswith(VQ_PREFIX)]}
    if vq_decoder:
        vq_state.update(vq_decoder)
    notes: list[str] = []
    if float(cfg.get("rms_norm_eps", 1e-5)) != 1e-5:
        notes.append(f"rms_norm_eps={cfg['rms_norm_eps']}: transformers' QK LayerNorm uses 1e-5, Tessera's uses "
                     "norm_epsilon for both, so logits differ slightly")
    image_tok, has_decoder = None, False
    if vq_state:
        image_tok, has_decoder = image_tokenizer_from_taming(vq_state, vq_cfg, f"{where}: vqmodel")
        if image_tok.num_codes != vocab.num_image_codes:
            raise ConvertError(
                f"{where}: VQ codebook has {image_tok.num_codes} codes but vocabulary_map names {vocab.num_image_codes}"
            )
        if not has_decoder:
            notes.append("the source has no VQ decoder (transformers drops it): images can be encoded, not decoded")
    else:
        notes.append("the source has no VQ model: no image tokenizer written")
    check_hf_shapes(
        state,
        expected_hf_shapes(shape.num_layers, int(cfg["hidden_size"]), int(cfg["intermediate_size"]), heads, groups,
                           int(cfg["vocab_size"])),
        where,
    )
    lm_keys = sum(1 for _ in state)
    with Progress("convert: re-layout", total=shape.num_layers, unit="layers") as prog:
        t_state = hf_to_tessera(state, shape, idmap, vocab.padded_size, where, on_layer=prog.update)
    leftover = sorted(state)
    if leftover:
        raise ConvertError(f"{where}: unexpected tensor {leftover[0]!r} (not part of a Chameleon language model)")
    n_params = sum(v.numel() for v in t_state.values())
    with atomic_output_dir(out_dir, overwrite) as tmp:
        _say(f"convert: saving the Tessera checkpoint ({n_params:,} parameters, {params_dtype})")
        save_tessera_checkpoint(mcfg, t_state, tmp, vocab)
        del t_state
        idmap.save(tmp)
        (tmp / HF_CONFIG_FILE).write_text(json.dumps(cfg, indent=1))
        if tokenizer_src is not None and (tokenizer_src / "tokenizer.json").is_file():
            text_dir = tmp / TEXT_DIR
            copy_tokenizer_files(tokenizer_src, text_dir)
            HFTextTokenizer(text_dir / "tokenizer.json", idmap, vocab).save(text_dir)
            # tokenizers/text/ alone carries the way back (runs that start from this checkpoint copy it)
            shutil.copyfile(tmp / HF_CONFIG_FILE, text_dir / HF_CONFIG_FILE)
        else:
            notes.append("no tokenizer.json in the source: no text tokenizer written")
        if image_tok is not None:
            image_tok.save(tmp / IMAGE_DIR)
            (tmp / IMAGE_DIR / CONVERT_FILE).write_text(json.dumps({"has_decoder": has_decoder}))
        (tmp / CONVERT_FILE).write_text(
            json.dumps({"source": source, "from": str(where), "params_dtype": params_dtype, "notes": notes}, indent=1)
        )
    return ConvertResult(Path(out_dir), lm_keys, n_params, time.perf_counter() - t0, _peak_rss_gib(), notes)


def _check_out(out_dir: str | Path, overwrite: bool) -> None:
    """Fail before any heavy work if OUT_DIR exists (``atomic_output_dir`` checks again at the end)."""
    if Path(out_dir).exists() and not overwrite:
        raise ConvertError(f"{out_dir}: output directory already exists (pass --overwrite to replace it)")


def from_hf(hf_dir: str | Path, out_dir: str | Path, dtype: str = "auto", overwrite: bool = False) -> ConvertResult:
    """A transformers ``ChameleonForConditionalGeneration`` directory -> a Tessera checkpoint."""
    _check_out(out_dir, overwrite)
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ConvertError(f"{hf_dir}: not a directory")
    cfg = hfc.read_hf_config(hf_dir)
    _say(f"convert: reading {hf_dir}")
    state = load_hf_state_dict(hf_dir)
    return import_chameleon(cfg, state, out_dir, hf_dir, None, "hf", dtype, overwrite, str(hf_dir))


def from_meta(
    meta_dir: str | Path, out_dir: str | Path, model: str | None = None, dtype: str = "auto", overwrite: bool = False
) -> ConvertResult:
    """Meta's release layout (params.json, consolidated.NN.pth, tokenizer/) -> a Tessera checkpoint."""
    from tessera.convert.meta import read_meta, write_tokenizer_json

    _check_out(out_dir, overwrite)
    meta_dir = Path(meta_dir)
    _say(f"convert: reading {meta_dir}")
    ck = read_meta(meta_dir, model)
    staging = Path(out_dir).parent / f".{Path(out_dir).name}.tokenizer-staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        write_tokenizer_json(ck.tokenizer_json, staging / "tokenizer.json")
        _write_chameleon_tokenizer_config(staging, ck.hf_config)
        return import_chameleon(
            ck.hf_config, ck.state, out_dir, staging, ck.vq_decoder, "meta", dtype, overwrite, str(meta_dir)
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_chameleon_tokenizer_config(directory: Path, cfg: dict) -> None:
    """tokenizer_config.json as transformers' conversion script sets it (sep = <reserved08706>)."""
    vmap = cfg.get("vocabulary_map") or {}
    inv = {v: k for k, v in vmap.items()}
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.get("max_position_embeddings", 4096)}
    for key, id_key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("pad_token", "pad_token_id")):
        if cfg.get(id_key) is not None and cfg[id_key] in inv:
            tc[key] = inv[cfg[id_key]]
    if "<unk>" in vmap:
        tc["unk_token"] = "<unk>"
    if "<reserved08706>" in vmap:
        tc["sep_token"] = "<reserved08706>"
    (directory / "tokenizer_config.json").write_text(json.dumps(tc, indent=1))
    _write_processor_files(directory, cfg)


def _write_processor_files(directory: Path, cfg: dict) -> None:
    vq = cfg.get("vq_config") or {}
    size = int(vq.get("resolution", 512))
    (directory / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "ChameleonImageProcessor",
                "size": {"shortest_edge": size},
                "crop_size": {"height": size, "width": size},
                "do_resize": True, "do_center_crop": True, "do_rescale": True, "do_normalize": True,
                # x / 127.5 - 1 as Tessera's (and Meta's) preprocessing; transformers' default is 0.0078
                "rescale_factor": 1 / 127.5, "image_mean": [1.0, 1.0, 1.0], "image_std": [1.0, 1.0, 1.0],
                "do_convert_rgb": True, "resample": 1,
            },
            indent=1,
        )
    )
    (directory / "processor_config.json").write_text(
        json.dumps(
            {"processor_class": "ChameleonProcessor", "image_seq_length": _tokens_per_image(vq), "image_token": HF_IMAGE},
            indent=1,
        )
    )


# ---- export -----------------------------------------------------------------------------------
def _native_idmap(vocab: Any, padded_size: int) -> IdMap:
    """A checkpoint trained in Tessera keeps its own ids in transformers (padding rows included)."""
    return IdMap(tuple(range(padded_size)), padded_size)


def to_hf(
    ckpt: str | Path,
    out_dir: str | Path,
    dtype: str | None = None,
    text_tokenizer: str | Path | None = None,
    image_tokenizer: str | Path | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    allow_missing_vq: bool = False,
    from_import: str | Path | None = None,
    base: str | Path | None = None,
) -> ConvertResult:
    """A Tessera checkpoint -> a directory ``ChameleonForConditionalGeneration.from_pretrained`` loads.
    ``allow_missing_vq`` exports a text-only checkpoint (transformers then initialises the VQ randomly).
    A checkpoint that descends from an import (``tessera train`` started from a from-hf / from-meta
    checkpoint) needs that import's id map: it is looked for in CKPT, CKPT/tokenizers/text and the run's
    tokenizers/text, or given as ``from_import`` (the imported checkpoint or its tokenizers/text).
    An adapter checkpoint (a LoRA run) is exported with its adapters merged into its base's weights; the
    base (its recorded path, or ``base``) is searched for the id map and tokenizers too."""
    from tessera.convert.vq import hf_vq_config, tessera_to_taming

    t0 = time.perf_counter()
    _check_out(out_dir, overwrite)
    _say(f"convert: loading {ckpt}")
    mcfg, vocab, t_state, path = load_tessera_state(ckpt, dtype, base=base)
    if vocab is None:
        raise ConvertError(f"{path}: checkpoint has no vocab.json; cannot name the image tokens for transformers")
    notes: list[str] = []
    import_dir = _find_import_dir(path, from_import)
    imported = import_dir is not None
    if not imported and tuple(vocab.special_tokens) == IMPORT_SPECIALS:
        raise ConvertError(
            f"{path}: its vocabulary comes from a Chameleon import (specials {list(IMPORT_SPECIALS)}) but no "
            "hf_id_map.json was found: pass --from-import IMPORTED_CKPT (or copy its tokenizers/ into the run)"
        )
    idmap = IdMap.load(import_dir) if imported else _native_idmap(vocab, int(mcfg.vocab_size))
    if len(idmap.tessera_to_hf) != (vocab.size if imported else int(mcfg.vocab_size)):
        raise ConvertError(
            f"{import_dir}/hf_id_map.json maps {len(idmap.tessera_to_hf)} ids but {path} has a vocabulary of "
            f"{vocab.size}: not the import this checkpoint was trained from"
        )
    base = read_json(import_dir / HF_CONFIG_FILE) if imported and (import_dir / HF_CONFIG_FILE).is_file() else {}
    shape = Shape(mcfg.num_layers, mcfg.num_attention_heads, mcfg.num_query_groups or mcfg.num_attention_heads,
                  bool(mcfg.swin_norm), rotary_interleaved=bool(getattr(mcfg, "rotary_interleaved", False)))
    with Progress("convert: re-layout", total=shape.num_layers, unit="layers") as prog:
        hf_state = tessera_to_hf(t_state, shape, idmap, str(path), on_layer=prog.update)
    leftover = sorted(t_state)
    if leftover:
        raise ConvertError(f"{path}: tensor {leftover[0]!r} has no transformers counterpart")

    # image tokenizer -> model.vqmodel.*
    from tessera.tokenizers.image import ImageTokenizer

    img_dir = Path(image_tokenizer) if image_tokenizer else _find_in_tokenizer_dirs(path, "image")
    if not image_tokenizer and not img_dir.is_dir() and import_dir is not None:
        for cand in (import_dir / IMAGE_DIR, import_dir.parent / "image"):  # an import dir or its tokenizers/text
            if (cand / "config.json").is_file():
                img_dir = cand
                break
    vq_conf: dict = {}
    if (img_dir / "config.json").is_file():
        itok = ImageTokenizer.load(img_dir)
        vq_conf = hf_vq_config(itok.config)
        for k, v in tessera_to_taming(itok.model.state_dict(), itok.config, decoder=False).items():
            hf_state[VQ_PREFIX + k] = v.to(hf_state["lm_head.weight"].dtype) if v.is_floating_point() else v
    elif allow_missing_vq:
        notes.append("no image tokenizer: model.vqmodel.* not written (transformers will initialise it randomly)")
    else:
        raise ConvertError(f"{img_dir}: no image tokenizer (transformers' Chameleon needs its VQ encoder); "
                           "pass --image-tokenizer DIR or --allow-missing-vq")

    # config.json
    cfg = dict(base)
    cfg.update(hfc.hf_fields_from_model(mcfg))
    cfg["model_type"] = "chameleon"
    cfg["architectures"] = ["ChameleonForConditionalGeneration"]
    cfg["vocab_size"] = idmap.hf_vocab_size
    cfg["dtype"] = str(hf_state["lm_head.weight"].dtype).replace("torch.", "")
    cfg.pop("torch_dtype", None)
    cfg.pop("rope_theta", None)
    base_vq = dict(base.get("vq_config") or {})
    base_vq.update(vq_conf)
    cfg["vq_config"] = base_vq

    with atomic_output_dir(out_dir, overwrite) as tmp:
        tmp.mkdir(parents=True)
        text_dir = Path(text_tokenizer) if text_tokenizer else _imported_text_dir(path, import_dir)
        if imported and (text_dir / "tokenizer.json").is_file():
            copy_tokenizer_files(text_dir, tmp, TOKENIZER_FILES + PROCESSOR_FILES)
            if not any((tmp / n).is_file() for n in PROCESSOR_FILES):
                _write_processor_files(tmp, cfg)
        else:
            sp_model = _find_sentencepiece(path, text_tokenizer)
            pieces = build_native_tokenizer(sp_model, vocab, int(mcfg.vocab_size), tmp) if sp_model else None
            if pieces is None:
                notes.append("no text tokenizer found (pass --text-tokenizer MODEL): wrote config and weights only")
            cfg["vocabulary_map"] = native_vocabulary_map(vocab, pieces, int(mcfg.vocab_size))
            cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"] = vocab.bos_id, vocab.eos_id, vocab.pad_id
            if pieces is not None:
                _write_processor_files(tmp, cfg)
        if "vocabulary_map" not in cfg:
            raise ConvertError(f"{path}: {HF_CONFIG_FILE} has no vocabulary_map")
        cfg["image_token_id"] = cfg["vocabulary_map"].get(HF_IMAGE)
        _say(f"convert: writing safetensors to {out_dir}")
        save_hf_state_dict(hf_state, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        (tmp / "generation_config.json").write_text(
            json.dumps({k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None})
        )
    n = sum(v.numel() for v in hf_state.values())
    return ConvertResult(Path(out_dir), len(hf_state), n, time.perf_counter() - t0, _peak_rss_gib(), notes)


def _find_import_dir(ckpt: Path, given: str | Path | None) -> Path | None:
    """The directory holding hf_id_map.json (+ hf_config.json) for a checkpoint that came from an import."""
    if given is not None:
        for d in (Path(given), Path(given) / TEXT_DIR):
            if (d / "hf_id_map.json").is_file():
                return d
        raise ConvertError(f"{given}: no hf_id_map.json (expected an imported checkpoint or its tokenizers/text)")
    base = _adapter_base(ckpt)
    for d in [ckpt] + ([base] if base else []) + [t / "text" for t in _tokenizer_dirs(ckpt)]:
        if (d / "hf_id_map.json").is_file():
            return d
    return None


def _adapter_base(ckpt: Path) -> Path | None:
    """The base checkpoint an adapter checkpoint (LoRA run) records, where it has one."""
    from tessera.model.checkpoint import CheckpointError, adapter_meta, read_checkpoint_meta

    try:
        meta = read_checkpoint_meta(ckpt)
    except CheckpointError:
        return None
    base = meta.get("base") if adapter_meta(meta) is not None else None
    return Path(base["path"]) if isinstance(base, dict) and base.get("path") else None


def _imported_text_dir(ckpt: Path, import_dir: Path | None) -> Path:
    if import_dir is not None and (import_dir / "tokenizer.json").is_file():
        return import_dir
    if import_dir is not None and (import_dir / TEXT_DIR / "tokenizer.json").is_file():
        return import_dir / TEXT_DIR
    return _find_in_tokenizer_dirs(ckpt, "text")


def _tokenizer_dirs(ckpt: Path) -> list[Path]:
    """Where a checkpoint's tokenizers live (the convention tessera generate uses): CKPT/tokenizers,
    then the run directory's tokenizers/ above checkpoints/; for an adapter checkpoint then its base's."""
    dirs = []
    base = _adapter_base(ckpt)
    for c in [ckpt] + ([base] if base else []):
        dirs.append(c / "tokenizers")
        for parent in c.parents:
            if parent.name == "checkpoints":
                dirs.append(parent.parent / "tokenizers")
                break
    return dirs


def _find_in_tokenizer_dirs(ckpt: Path, name: str) -> Path:
    for d in _tokenizer_dirs(ckpt):
        if (d / name).exists():
            return d / name
    return ckpt / "tokenizers" / name


def _find_sentencepiece(ckpt: Path, given: str | Path | None) -> Path | None:
    if given:
        p = Path(given)
        if p.is_file():
            return p
        raise ConvertError(f"{p}: text tokenizer not found (expected a sentencepiece .model file)")
    p = _find_in_tokenizer_dirs(ckpt, "text.model")
    return p if p.is_file() else None


def build_native_tokenizer(sp_model: Path, vocab: Any, padded_size: int, out_dir: Path) -> list[str]:
    """tokenizer.json for a Tessera sentencepiece model, ids laid out as the Tessera vocabulary.
    Returns the text pieces (index = sentencepiece id)."""
    from tessera.convert.native_tokenizer import write_native_tokenizer

    return write_native_tokenizer(sp_model, vocab, padded_size, out_dir)
