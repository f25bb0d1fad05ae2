"""Where training runs: this process's device, and host tensors copied there without blocking the host."""

from __future__ import annotations

import torch


def training_device() -> torch.device:
    """The device this process trains on: its CUDA device (``init_distributed`` sets it from LOCAL_RANK), else
    the CPU. Collectives use it too (NCCL reduces only CUDA tensors, gloo CPU ones)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; a host tensor bound for CUDA goes through pinned memory without blocking the host
    (the caching host allocator keeps the pinned block alive until the copy is done)."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
