"""transformers Chameleon state dict <-> Tessera GPTModel (megatron-core) state dict, single rank.

The Tessera side is the full (TP=1, PP=1) ``GPTModel.state_dict()``; dist_checkpointing re-shards
it to any TP/PP layout when training loads the checkpoint. Names below are megatron-core's local
(pure PyTorch) GPT layer spec plus Tessera's Chameleon additions (per-head QK-norm with bias).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tessera.convert.errors import ConvertError
from tessera.convert.hf_vocab import IdMap
from tessera.convert.layout import (
    fuse_fc1,
    fuse_qkv,
    half_to_interleaved,
    interleaved_to_half,
    split_fc1,
    split_qkv,
)

# Tessera (megatron) parameter names. With swin_norm the two layer norms are applied to the
# *outputs* of attention / MLP (Chameleon-34B); transformers keeps the names input_layernorm /
# post_attention_layernorm for them, and Tessera's swin layer keeps its own names (SWIN_* below).
EMBED = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
LAYER = "decoder.layers.{i}."
QKV = "self_attention.linear_qkv.weight"
PROJ = "self_attention.linear_proj.weight"
Q_NORM_W, Q_NORM_B = "self_attention.q_layernorm.weight", "self_attention.q_layernorm.bias"
K_NORM_W, K_NORM_B = "self_attention.k_layernorm.weight", "self_attention.k_layernorm.bias"
FC1, FC2 = "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"
ATTN_NORM = "input_layernorm.weight"
MLP_NORM = "pre_mlp_layernorm.weight"
SWIN_ATTN_NORM = "post_self_attn_layernorm.weight"
SWIN_MLP_NORM = "post_mlp_layernorm.weight"

HF_LAYER = "model.layers.{i}."


@dataclass(frozen=True)
class Shape:
    num_layers: int
    num_heads: int
    num_groups: int
    swin_norm: bool
    # megatron's ``rotary_interleaved``: True rotates adjacent pairs (Meta's order) so q/k rows must
    # be un-permuted from transformers' rotate-half order; False (megatron's default) keeps it.
    rotary_interleaved: bool = False


def _take(sd: dict[str, torch.Tensor], key: str, where: str) -> torch.Tensor:
    try:
        return sd.pop(key)
    except KeyError:
        raise ConvertError(f"{where}: missing tensor {key!r}") from None


def _norm_names(shape: Shape) -> tuple[str, str]:
    return (SWIN_ATTN_NORM, SWIN_MLP_NORM) if shape.swin_norm else (ATTN_NORM, MLP_NORM)


def hf_to_tessera(
    hf: dict[str, torch.Tensor],
    shape: Shape,
    idmap: IdMap,
    padded_vocab: int,
    where: str = "checkpoint",
    on_layer: Callable[[], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Map the language-model tensors (``model.vqmodel.*`` must be removed first). Consumes ``hf``
    (pops tensors as it goes, so peak memory stays near one copy of the weights)."""
    out: dict[str, torch.Tensor] = {}
    out[EMBED] = idmap.rows_to_tessera(_take(hf, "model.embed_tokens.weight", where), padded_vocab)
    out[OUTPUT] = idmap.rows_to_tessera(_take(hf, "lm_head.weight", where), padded_vocab)
    out[FINAL_NORM] = _take(hf, "model.norm.weight", where)
    attn_norm, mlp_norm = _norm_names(shape)
    rot = (lambda w, n: half_to_interleaved(w, n)) if shape.rotary_interleaved else (lambda w, n: w)
    for i in range(shape.num_layers):
        h, t = HF_LAYER.format(i=i), LAYER.format(i=i)
        q = rot(_take(hf, h + "self_attn.q_proj.weight", where), shape.num_heads)
        k = rot(_take(hf, h + "self_attn.k_proj.weight", where), shape.num_groups)
        v = _take(hf, h + "self_attn.v_proj.weight", where)
        try:
            out[t + QKV] = fuse_qkv(q, k, v, shape.num_heads, shape.num_groups)
        except ConvertError as exc:
            raise ConvertError(f"{where}: layer {i} attention: {exc}") from None
        out[t + PROJ] = _take(hf, h + "self_attn.o_proj.weight", where)
        for hk, tk, n in (
            ("q_norm.weight", Q_NORM_W, shape.num_heads),
            ("q_norm.bias", Q_NORM_B, shape.num_heads),
            ("k_norm.weight", K_NORM_W, shape.num_groups),
            ("k_norm.bias", K_NORM_B, shape.num_groups),
        ):
            w = _take(hf, h + "self_attn." + hk, where)
            if w.dim() != 2 or w.shape[0] != n:
                raise ConvertError(f"{where}: {h}self_attn.{hk} has shape {tuple(w.shape)}, expected [{n}, head_dim]")
            out[t + tk] = rot(w.reshape(-1), n).reshape(w.shape)
        out[t + attn_norm] = _take(hf, h + "input_layernorm.weight", where)
        out[t + mlp_norm] = _take(hf, h + "post_attention_layernorm.weight", where)
        out[t + FC1] = fuse_fc1(_take(hf, h + "mlp.gate_proj.weight", where), _take(hf, h + "mlp.up_proj.weight", where))
        out[t + FC2] = _take(hf, h + "mlp.down_proj.weight", where)
        if on_layer:
            on_layer()
    return out


def tessera_to_hf(
    t_sd: dict[str, torch.Tensor],
    shape: Shape,
    idmap: IdMap,
    where: str = "checkpoint",
    on_layer: Callable[[], None] | None = None,
) -> dict:
    """Inverse of ``hf_to_tessera`` (consumes ``t_sd``)."""
    out: dict[str, torch.Tensor] = {}
    out["model.embed_tokens.weight"] = idmap.rows_to_hf(_take(t_sd, EMBED, where))
    out["lm_head.weight"] = idmap.rows_to_hf(_take(t_sd, OUTPUT, where))
    out["model.norm.weight"] = _take(t_sd, FINAL_NORM, where)
    attn_norm, mlp_norm = _norm_names(shape)
    rot = (lambda w, n: interleaved_to_half(w, n)) if shape.rotary_interleaved else (lambda w, n: w)
    for i in range(shape.num_layers):
        h, t = HF_LAYER.format(i=i), LAYER.format(i=i)
        q, k, v = split_qkv(_take(t_sd, t + QKV, where), shape.num_heads, shape.num_groups)
        out[h + "self_attn.q_proj.weight"] = rot(q, shape.num_heads)
        out[h + "self_attn.k_proj.weight"] = rot(k, shape.num_groups)
        out[h + "self_attn.v_proj.weight"] = v
        out[h + "self_attn.o_proj.weight"] = _take(t_sd, t + PROJ, where)
        for hk, tk, n in (
            ("q_norm.weight", Q_NORM_W, shape.num_heads),
            ("q_norm.bias", Q_NORM_B, shape.num_heads),
            ("k_norm.weight", K_NORM_W, shape.num_groups),
            ("k_norm.bias", K_NORM_B, shape.num_groups),
        ):
            w = _take(t_sd, t + tk, where)
            out[h + "self_attn." + hk] = rot(w.reshape(-1), n).reshape(w.shape)
        out[h + "input_layernorm.weight"] = _take(t_sd, t + attn_norm, where)
        out[h + "post_attention_layernorm.weight"] = _take(t_sd, t + mlp_norm, where)
        gate, up = split_fc1(_take(t_sd, t + FC1, where))
        out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = gate, up
        out[h + "mlp.down_proj.weight"] = _take(t_sd, t + FC2, where)
        if on_layer:
            on_layer()
    return out


def expected_hf_shapes(
    num_layers: int, hidden: int, ffn: int, heads: int, groups: int, vocab: int
) -> dict[str, tuple[int, ...]]:
    """Every language-model tensor of a transformers Chameleon and its shape."""
    hd = hidden // heads
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "lm_head.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(num_layers):
        h = HF_LAYER.format(i=i)
        shapes.update({
            h + "self_attn.q_proj.weight": (heads * hd, hidden),
            h + "self_attn.k_proj.weight": (groups * hd, hidden),
            h + "self_attn.v_proj.weight": (groups * hd, hidden),
            h + "self_attn.o_proj.weight": (hidden, heads * hd),
            h + "self_attn.q_norm.weight": (heads, hd),
            h + "self_attn.q_norm.bias": (heads, hd),
            h + "self_attn.k_norm.weight": (groups, hd),
            h + "self_attn.k_norm.bias": (groups, hd),
            h + "mlp.gate_proj.weight": (ffn, hidden),
            h + "mlp.up_proj.weight": (ffn, hidden),
            h + "mlp.down_proj.weight": (hidden, ffn),
            h + "input_layernorm.weight": (hidden,),
            h + "post_attention_layernorm.weight": (hidden,),
        })
    return shapes


def check_hf_shapes(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], where: str) -> None:
    """Fail naming the first missing, misshapen or unexpected language-model tensor."""
    for key, shape in expected.items():
        if key not in state:
            raise ConvertError(f"{where}: missing tensor {key!r}")
        if tuple(state[key].shape) != shape:
            raise ConvertError(f"{where}: tensor {key!r} has shape {tuple(state[key].shape)}, config implies {shape}")
    extra = sorted(k for k in state if k not in expected)
    if extra:
        raise ConvertError(f"{where}: unexpected tensor {extra[0]!r} (not part of a Chameleon language model)")
