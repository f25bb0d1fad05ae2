"""Meta's Chameleon release layout -> transformers-named tensors + config (then ``importer``).

Layout (what transformers' convert_chameleon_weights_to_hf.py reads)::

    META_DIR/models/<size>/params.json            {"model_parallel_size": N, "model": {...}}
    META_DIR/models/<size>/consolidated.NN.pth    one file per model-parallel rank
    META_DIR/tokenizer/text_tokenizer.json        HF tokenizers BPE (image codes named IMGIMG..Z)
    META_DIR/tokenizer/vqgan.ckpt, vqgan.yaml     taming-transformers VQGAN, decoder included

Rank shards split wq/wk/wv/w1/w3 and the output by rows, wo/w2 and the token embedding by columns;
norms are replicated. QK-norm has one [head_dim] weight+bias *per rank* (34B: each rank's heads
share it), in Meta's interleaved RoPE order like wq/wk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from tessera.convert.errors import ConvertError
from tessera.convert.hf_vocab import HF_IMAGE
from tessera.convert.io import read_json
from tessera.convert.layout import interleaved_to_half
from tessera.progress import Progress

META_RESERVED_IMAGE = "<reserved08707>"  # transformers reuses this reserved token as <image>

# params.json "model" keys. Anything else is rejected: it might change the maths.
KNOWN_META_KEYS = {
    "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim_multiplier", "multiple_of",
    "norm_eps", "rope_theta", "qk_normalization", "swin_norm", "max_seq_len", "max_batch_size",
    "model_parallel_size", "dropout", "attn_dropout", "ffn_dropout", "use_scaled_rope",
}


def meta_ffn_size(dim: int, ffn_dim_multiplier: float | None = 1.0, multiple_of: int = 256) -> int:
    """Meta's FFN width: 8/3 x dim scaled, rounded up to ``multiple_of`` (as transformers computes it)."""
    mult = 1.0 if ffn_dim_multiplier is None else ffn_dim_multiplier
    return multiple_of * ((int(mult * int(8 * dim / 3)) + multiple_of - 1) // multiple_of)


@dataclass
class MetaCheckpoint:
    hf_config: dict  # a transformers ChameleonConfig as a dict
    state: dict[str, torch.Tensor]  # transformers names, model.vqmodel.* included
    vq_decoder: dict[str, torch.Tensor]  # taming names "decoder.*", absent from transformers
    tokenizer_json: dict  # text_tokenizer.json with <reserved08707> renamed <image>


def find_model_dir(meta_dir: Path, model: str | None) -> Path:
    if (meta_dir / "params.json").is_file():
        return meta_dir
    models = meta_dir / "models"
    if model:
        d = models / model.lower()
        if not (d / "params.json").is_file():
            raise ConvertError(f"{d / 'params.json'}: file not found")
        return d
    found = sorted(p.parent for p in models.glob("*/params.json")) if models.is_dir() else []
    if len(found) != 1:
        names = [p.name for p in found]
        raise ConvertError(
            f"{meta_dir}: expected params.json or exactly one models/<size>/params.json, found {names or 'none'}"
            " (pick one with --model)"
        )
    return found[0]


def find_tokenizer_dir(meta_dir: Path, model_dir: Path) -> Path:
    for d in (meta_dir / "tokenizer", model_dir / "tokenizer", model_dir.parent.parent / "tokenizer"):
        if d.is_dir():
            return d
    raise ConvertError(f"{meta_dir}: no tokenizer/ directory (text_tokenizer.json, vqgan.ckpt, vqgan.yaml)")


def _load_shards(model_dir: Path, expected: int | None) -> list[dict[str, torch.Tensor]]:
    files = sorted(model_dir.glob("consolidated.*.pth"))
    single = model_dir / "consolidated.pth"
    if not files and single.is_file():
        files = [single]
    n = expected or len(files)
    if n == 0:
        raise ConvertError(f"{model_dir}: no consolidated.NN.pth weight files")
    paths = [single] if files == [single] and n == 1 else [model_dir / f"consolidated.{r:02d}.pth" for r in range(n)]
    shards = []
    for p in paths:
        if not p.is_file():
            raise ConvertError(f"{p}: missing model-parallel shard ({n} expected from params.json)")
        try:
            shards.append(torch.load(p, map_location="cpu", weights_only=True, mmap=True))
        except (RuntimeError, OSError, EOFError) as exc:
            raise ConvertError(f"{p}: unreadable weight shard: {exc}") from exc
    extra = sorted(set(files) - set(paths))
    if extra:
        raise ConvertError(f"{extra[0]}: shard beyond model_parallel_size={n} in params.json")
    return shards


def read_meta(meta_dir: str | Path, model: str | None = None) -> MetaCheckpoint:
    meta_dir = Path(meta_dir)
    model_dir = find_model_dir(meta_dir, model)
    params_path = model_dir / "params.json"
    raw = read_json(params_path)
    consolidate = model_dir / "consolidate_params.json"
    if consolidate.is_file():
        raw = {**raw, **read_json(consolidate)}
    mp = raw.get("model_parallel_size")
    params = raw.get("model", raw)
    unknown = sorted(set(params) - KNOWN_META_KEYS)
    if unknown:
        raise ConvertError(f"{params_path}: unknown key(s) {unknown}; refusing to guess what they change")
    for key in ("dim", "n_layers", "n_heads", "vocab_size"):
        if not isinstance(params.get(key), int) or params[key] <= 0:
            raise ConvertError(f"{params_path}: {key} must be a positive integer, got {params.get(key)!r}")
    if params.get("qk_normalization", True) is not True:
        raise ConvertError(f"{params_path}: qk_normalization must be true for Chameleon")
    dim, n_layers, n_heads = params["dim"], params["n_layers"], params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    hd = dim // n_heads
    ffn = meta_ffn_size(dim, params.get("ffn_dim_multiplier", 1.0), params.get("multiple_of", 256))
    shards = _load_shards(model_dir, int(mp) if mp else None)
    ns = len(shards)
    for what, n in (("n_heads", n_heads), ("n_kv_heads", n_kv)):
        if n % ns:
            raise ConvertError(f"{params_path}: {what}={n} is not divisible by the {ns} model-parallel shards")
    names = [model_dir / f"consolidated.{r:02d}.pth" for r in range(ns)]

    def get(key: str) -> list[torch.Tensor]:
        out = []
        for r, s in enumerate(shards):
            if key not in s:
                raise ConvertError(f"{names[r]}: missing tensor {key!r}")
            out.append(s[key])
        return out

    def cat(key: str, d: int, shape: tuple[int, ...]) -> torch.Tensor:
        parts = get(key)
        try:
            t = torch.cat(parts, dim=d)
        except RuntimeError as exc:
            raise ConvertError(f"{model_dir}: tensor {key!r}: shards do not concatenate: {exc}") from None
        if tuple(t.shape) != shape:
            raise ConvertError(f"{model_dir}: tensor {key!r} has shape {tuple(t.shape)} across shards, expected {shape}")
        return t

    def replicated(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        parts = get(key)
        for r, p in enumerate(parts):
            if tuple(p.shape) != shape:
                raise ConvertError(f"{names[r]}: tensor {key!r} has shape {tuple(p.shape)}, expected {shape}")
        return torch.stack(parts).mean(0) if ns > 1 else parts[0]  # as transformers does

    def per_rank_norm(key: str, heads: int) -> torch.Tensor:
        parts = get(key)
        for r, p in enumerate(parts):
            if tuple(p.shape) != (hd,):
                raise ConvertError(f"{names[r]}: tensor {key!r} has shape {tuple(p.shape)}, expected ({hd},)")
        # One vector per rank, permuted like wq/wk, repeated for that rank's heads -> [heads, hd].
        return torch.stack([interleaved_to_half(p, 1) for p in parts]).repeat_interleave(heads // ns, 0)

    vocab = params["vocab_size"]
    st: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": cat("tok_embeddings.weight", 1, (vocab, dim)),
        "lm_head.weight": cat("output.weight", 0, (vocab, dim)),
        "model.norm.weight": replicated("norm.weight", (dim,)),
    }
    prog = Progress("convert: merging model-parallel shards", total=n_layers, unit="layers")
    for i in range(n_layers):
        prog.update()
        m, h = f"layers.{i}.", f"model.layers.{i}."
        st[h + "self_attn.q_proj.weight"] = interleaved_to_half(cat(m + "attention.wq.weight", 0, (n_heads * hd, dim)), n_heads)
        st[h + "self_attn.k_proj.weight"] = interleaved_to_half(cat(m + "attention.wk.weight", 0, (n_kv * hd, dim)), n_kv)
        st[h + "self_attn.v_proj.weight"] = cat(m + "attention.wv.weight", 0, (n_kv * hd, dim))
        st[h + "self_attn.o_proj.weight"] = cat(m + "attention.wo.weight", 1, (dim, n_heads * hd))
        st[h + "mlp.gate_proj.weight"] = cat(m + "feed_forward.w1.weight", 0, (ffn, dim))
        st[h + "mlp.up_proj.weight"] = cat(m + "feed_forward.w3.weight", 0, (ffn, dim))
        st[h + "mlp.down_proj.weight"] = cat(m + "feed_forward.w2.weight", 1, (dim, ffn))
        st[h + "input_layernorm.weight"] = replicated(m + "attention_norm.weight", (dim,))
        st[h + "post_attention_layernorm.weight"] = replicated(m + "ffn_norm.weight", (dim,))
        for hf_name, meta_name, heads in (("q_norm", "q_normalization", n_heads), ("k_norm", "k_normalization", n_kv)):
            for kind in ("weight", "bias"):
                st[h + f"self_attn.{hf_name}.{kind}"] = per_rank_norm(m + f"attention.{meta_name}.{kind}", heads)

    prog.close()
    tok_dir = find_tokenizer_dir(meta_dir, model_dir)
    vq_cfg, vq_state, vq_decoder = _read_vqgan(tok_dir)
    for k, v in vq_state.items():
        st["model.vqmodel." + k] = v
    tokenizer_json = read_json(tok_dir / "text_tokenizer.json")
    try:
        vmap = tokenizer_json["model"]["vocab"]
    except (KeyError, TypeError):
        raise ConvertError(f"{tok_dir / 'text_tokenizer.json'}: no model.vocab") from None
    if META_RESERVED_IMAGE in vmap and HF_IMAGE not in vmap:
        vmap[HF_IMAGE] = vmap.pop(META_RESERVED_IMAGE)
        for t in tokenizer_json.get("added_tokens", []):
            if t.get("content") == META_RESERVED_IMAGE:
                t["content"] = HF_IMAGE
    theta = float(params.get("rope_theta", 10000.0))
    hf_config = {
        "model_type": "chameleon",
        "vocab_size": vocab,
        "hidden_size": dim,
        "intermediate_size": ffn,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "max_position_embeddings": 16384 if theta > 10000.0 else 4096,  # transformers' rule for v1
        "rms_norm_eps": float(params.get("norm_eps", 1e-5)),
        "rope_parameters": {"rope_theta": theta, "rope_type": "default"},
        "swin_norm": bool(params.get("swin_norm", False)),
        "model_parallel_size": ns,
        "vq_config": vq_cfg,
        "vocabulary_map": dict(vmap),
        "tie_word_embeddings": False,
    }
    for name, key in (("<s>", "bos_token_id"), ("</s>", "eos_token_id"), ("<pad>", "pad_token_id")):
        if name in vmap:
            hf_config[key] = int(vmap[name])
    return MetaCheckpoint(hf_config, st, vq_decoder, tokenizer_json)


_VQ_RENAMES = (
    ("ch", "base_channels"), ("out_ch", "out_channels"), ("n_embed", "num_embeddings"),
    ("ch_mult", "channel_multiplier"), ("double_z", "double_latent"), ("z_channels", "latent_channels"),
)


def _read_vqgan(tok_dir: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    ypath, cpath = tok_dir / "vqgan.yaml", tok_dir / "vqgan.ckpt"
    if not ypath.is_file():
        raise ConvertError(f"{ypath}: file not found")
    try:
        params = yaml.safe_load(ypath.read_text())["model"]["params"]
        dd = params.pop("ddconfig")
    except (yaml.YAMLError, KeyError, TypeError) as exc:
        raise ConvertError(f"{ypath}: expected model.params.ddconfig: {exc}") from None
    cfg = {k: v for k, v in {**params, **dd}.items() if k not in ("lossconfig", "ckpt_path", "ignore_keys")}
    for old, new in _VQ_RENAMES:
        if old in cfg:
            cfg[new] = cfg.pop(old)
    cfg.pop("out_channels", None)
    if not cpath.is_file():
        raise ConvertError(f"{cpath}: file not found")
    try:
        sd = torch.load(cpath, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd)
    except (RuntimeError, OSError, EOFError, AttributeError) as exc:
        raise ConvertError(f"{cpath}: unreadable VQGAN checkpoint: {exc}") from exc
    keep = ("encoder.", "quantize.", "quant_conv.", "post_quant_conv.")
    state = {k: v for k, v in sd.items() if k.startswith(keep)}
    decoder = {k: v for k, v in sd.items() if k.startswith("decoder.")}
    if "quantize.embedding.weight" not in state:
        raise ConvertError(f"{cpath}: missing tensor 'quantize.embedding.weight'")
    return cfg, state, decoder


def write_tokenizer_json(tokenizer_json: dict, path: Path) -> None:
    path.write_text(json.dumps(tokenizer_json, ensure_ascii=False))
