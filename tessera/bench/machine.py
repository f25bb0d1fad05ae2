"""The machine a benchmark ran on, with its measured peaks.

MFU and bandwidth floors are quoted against what THIS machine does, not a datasheet: the matmul
peak is the best of a few large square matmuls, the copy bandwidth the best of a few large
``Tensor.copy_`` calls counted the STREAM way (bytes read + bytes written).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

import torch

from tessera.model.flops import GPU_PEAKS
from tessera.utils import default_device

# Datasheet dense bf16 peaks (TFLOP/s) and memory, for `tessera bench plan --gpu`: the one table is
# tessera.model.flops.GPU_PEAKS (the trainer's MFU reads it too).
GPU_PEAK_BF16_TFLOPS: dict[str, float] = {k: g.bf16 for k, g in GPU_PEAKS.items()}
GPU_MEMORY_GB: dict[str, float] = {k: g.memory_gb for k, g in GPU_PEAKS.items()}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], device: torch.device, min_repeats: int = 3, seconds: float = 0.5) -> float:
    """Best wall time of ``fn`` over at least ``min_repeats`` calls and about ``seconds`` in total
    (after one warm-up call). The best, not the mean: we want what the hardware can do."""
    fn()
    _sync(device)
    best = float("inf")
    start = time.perf_counter()
    n = 0
    while n < min_repeats or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
        n += 1
    return best


def interleaved_best_times(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int = 3, seconds: float = 0.0
) -> dict[str, list[float]]:
    """Wall times of several functions measured round-robin (a, b, a, b, ...) after one warm-up call
    each, so load from other processes on a shared machine hits every side alike. Returns all times;
    callers report the best (what the hardware can do) and the median."""
    for fn in fns.values():
        fn()
        _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    n = 0
    while n < repeats or time.perf_counter() - start < seconds:
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
        n += 1
    return times


def measure_matmul_tflops(
    dtype: torch.dtype = torch.float32, size: int | None = None, device: str | torch.device | None = None, seconds: float = 0.5
) -> float:
    """Measured dense matmul throughput in TFLOP/s (2*n^3 FLOPs per n x n @ n x n)."""
    device = default_device(device or None)
    n = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    t = best_time(lambda: torch.matmul(a, b, out=out), device, seconds=seconds)
    return 2.0 * n**3 / t / 1e12


def measure_copy_gbps(megabytes: int | None = None, device: str | torch.device | None = None, seconds: float = 0.5) -> float:
    """Measured memory bandwidth in GB/s of ``dst.copy_(src)``, counting read + write bytes (STREAM 'copy')."""
    device = default_device(device or None)
    mb = megabytes or (1024 if device.type == "cuda" else 256)  # far beyond any CPU cache
    n = mb * 2**20 // 4
    src = torch.ones(n, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = best_time(lambda: dst.copy_(src), device, seconds=seconds)
    return 2.0 * n * 4 / t / 1e9


def describe_machine(measure: bool = True, device: str | torch.device | None = None, seconds: float = 0.5) -> dict:
    """CPU model, cores, torch version, GPU name if any and (with ``measure``) the measured peaks."""
    device = default_device(device or None)
    info: dict = {
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "gpu_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "device": str(device),
        # other processes share this machine: the 1-minute load average says how busy it was
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if measure:
        info["matmul_tflops_fp32"] = measure_matmul_tflops(torch.float32, device=device, seconds=seconds)
        info["matmul_tflops_bf16"] = measure_matmul_tflops(torch.bfloat16, device=device, seconds=seconds)
        info["copy_gbps"] = measure_copy_gbps(device=device, seconds=seconds)
    return info


def peak_tflops(machine: dict, dtype: torch.dtype) -> float:
    """The measured peak for ``dtype`` from a ``describe_machine`` dict (fp32 for anything not bf16/fp16)."""
    key = "matmul_tflops_bf16" if dtype in (torch.bfloat16, torch.float16) else "matmul_tflops_fp32"
    if key not in machine:
        raise KeyError(f"machine description has no measured {key}; call describe_machine(measure=True)")
    return float(machine[key])
