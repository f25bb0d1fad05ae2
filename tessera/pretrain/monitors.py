"""Logit-drift monitors: the mean L2 norm of the output logits and the largest attention logit of a step.

Both are measurements only: nothing here changes what the model computes.

* ``logit_norm_sums``: per token, the L2 norm of its logits over the FULL vocabulary (the squares are
  summed over this TP rank's vocabulary slice, then all-reduced over the TP group), summed over the
  loss-mask tokens, with the token count, so micro-batches and DP ranks average correctly.
* ``AttentionLogitProbe``: forward pre-hooks on every ``core_attention`` module (megatron's
  ``DotProductAttention``, our ``SDPAttention``, TE's attention: all take ``query, key [s, b, heads,
  head_dim]`` after QK-norm and RoPE). While armed, each layer recomputes ``max(q . k) * softmax_scale``
  over the positions its mask allows, once per arming (the first micro-batch that reaches it, on
  data-parallel rank 0 only), in chunks of heads so the extra memory stays under 64 MiB. Document-masked
  (THD) micro-batches reach core attention as ``query, key [t, heads, head_dim]`` with the boundaries in
  ``packed_seq_params``: the max is taken document by document, causal within each, with the boundaries'
  host copy (``DocumentPackedSeqParams``), so no layer reads the device. Disarmed, the hooks return at once.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType

from tessera.model.document_mask import host_boundaries

_CHUNK_ELEMENTS = 1 << 24  # fp32 values materialised at once by a monitor: 64 MiB, whatever b, heads, s, V are


@torch.no_grad()
def logit_norm_sums(logits: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over loss-mask tokens of ||logits_token||_2, number of those tokens); logits [b, s, V/TP].
    fp32 sums of squares, a chunk of tokens at a time (no fp32 copy of the whole logits tensor)."""
    flat = logits.reshape(-1, logits.shape[-1])
    rows = max(1, _CHUNK_ELEMENTS // flat.shape[1])
    sq = torch.cat([torch.linalg.vector_norm(flat[i : i + rows], dim=-1, dtype=torch.float32).square()
                    for i in range(0, flat.shape[0], rows)]).view(logits.shape[:-1])
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(sq, group=parallel_state.get_tensor_model_parallel_group())
    mask = loss_mask.to(sq.dtype)
    return (sq.sqrt() * mask).sum(), mask.sum()


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module  # DDP / Float16Module wrappers
    return module


@torch.no_grad()
def max_attention_logit(query: torch.Tensor, key: torch.Tensor, scale: float | None,
                        attention_mask: torch.Tensor | None = None, causal: bool = True) -> torch.Tensor:
    """max over batch, heads and allowed (query, key) pairs of ``scale * q . k``.

    query [sq, b, np, hn], key [sk, b, ng, hn] (megatron's layout; query head i uses key group
    i // (np / ng)); ``attention_mask`` follows megatron (True = masked out, broadcastable to
    [b, np, sq, sk]); without one, ``causal`` masks j > i. The disallowed pairs get -inf through the
    additive input of one ``baddbmm`` per chunk of (batch, head) rows, so each score is written once
    and read once (by the max). Returns a 0-dim fp32 tensor on the inputs' device: the running max stays
    there (no host sync per head chunk or layer)."""
    sq, b, np_, hn = query.shape
    sk, ng = key.shape[0], key.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(hn)
    q = query.float().permute(1, 2, 0, 3)  # [b, np, sq, hn]
    k = key.float().repeat_interleave(np_ // ng, dim=2) if ng != np_ else key.float()
    kt = k.permute(1, 2, 3, 0)  # [b, np, hn, sk]
    if attention_mask is not None:
        m = attention_mask.bool()
        bias = torch.zeros(m.shape, dtype=torch.float32, device=q.device).masked_fill_(m, -math.inf)
        bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))  # [b or 1, np or 1, sq, sk]
    elif causal and sq > 1:
        bias = torch.full((sq, sk), -math.inf, device=q.device).triu_(sk - sq + 1).view(1, 1, sq, sk)
    else:
        bias = torch.zeros((1, 1, 1, 1), device=q.device)
    heads = max(1, _CHUNK_ELEMENTS // (sq * sk))
    best = torch.full((), -math.inf, device=q.device)
    for bi in range(b):
        for h in range(0, np_, heads):
            h1 = min(np_, h + heads)
            cb = bias[bi if bias.shape[0] > 1 else 0]
            cb = (cb[h:h1] if cb.shape[0] > 1 else cb).expand(h1 - h, sq, sk)
            s = torch.baddbmm(cb, q[bi, h:h1], kt[bi, h:h1], alpha=scale)
            best = torch.maximum(best, s.amax())
    return best


@torch.no_grad()
def max_attention_logit_thd(query: torch.Tensor, key: torch.Tensor, scale: float | None,
                            bounds: tuple[int, ...] | list[int]) -> torch.Tensor:
    """``max_attention_logit`` of a THD row, query [t, np, hn], key [t, ng, hn]: each document causal on its
    own (``bounds``: host ints, ``cu_seqlens``); the running max stays on the device."""
    best = torch.full((), -math.inf, device=query.device)
    for a, b in zip(bounds, bounds[1:], strict=False):
        best = torch.maximum(best, max_attention_logit(query[a:b, None], key[a:b, None], scale, None, True))
    return best


class AttentionLogitProbe:
    """``probe = AttentionLogitProbe(model_chunks)``; per step ``probe.arm(on)`` before the forward,
    ``probe.value()`` after it (this rank's max as a 0-dim device tensor, None when nothing was
    recorded); ``close()`` removes the hooks."""

    def __init__(self, model: torch.nn.Module | list[torch.nn.Module]) -> None:
        chunks = model if isinstance(model, list) else [model]
        self.modules = [m for c in chunks for name, m in _unwrap(c).named_modules()
                        if name.endswith("core_attention")]
        self.armed = False
        self._seen: set[int] = set()
        self._max: torch.Tensor | None = None
        self._handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in self.modules]

    def arm(self, on: bool = True) -> None:
        """Record on the next forward of each layer. Only data-parallel rank 0 records, so the figure is the
        max over the step's first GLOBAL micro-batch whatever the DP size (runs compare across layouts)."""
        dp_rank = parallel_state.get_data_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
        self.armed, self._seen, self._max = on and dp_rank == 0, set(), None

    def value(self) -> torch.Tensor | None:
        return self._max

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if not self.armed or id(module) in self._seen:
            return
        self._seen.add(id(module))  # one micro-batch per layer per arming: cheap, and recompute is skipped
        query, key = args[0], args[1]
        mask = args[3] if len(args) > 3 else kwargs.get("attention_mask")
        mask_type = kwargs.get("attn_mask_type") or getattr(module, "attn_mask_type", AttnMaskType.causal)
        causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        scale = getattr(module, "softmax_scale", None)
        packed = kwargs.get("packed_seq_params", args[6] if len(args) > 6 else None)
        if packed is not None and packed.qkv_format == "thd":
            m = max_attention_logit_thd(query, key, scale, host_boundaries(packed))
        else:
            m = max_attention_logit(query, key, scale, mask, causal)
        self._max = m if self._max is None else torch.maximum(self._max, m)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
