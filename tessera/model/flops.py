"""Model FLOPs per token and the GPUs' datasheet peaks: the numerator and the denominator of MFU.

FLOPs per token are MODEL FLOPs of one training step (the Megatron-LM / PaLM convention): 3 x the
forward (backward = 2 x forward), the forward being 2 x every matmul weight (QKV, output projection,
SwiGLU fc1 = gate + up, fc2, and the output layer; not the embedding lookup, not norms) plus the
attention scores and the attention-weighted values, 2 x 2 x s x (heads x head_dim) per layer over the full
s x s matrix (causal masking is not subtracted, recomputation is not added):
``6 x N_matmul + 12 x L x s x (heads x head_dim)``. ``tessera train`` (MFU), ``tessera bench train`` and
``tessera bench plan`` all use these functions.

Peaks are NVIDIA's datasheet DENSE tensor-core figures per GPU (the datasheets print "with sparsity"
figures, twice these): bf16 for bf16 training, TF32 for fp32 training when PyTorch lets fp32 matmuls
use TF32 (``torch.backends.cuda.matmul.allow_tf32`` / ``torch.set_float32_matmul_precision``), plain
FP32 otherwise. There is no CPU table: a CPU's measured matmul peak is below what a training step can
reach (it fuses and overlaps), so the trainer reports no MFU on the CPU unless ``train.peak_flops`` says
what to divide by.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def matmul_parameters(m: Any) -> int:
    """Weights that take part in a matmul per token: every layer's QKV, projection, fc1, fc2 and the
    output layer. ``m``: a ``ModelConfig`` or anything with its shape fields (``num_query_groups`` None
    = one K/V head per query head; ``gated_mlp`` defaults to SwiGLU)."""
    heads = m.num_attention_heads
    head_dim = getattr(m, "kv_channels", None) or m.head_dim
    q, kv = heads * head_dim, (m.num_query_groups or heads) * head_dim
    h, f = m.hidden_size, m.ffn_hidden_size
    per_layer = h * (q + 2 * kv) + q * h + h * f * (2 if getattr(m, "gated_mlp", True) else 1) + f * h
    return m.num_layers * per_layer + m.vocab_size * h


def flops_per_token(m: Any, seq_length: int | None = None) -> float:
    """Training model FLOPs per token: 6 * N_matmul + 12 * L * s * (heads * head_dim)."""
    s = seq_length or m.seq_length
    head_dim = getattr(m, "kv_channels", None) or m.head_dim
    return 6.0 * matmul_parameters(m) + 12.0 * m.num_layers * s * m.num_attention_heads * head_dim


@dataclass(frozen=True)
class GPUPeak:
    """One GPU's datasheet figures: dense TFLOP/s per precision (None: not published) and memory in GB."""

    name: str
    bf16: float
    tf32: float | None
    fp32: float | None
    memory_gb: float


# Sources: NVIDIA A100 (80GB), H100 (SXM, PCIe, NVL), H200 (SXM, NVL), GH200 and HGX B200 datasheets;
# dense = half the "with sparsity" tensor-core figure. B200's plain FP32 rate is not listed here.
GPU_PEAKS: dict[str, GPUPeak] = {
    "a100": GPUPeak("A100", bf16=312.0, tf32=156.0, fp32=19.5, memory_gb=80.0),
    "h100": GPUPeak("H100 SXM", bf16=989.0, tf32=495.0, fp32=67.0, memory_gb=80.0),
    "h100-pcie": GPUPeak("H100 PCIe", bf16=756.0, tf32=378.0, fp32=51.0, memory_gb=80.0),
    "h100-nvl": GPUPeak("H100 NVL", bf16=835.0, tf32=418.0, fp32=60.0, memory_gb=94.0),
    "h200": GPUPeak("H200 SXM", bf16=989.0, tf32=495.0, fp32=67.0, memory_gb=141.0),
    "h200-nvl": GPUPeak("H200 NVL", bf16=835.0, tf32=418.0, fp32=60.0, memory_gb=141.0),
    "gh200": GPUPeak("GH200", bf16=989.0, tf32=495.0, fp32=67.0, memory_gb=96.0),
    "b200": GPUPeak("B200", bf16=2250.0, tf32=1100.0, fp32=None, memory_gb=192.0),
}


def gpu_key(device_name: str) -> str | None:
    """``torch.cuda.get_device_name()`` ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA H100 PCIe",
    ...) -> a ``GPU_PEAKS`` key, None for a GPU not in the table."""
    n = device_name.lower()
    if "gh200" in n:
        return "gh200"
    for gpu in ("h200", "h100"):
        if gpu in n:
            for variant in ("pcie", "nvl"):
                if variant in n and f"{gpu}-{variant}" in GPU_PEAKS:
                    return f"{gpu}-{variant}"
            return gpu
    for gpu in ("b200", "a100"):
        if gpu in n:
            return gpu
    return None


def gpu_peak_flops(device_name: str, precision: str, tf32: bool = False) -> tuple[float, str] | None:
    """(FLOP/s of one GPU, what that figure is) for training in ``precision`` ("bf16" or "fp32"; ``tf32``:
    fp32 matmuls may run as TF32) on the named GPU; None when the table has no figure for it."""
    key = gpu_key(device_name)
    if key is None:
        return None
    peak = GPU_PEAKS[key]
    if precision == "bf16":
        kind, tflops = "bf16", peak.bf16
    elif tf32:
        kind, tflops = "TF32", peak.tf32
    else:
        kind, tflops = "FP32", peak.fp32
    if tflops is None:
        return None
    return tflops * 1e12, f"{peak.name} datasheet dense {kind} peak ({tflops:g} TFLOP/s)"
