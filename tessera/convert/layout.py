"""Pure tensor re-layouts between Meta's, transformers' and megatron-core's Chameleon weights.

Three layouts of the same attention weights exist:

* Meta (consolidated.NN.pth): RoPE rotates *adjacent pairs* (2i, 2i+1) of each head ("interleaved"),
  QK-norm has one [head_dim] weight per model-parallel rank.
* transformers: rows of q/k (and the QK-norm params) are permuted within each head so RoPE can
  rotate *halves* (i, i + head_dim/2) (``rotate_half``); QK-norm params are [heads, head_dim].
* megatron-core (Tessera): q, k, v fused into one ``linear_qkv`` whose rows are grouped per query
  group ``[q heads of group g..., k_g, v_g]``; gate/up fused into ``linear_fc1 = [gate; up]``.
  With megatron's default ``rotary_interleaved=False`` RoPE is rotate-half, i.e. transformers' order.
"""

from __future__ import annotations

import torch

from tessera.convert.errors import ConvertError


# ---- RoPE row order ------------------------------------------------------------------------
def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta -> transformers row order (their conversion script's ``permute``): per head, rows
    (0, 1, 2, 3, ...) become (0, 2, 4, ..., 1, 3, 5, ...). Works on [n_heads*hd, ...] tensors."""
    rows = w.shape[0]
    if rows % (n_heads * 2):
        raise ConvertError(f"cannot permute {tuple(w.shape)} for {n_heads} heads: rows not divisible by 2 x heads")
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of ``interleaved_to_half`` (undo transformers' rotary permutation)."""
    rows = w.shape[0]
    if rows % (n_heads * 2):
        raise ConvertError(f"cannot permute {tuple(w.shape)} for {n_heads} heads: rows not divisible by 2 x heads")
    hd = rows // n_heads
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---- fused QKV -----------------------------------------------------------------------------
def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int, n_groups: int) -> torch.Tensor:
    """transformers q/k/v [heads*hd, h], [groups*hd, h], [groups*hd, h] -> megatron linear_qkv
    [groups * (heads/groups + 2) * hd, h] in megatron's per-query-group order."""
    if n_heads % n_groups:
        raise ConvertError(f"{n_heads} attention heads are not divisible by {n_groups} query groups")
    hd = q.shape[0] // n_heads
    if q.shape[0] != n_heads * hd or k.shape[0] != n_groups * hd or v.shape[0] != n_groups * hd:
        raise ConvertError(
            f"q/k/v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} do not fit "
            f"{n_heads} heads and {n_groups} query groups of head_dim {hd}"
        )
    rest = q.shape[1:]
    per = n_heads // n_groups
    qg = q.reshape(n_groups, per * hd, *rest)
    kg = k.reshape(n_groups, hd, *rest)
    vg = v.reshape(n_groups, hd, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(n_groups * (per + 2) * hd, *rest)


def split_qkv(qkv: torch.Tensor, n_heads: int, n_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``fuse_qkv``."""
    if n_heads % n_groups:
        raise ConvertError(f"{n_heads} attention heads are not divisible by {n_groups} query groups")
    per = n_heads // n_groups
    rows = qkv.shape[0]
    if rows % (n_groups * (per + 2)):
        raise ConvertError(f"linear_qkv rows {rows} do not fit {n_heads} heads and {n_groups} query groups")
    hd = rows // (n_groups * (per + 2))
    rest = qkv.shape[1:]
    g = qkv.reshape(n_groups, (per + 2) * hd, *rest)
    q = g[:, : per * hd].reshape(n_heads * hd, *rest)
    k = g[:, per * hd : (per + 1) * hd].reshape(n_groups * hd, *rest)
    v = g[:, (per + 1) * hd :].reshape(n_groups * hd, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


# ---- fused SwiGLU fc1 ----------------------------------------------------------------------
def fuse_fc1(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """megatron's gated linear_fc1 is ``[gate; up]``: its swiglu computes silu(first half) * second half."""
    if gate.shape != up.shape:
        raise ConvertError(f"gate_proj {tuple(gate.shape)} and up_proj {tuple(up.shape)} differ in shape")
    return torch.cat([gate, up], dim=0)


def split_fc1(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if fc1.shape[0] % 2:
        raise ConvertError(f"linear_fc1 has an odd number of rows {fc1.shape[0]}")
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()
