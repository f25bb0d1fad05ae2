"""The local spec's core attention: ``softmax(q k^T * scale + causal mask) v`` through
``torch.nn.functional.scaled_dot_product_attention``, or ``tessera/kernels/cpu_attention.c`` on the CPU
where that kernel is the faster path (``prefer_cpu_kernel``). Packed rows in megatron's THD layout
(``PackedSeqParams``, ``tessera.model.document_mask``) get one causal attention per document.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from tessera.kernels import cpu_attention
from tessera.model import document_mask

CPU_ATTENTION_ENV = "TESSERA_CPU_ATTENTION"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as Linux lists them in /proc/cpuinfo (empty where there is no such file)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def prefer_cpu_kernel(dtype: torch.dtype, flags: frozenset[str] | None = None) -> bool:
    """Whether CPU attention in ``dtype`` goes to cpu_attention.c (where it covers the call) instead of SDPA.

    The rule: the C kernel, except bf16 on a CPU with AMX-BF16, where SDPA's flash kernel runs its bf16
    block products on AMX tiles and the C kernel (AVX-512) does not (docs/benchmarks.md has both CPUs).
    ``TESSERA_CPU_ATTENTION=1`` uses the kernel wherever it covers the call, ``=0`` never."""
    env = os.environ.get(CPU_ATTENTION_ENV)
    if env in ("0", "1"):
        return env == "1"
    flags = cpu_flags() if flags is None else flags
    return not (dtype == torch.bfloat16 and "amx_bf16" in flags)


class SDPAttention(DotProductAttention):
    """megatron's local core attention through ``torch.nn.functional.scaled_dot_product_attention``.

    megatron's ``DotProductAttention`` materialises the [b, heads, s, s] scores and runs several
    elementwise passes over them; SDPA's fused (flash) kernels never build that matrix. On the CPU,
    ``prefer_cpu_kernel`` decides between SDPA and tessera/kernels/cpu_attention.c. Same constructor,
    same ``softmax_scale``, same dropout RNG (megatron's tracker). Packed documents (THD ``PackedSeqParams``,
    causal) are attended one document at a time through the same kernels, which is exact; anything else SDPA
    cannot express here (explicit masks, biases, KV-cache shapes) goes to megatron's implementation.
    """

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if (packed_seq_params is not None and packed_seq_params.qkv_format == "thd" and attention_mask is None
                and attention_bias is None and getattr(self, "softmax_offset", None) is None
                and mask_type == AttnMaskType.causal):
            # packed documents (tessera.model.document_mask): [t, heads, d], causal within each document
            return document_mask.per_document(lambda q, k, v: self._attend(q, k, v, True), query, key, value,
                                              document_mask.host_boundaries(packed_seq_params))
        if (attention_mask is not None or attention_bias is not None or packed_seq_params is not None
                or getattr(self, "softmax_offset", None) is not None or query.shape[0] != key.shape[0]
                or mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask)):
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        sq, b, np_, hn = query.shape
        # [s, b, heads, hn] -> [b, heads, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        ctx = self._attend(q, k, v, mask_type == AttnMaskType.causal and sq > 1)
        return ctx.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)

    def _attend(self, q, k, v, causal: bool):
        """q [b, heads, s, hn], k / v [b, kv_heads, s, hn] -> [b, heads, s, hn]: the C kernel or SDPA."""
        p = self.attention_dropout.p if self.training else 0.0
        if q.device.type == "cpu":
            if torch.is_autocast_enabled("cpu"):  # SDPA's autocast rule: run in the autocast dtype
                dtype = torch.get_autocast_dtype("cpu")
                q, k, v = (t.to(dtype) for t in (q, k, v))
            if prefer_cpu_kernel(q.dtype) and cpu_attention.supports(q, k, v, p):
                return cpu_attention.attention(q, k, v, causal=causal, scale=self.softmax_scale)
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if p > 0 and not self.config.sequence_parallel \
            else contextlib.nullcontext()
        with rng:
            return F.scaled_dot_product_attention(
                q, k, v, dropout_p=p, is_causal=causal,
                scale=self.softmax_scale, enable_gqa=k.shape[1] != q.shape[1],
            )
