"""Start and stop megatron's parallel state: torch.distributed (NCCL on GPU, gloo on CPU), the TP/PP
groups, and megatron's model-parallel RNG seeds."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from tessera.model.cpu import enable_cpu_compat
from tessera.utils import launch_env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> None:
    """``torch.distributed`` from torchrun's env:// variables, or a 1-process group on a free port."""
    if dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    timeout = timedelta(seconds=timeout_s)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if cuda:
            torch.cuda.set_device(launch_env()[2])  # the local rank
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    else:
        dist.init_process_group(
            backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1, timeout=timeout
        )


def initialize_parallel(tp: int = 1, pp: int = 1, vp: int | None = None, seed: int = 1234) -> None:
    """torch.distributed + megatron ``parallel_state`` (TP x PP x DP over all ranks) + RNG seeds.

    Re-initialises megatron's groups if they exist with another layout. Data parallel size is
    ``world_size / (tp * pp)``.
    """
    from megatron.core import parallel_state, tensor_parallel

    enable_cpu_compat()
    init_distributed()
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by tp * pp = {tp} * {pp}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vp if (vp or 1) > 1 else None,
    )
    # Same seed for every rank's default generator; megatron adds +2718 + tp_rank for TP-split weights.
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def ensure_single_process() -> None:
    """A 1-process (TP=1, PP=1) parallel state unless one already exists (inference, tools)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        initialize_parallel(1, 1)
    else:
        enable_cpu_compat()


def destroy_parallel() -> None:
    """Tear down megatron's groups and the process group (if this process started one)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
