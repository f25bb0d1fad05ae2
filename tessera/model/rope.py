"""megatron's unfused rotary embedding, ``rope(t) = t * cos + rotate_half(t) * sin`` with
``rotate_half([x1, x2]) = [-x2, x1]``, computed without its copies of q and k.

``patch_rope_without_copies()`` swaps megatron's ``_apply_rotary_pos_emb_bshd`` for the same arithmetic;
``build_model`` installs it on the CPU (on CUDA, megatron's fused RoPE is the fast path).
"""

from __future__ import annotations

import functools

import torch


class _RotateHalfRope(torch.autograd.Function):
    """``t * cos + rotate_half(t) * sin`` (rotate_half: [x1, x2] -> [-x2, x1] on the last dim) with the
    half-rotation folded into in-place updates of the two halves: forward and backward each make one
    output and one product instead of autograd's neg, cat, two products and a sum. Every element gets
    the same roundings as megatron's expression (``a + (-b) == a - b`` exactly), so results are
    bit-identical; the backward needs no saved activations."""

    @staticmethod
    def forward(ctx, t, cos_, sin_):
        ctx.save_for_backward(cos_, sin_)
        h = t.shape[-1] // 2
        out = t * cos_
        out[..., :h].sub_(t[..., h:] * sin_[..., :h])  # + (-x2) * sin
        out[..., h:].add_(t[..., :h] * sin_[..., h:])  # + x1 * sin
        return out

    @staticmethod
    def backward(ctx, g):
        cos_, sin_ = ctx.saved_tensors
        h = g.shape[-1] // 2
        gs = g * sin_  # d/d(rotate_half(t)); rotate_half's transpose maps [a, b] -> [b, -a]
        grad = g * cos_
        grad[..., :h].add_(gs[..., h:])
        grad[..., h:].sub_(gs[..., :h])
        return grad, None, None


def _rope_cos_sin(freqs, mscale: float, dtype: torch.dtype):
    # megatron's rotary embedding returns the same (lru-cached) freqs tensor to every layer and every
    # step: compute its cos / sin in ``dtype`` once and keep them on the tensor (its version counter
    # guards against in-place changes)
    try:
        key = (dtype, float(mscale), freqs._version)
    except RuntimeError:  # inference-mode tensors keep no version counter: no cache
        return (torch.cos(freqs) * mscale).to(dtype), (torch.sin(freqs) * mscale).to(dtype)
    cache = getattr(freqs, "_tessera_cos_sin", None)
    if cache is None:
        cache = freqs._tessera_cos_sin = {}
    if key not in cache:
        cache.clear()
        cache[key] = ((torch.cos(freqs) * mscale).to(dtype), (torch.sin(freqs) * mscale).to(dtype))
    return cache[key]


def patch_rope_without_copies() -> None:
    """Fixes: megatron's unfused ``_apply_rotary_pos_emb_bshd`` copies q and k per layer (neg + cat for
    rotate_half, a ``torch.cat`` with the empty pass-through of a full rotary) and recomputes cos / sin of
    the shared freqs in every layer. Idempotent.

    Why: these copies, forward and backward, cost more than the arithmetic on the CPU; the replacement is
    bit-identical. With the rotary covering the whole head and not interleaved (Chameleon's case),
    ``_RotateHalfRope`` does the arithmetic; any other case (partial rotary, interleaved, MLA) goes to
    megatron's function unchanged."""
    from megatron.core.models.common.embeddings import rope_utils

    original = rope_utils._apply_rotary_pos_emb_bshd
    if getattr(original, "_tessera_rope_patch", False):
        return

    @functools.wraps(original)
    def apply_bshd(t, freqs, rotary_interleaved=False, multi_latent_attention=False, mscale=1.0, **other):
        # ``other``: flags of newer megatron-core releases (mla_rotary_interleaved): any set one is not our case
        if (multi_latent_attention or rotary_interleaved or any(other.values()) or t.shape[-1] != freqs.shape[-1]
                or t.shape[-1] % 2):
            return original(t, freqs, rotary_interleaved=rotary_interleaved,
                            multi_latent_attention=multi_latent_attention, mscale=mscale, **other)
        cos_, sin_ = _rope_cos_sin(freqs, mscale, t.dtype)
        return _RotateHalfRope.apply(t, cos_, sin_)

    apply_bshd._tessera_rope_patch = True
    rope_utils._apply_rotary_pos_emb_bshd = apply_bshd
