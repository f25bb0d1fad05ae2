"""Document-masked attention over packed rows: a token attends only to earlier tokens of its own document.

A packed micro-batch ``tokens [b, s]`` whose rows hold several documents is run the way Megatron-LM runs
packed sequences: flattened to ONE row of ``t = b * s`` tokens in megatron's THD layout, with the
document boundaries as ``cu_seqlens`` (cumulative lengths, int32 ``[n_docs + 1]``, ``cu[0] = 0``,
``cu[-1] = t``) in a ``PackedSeqParams(qkv_format="thd")``. megatron's GPTModel then restarts RoPE at
every document (its THD rotary path), and the core attention masks at the boundaries:

- Transformer Engine's ``TEDotProductAttention`` (the TE spec, GPUs): its packed-sequence kernels
  (``padding_causal`` with ``cu_seqlens``);
- ``tessera.model.attention.SDPAttention`` (the local spec: CPUs, GPUs without TE): one causal attention
  per document (``per_document``), exact.

``forward(model, batch)`` is the training entry point: ``batch`` is what ``tessera.data``'s iterator yields
with ``document_mask`` on (``tokens``, ``position_ids`` ``[b, s]``, ``cu_seqlens``, ``max_seqlen``), or the
trainer's device copy of it (``packed_seq_params`` built on the host, ``cu_seqlens`` moved to the device);
it returns logits ``[b, s, V/TP]`` on the last pipeline stage (the THD row reshaped back), hidden states
``[t, 1, h]`` elsewhere. A batch without boundaries goes through the plain call unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from megatron.core.packed_seq_params import PackedSeqParams


@dataclass
class DocumentPackedSeqParams(PackedSeqParams):
    """``PackedSeqParams`` plus the boundaries as host integers.

    Transformer Engine reads only the base class's fields. The local attention needs the boundaries on
    the host to slice documents; building them here from the data loader's CPU tensor saves a
    device-to-host copy per layer (``cu_seqlens_q.tolist()``) on a GPU."""

    cu_seqlens_host: tuple[int, ...] = ()


def packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: int | torch.Tensor,
                      device: torch.device | str | None = None) -> DocumentPackedSeqParams:
    """THD ``PackedSeqParams`` for self-attention over one packed row (queries and keys share boundaries).

    ``cu_seqlens``: int32 [n_docs + 1] on the host (the batch's); ``max_seqlen``: the longest document (a
    host int or 0-dim tensor: megatron sizes the rotary table from it, so it must be exact: a value equal
    to the row length makes megatron's THD RoPE continue positions across documents)."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    host = tuple(int(x) for x in cu_seqlens.tolist())
    if host[0] != 0 or any(b <= a for a, b in zip(host, host[1:], strict=False)):
        raise ValueError(f"cu_seqlens must start at 0 and strictly increase, got {list(host)[:8]}...")
    longest = max(b - a for a, b in zip(host, host[1:], strict=False))
    max_seqlen = int(max_seqlen)
    if max_seqlen != longest:
        raise ValueError(f"max_seqlen {max_seqlen} != the longest document {longest}")
    cu = cu_seqlens.to(device=device, dtype=torch.int32, non_blocking=True) if device is not None \
        else cu_seqlens.to(torch.int32)
    return DocumentPackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_seqlen,
                                   max_seqlen_kv=max_seqlen, cu_seqlens_host=host)


def host_boundaries(params: PackedSeqParams) -> tuple[int, ...]:
    """The document boundaries of ``params`` as host ints (from ``DocumentPackedSeqParams`` without a copy)."""
    host = getattr(params, "cu_seqlens_host", ())
    if host:
        return tuple(host)
    cu = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
    return tuple(int(x) for x in cu.tolist())


def per_document(attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                 query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 bounds: Sequence[int]) -> torch.Tensor:
    """Causal attention within each document of a THD row, exactly: one ``attend`` call per document.

    query [t, heads, d], key / value [t, kv_heads, d] (megatron's THD layout); ``attend(q, k, v)`` takes
    and returns [1, heads, L, d] for one document of L tokens. Returns [t, heads * d]."""
    t = query.shape[0]
    if bounds[-1] != t:
        raise ValueError(f"cu_seqlens end at {bounds[-1]} but the packed row has {t} tokens")
    outs = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        q, k, v = (x[a:b].permute(1, 0, 2).unsqueeze(0) for x in (query, key, value))
        ctx = attend(q, k, v)  # [1, heads, L, d]
        outs.append(ctx[0].permute(1, 0, 2).reshape(b - a, -1))
    return torch.cat(outs, dim=0)


def forward(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], **kwargs):
    """``model`` (a GPTModel chunk, possibly inside DDP / Float16Module) on one micro-batch.

    Without ``cu_seqlens`` / ``packed_seq_params`` in ``batch``: ``model(tokens, position_ids, None)``, as
    training calls it. With them: the micro-batch flattened to one THD row ``[1, b * s]`` with
    ``PackedSeqParams`` (``batch["packed_seq_params"]`` when the caller built them, e.g. with ``cu_seqlens`` on
    the device and the host copy kept; else built here from ``cu_seqlens`` / ``max_seqlen``); logits come back
    ``[b, s, V/TP]`` on the last stage. Pipeline stages other than the first may get no ``tokens`` (megatron
    feeds them the previous stage's output): the last one takes ``b, s`` from ``labels``. Pipeline schedules
    must be told the row's shape: ``seq_length = b * s, micro_batch_size = 1`` (what stages exchange is
    ``[b * s, 1, hidden]``)."""
    tokens, position_ids = batch.get("tokens"), batch.get("position_ids")
    params = batch.get("packed_seq_params")
    if params is None and "cu_seqlens" not in batch:
        return model(tokens, position_ids, None, **kwargs)
    from megatron.core.utils import get_attr_wrapped_model

    if params is None:
        device = tokens.device if tokens is not None and tokens.device.type != "cpu" else None
        params = packed_seq_params(batch["cu_seqlens"], batch["max_seqlen"], device)
    t = host_boundaries(params)[-1]
    shape = next((tuple(batch[k].shape) for k in ("tokens", "labels") if batch.get(k) is not None), None)
    if shape is not None and shape[0] * shape[1] != t:
        raise ValueError(f"cu_seqlens cover {t} tokens, the micro-batch {shape[0]} x {shape[1]}")
    flat = [None if x is None else x.reshape(1, t) for x in (tokens, position_ids)]
    out = model(*flat, None, packed_seq_params=params, **kwargs)
    if shape is not None and get_attr_wrapped_model(model, "post_process") and out.dim() == 3 \
            and out.shape[:2] == (1, t):
        return out.view(*shape, out.shape[-1])
    return out
