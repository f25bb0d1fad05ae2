"""Where training runs: this process's device, host tensors copied there without blocking the host, and a
clear stop when a job asked for GPUs that torch cannot see."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from tessera.utils import default_device


def training_device() -> torch.device:
    """The device this process trains on: its CUDA device (``init_distributed`` sets it from LOCAL_RANK), else
    the CPU. Collectives use it too (NCCL reduces only CUDA tensors, gloo CPU ones)."""
    return default_device()


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; a host tensor bound for CUDA goes through pinned memory without blocking the host
    (the caching host allocator keeps the pinned block alive until the copy is done)."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class NoGPUError(RuntimeError):
    """The job asked for GPUs but torch sees none: training on the CPU by accident would be ~1000x slower."""


# what a job that asked for GPUs has in its environment: lists of device ids (empty, "-1" or "NoDevFiles":
# none) and Slurm's GPU counts ("0": none; "a100:4" style type:count allowed)
GPU_ID_VARS = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")
GPU_COUNT_VARS = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK")
_NO_IDS = ("", "-1", "NoDevFiles", "none", "(null)")


def gpu_request(environ: Mapping[str, str], backend: str | None = None) -> str | None:
    """Why this job looks like it asked for GPUs (``"CUDA_VISIBLE_DEVICES=0,1"``, ``"backend nccl"``), or None."""
    for var in GPU_ID_VARS:
        value = environ.get(var)
        if value is not None and value.strip() not in _NO_IDS:
            return f"{var}={value}"
    for var in GPU_COUNT_VARS:
        value = environ.get(var)
        if value is not None and value.strip() not in _NO_IDS and value.strip().rsplit(":", 1)[-1] != "0":
            return f"{var}={value}"
    if backend == "nccl":
        return "parallel.backend nccl"
    return None


def require_requested_gpus(environ: Mapping[str, str] | None = None, backend: str | None = None,
                           cuda_available: bool | None = None) -> None:
    """Raise ``NoGPUError`` (one line) when the job asked for GPUs but torch has no CUDA device. A job that
    asked for none (multi-process gloo runs on CPU machines) passes."""
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if cuda:
        return
    reason = gpu_request(os.environ if environ is None else environ, backend)
    if reason is not None:
        raise NoGPUError(f"this job asked for GPUs ({reason}) but torch sees none (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda or 'none'}): install a CUDA build of torch or run "
                         "where GPUs are visible; unset it to train on the CPU")
