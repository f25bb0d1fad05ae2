"""Which layer implementations a built model runs (linear, norm, core attention) and why, said on rank 0
once per process: ``build_model`` calls ``report_once``.

Read off the built modules, not predicted: what the banner names is what the forward calls (per-call
fallbacks are named with it).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TextIO

import torch

from tessera.utils import rank, short_dtype_name

_reported = False


@dataclass(frozen=True)
class Implementations:
    spec: str  # "Transformer Engine" or "local"
    why: str
    linear: str
    norm: str
    core_attention: str

    def lines(self) -> list[str]:
        return [
            f"[model] layer implementations: {self.spec} spec ({self.why})",
            f"[model]   linear:         {self.linear}",
            f"[model]   norm:           {self.norm}",
            f"[model]   core attention: {self.core_attention}",
        ]


def _cpu_attention(dtype: torch.dtype) -> str:
    from tessera.kernels import _cbuild, cpu_attention
    from tessera.model.attention import CPU_ATTENTION_ENV, cpu_flags, prefer_cpu_kernel

    if os.environ.get(CPU_ATTENTION_ENV) == "0":
        return f"SDPA ({CPU_ATTENTION_ENV}=0)"
    unavailable = cpu_attention.unavailable_reason() or (None if _cbuild.compiler() else "no C compiler")
    if unavailable:
        return f"SDPA (cpu_attention.c unavailable: {unavailable})"
    kernel = [short_dtype_name(dt) for dt in (torch.float32, torch.bfloat16) if prefer_cpu_kernel(dt)]
    sdpa = [name for name in ("fp32", "bf16") if name not in kernel]
    parts = []
    if kernel:
        parts.append(f"cpu_attention.c in {' and '.join(kernel)}")
    if sdpa:
        amx = " (AMX-BF16 CPU: SDPA is the faster path)" if sdpa == ["bf16"] and "amx_bf16" in cpu_flags() else ""
        parts.append(f"SDPA in {' and '.join(sdpa)}{amx}")
    return (", ".join(parts) + f" (this model: {str(dtype).removeprefix('torch.')})"
            + (", SDPA where the kernel does not cover the call" if kernel else ""))


def _name(module: torch.nn.Module) -> str:
    cls = type(module)
    if cls.__module__.startswith("transformer_engine"):
        return f"Transformer Engine {cls.__name__}"
    if cls.__module__.startswith("torch.nn"):
        return f"torch.nn.{cls.__name__}"
    return cls.__name__


def describe(model: torch.nn.Module, why: str) -> Implementations:
    """The implementations of ``model``'s decoder layers (its first layer; they are all built from one spec)."""
    from tessera.model.attention import SDPAttention
    from tessera.model.linear import SingleRankColumnParallelLinear, single_rank_plain

    layer = model.decoder.layers[0]
    qkv, proj = layer.self_attention.linear_qkv, layer.self_attention.linear_proj
    te = type(qkv).__name__.startswith("TE")
    if te:
        linear = f"Transformer Engine ({type(qkv).__name__}, {type(proj).__name__})"
    elif isinstance(qkv, SingleRankColumnParallelLinear) and single_rank_plain(qkv):
        linear = "F.linear (one tensor-parallel rank; megatron's parallel linears otherwise)"
    else:
        linear = f"megatron {type(qkv).__name__} / {type(proj).__name__}"

    if hasattr(qkv, "layer_norm_weight"):
        norm = f"fused into {type(qkv).__name__} (Transformer Engine)"
    else:
        norm = _name(getattr(layer, "post_self_attn_layernorm", layer.input_layernorm))  # Swin: on the outputs
    if model.decoder.final_layernorm is not None:
        norm += f"; final norm: {_name(model.decoder.final_layernorm)}"
    if type(layer.self_attention.q_layernorm).__name__ == "PerHeadLayerNorm":
        norm += "; QK-norm: PerHeadLayerNorm (torch)"

    core = layer.self_attention.core_attention
    param = next(model.parameters())
    if type(core).__name__.startswith("TE"):
        attention = "Transformer Engine DotProductAttention (flash / cuDNN fused / unfused, TE's choice per call)"
    elif isinstance(core, SDPAttention):
        first = "torch SDPA (flash / memory-efficient kernels)" if param.device.type == "cuda" else _cpu_attention(param.dtype)
        attention = f"{first}; packed documents (THD) one causal call per document; megatron's DotProductAttention for explicit masks"
    else:
        attention = f"megatron {type(core).__name__}"
    return Implementations(spec="Transformer Engine" if te else "local", why=why, linear=linear, norm=norm,
                           core_attention=attention)


def report_once(model: torch.nn.Module, why: str, stream: TextIO | None = None) -> bool:
    """Print ``describe(model)`` on global rank 0, the first time a model is built in this process.
    Returns whether it printed."""
    global _reported
    if _reported:
        return False
    if rank() != 0:
        return False
    _reported = True
    print("\n".join(describe(model, why).lines()), file=stream or sys.stderr, flush=True)
    return True
