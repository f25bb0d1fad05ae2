"""Which implementation runs: Triton kernels or the plain-PyTorch references.

``auto`` picks Triton for CUDA tensors when triton imports, the reference otherwise. ``triton`` on
CPU tensors needs the Triton interpreter (``TRITON_INTERPRET=1``); ``use_triton_interpreter()``
turns it on for the current process and re-decorates the kernels (``triton.jit`` decides between
compiled and interpreted at decoration time, so kernels imported earlier must be rebuilt).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Literal

import torch

Backend = Literal["auto", "triton", "reference"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "reference")

# Modules that hold nothing but @triton.jit functions; reloading them re-decorates the kernels.
_KERNEL_MODULES = ("tessera.kernels._sampling_triton", "tessera.kernels._ce_triton")


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails on import
        return False
    return True


def interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _kernels_interpreted() -> bool:
    """Every kernel module written so far is decorated for the interpreter (one imported before
    TRITON_INTERPRET was set would still hold compiled kernels)."""
    from triton.runtime.interpreter import InterpretedFunction

    from . import _ce_triton, _sampling_triton

    return all(isinstance(k, InterpretedFunction) for k in (_sampling_triton.sample_step_kernel,
                                                             _ce_triton.ce_forward_kernel,
                                                             _ce_triton.ce_backward_kernel))


def use_triton_interpreter() -> None:
    """Run the Triton kernels on the CPU through triton's interpreter (tests, debugging)."""
    os.environ["TRITON_INTERPRET"] = "1"
    if not _kernels_interpreted():
        for name in _KERNEL_MODULES:
            # Kernel modules not written yet (the cross-entropy kernel) are skipped, not an error.
            if importlib.util.find_spec(name) is not None:
                importlib.reload(importlib.import_module(name))


def resolve_backend(backend: str, tensor: torch.Tensor, what: str) -> str:
    """'triton' or 'reference' for ``tensor``; a clear error when Triton was asked for and cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"{what}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    if backend == "auto":
        return "triton" if tensor.is_cuda and triton_importable() else "reference"
    if not triton_importable():
        raise RuntimeError(f"{what}: backend='triton' but triton does not import")
    if not tensor.is_cuda:
        if not interpreter_requested():
            raise RuntimeError(
                f"{what}: backend='triton' on a {tensor.device} tensor needs the Triton interpreter; "
                "call tessera.kernels.use_triton_interpreter() (or set TRITON_INTERPRET=1) first"
            )
        if not _kernels_interpreted():
            use_triton_interpreter()
        if not _stdlib_interpreted():
            raise RuntimeError(
                f"{what}: backend='triton' on CPU: triton was imported before the interpreter was switched on, so "
                "its own library functions (tl.max, tl.sum) stay compiled and cannot run on the CPU; set "
                "TRITON_INTERPRET=1 before anything imports triton"
            )
    return "triton"


def _stdlib_interpreted() -> bool:
    # triton.language's @jit helpers are decorated once, when triton is imported; they cannot be re-decorated.
    import triton.language.standard as tl_std
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl_std.max, InterpretedFunction)
