"""The KV-cached decoder's norms as direct functional calls in the decoding dtype (private copies of the
model's tables; the model is left untouched), and the decoder's error type. Apart from decoder.py so the
fused CPU step (cpu_step.py) can read them without importing the decoder.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class DecoderError(RuntimeError):
    pass


def is_identity(module: nn.Module | None) -> bool:
    return module is None or type(module).__name__ in ("IdentityOp", "IdentityFuncOp", "Identity")


def cast_module(module: nn.Module | None, dtype: torch.dtype, device: torch.device) -> nn.Module | None:
    """A private copy of a (small) norm module in the decoding dtype; the model is left untouched."""
    if is_identity(module):
        return None
    return copy.deepcopy(module).to(device=device, dtype=dtype).eval()


class RMSNormCall:
    """torch's RMSNorm as a direct ``F.rms_norm`` call (no nn.Module dispatch: 13 calls a step)."""

    def __init__(self, module: nn.RMSNorm, dtype: torch.dtype, device: torch.device) -> None:
        self.weight = module.weight.detach().to(device=device, dtype=dtype, copy=True)  # private copy
        self.shape, self.eps = tuple(module.normalized_shape), module.eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.shape, self.weight, self.eps)


class AffineNormCall:
    """RMSNorm / LayerNorm from raw tables (weight, optional bias, eps): Transformer Engine's norms, fused
    into ``linear_qkv`` / ``linear_fc1`` (``layer_norm_weight`` / ``layer_norm_bias``) or standalone
    (``TENorm``). ``zero_centered_gamma`` stores gamma - 1, so the applied weight is 1 + stored."""

    def __init__(self, kind: str, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
                 zero_centered: bool, dtype: torch.dtype, device: torch.device, where: str) -> None:
        if kind not in ("RMSNorm", "LayerNorm"):
            raise DecoderError(f"{where}: unsupported normalization {kind!r} (expected RMSNorm or LayerNorm)")
        w = weight.detach().to(device=device, dtype=torch.float32)
        self.weight = ((w + 1) if zero_centered else w).to(dtype)  # private copy either way
        self.bias = None if bias is None or not bias.numel() else bias.detach().to(device=device, dtype=dtype, copy=True)
        if kind == "RMSNorm" and self.bias is not None:
            raise DecoderError(f"{where}: RMSNorm with a bias is not supported")
        self.kind, self.shape, self.eps = kind, (weight.shape[-1],), float(eps)

    @classmethod
    def from_te(cls, module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                device: torch.device, where: str) -> AffineNormCall:
        """A Transformer Engine norm's tables: ``module`` carries ``normalization`` (or is named by its
        class), ``eps`` and ``zero_centered_gamma``; ``weight`` / ``bias`` are its (fused or own) tables."""
        eps = getattr(module, "eps", None)
        if eps is None:
            raise DecoderError(f"{where}: Transformer Engine norm without an eps attribute ({type(module).__name__})")
        return cls(te_kind(module), weight, bias, eps, bool(getattr(module, "zero_centered_gamma", False)),
                   dtype, device, where)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "RMSNorm":
            return F.rms_norm(x, self.shape, self.weight, self.eps)
        return F.layer_norm(x, self.shape, self.weight, self.bias, self.eps)


def te_kind(module: nn.Module) -> str:
    """TE modules say ``normalization``; a standalone TE norm is named by its class."""
    return str(getattr(module, "normalization", None) or type(module).__name__)


def fused_norm(linear: nn.Module, dtype: torch.dtype, device: torch.device, where: str) -> AffineNormCall | None:
    """The pre-norm that Transformer Engine fused into a LayerNorm+Linear (``TELayerNormColumnParallelLinear``:
    its ``layer_norm_weight``, ``layer_norm_bias``, ``normalization``, ``eps``, ``zero_centered_gamma``),
    or None for a plain linear."""
    w = getattr(linear, "layer_norm_weight", None)
    if w is None:
        return None
    return AffineNormCall.from_te(linear, w, getattr(linear, "layer_norm_bias", None), dtype, device, where)


def norm_callable(module: nn.Module | None, dtype: torch.dtype, device: torch.device) -> Callable | None:
    """A norm as a callable in ``dtype`` (the model's module is left untouched)."""
    if is_identity(module):
        return None
    if type(module) is nn.RMSNorm and module.weight is not None:
        return RMSNormCall(module, dtype, device)
    if type(module).__module__.startswith("transformer_engine") and te_kind(module) in ("RMSNorm", "LayerNorm"):
        # TENorm returns TE's own RMSNorm/LayerNorm (CUDA-only kernels): the same maths from its tables.
        return AffineNormCall.from_te(module, module.weight, getattr(module, "bias", None), dtype, device,
                                      type(module).__name__)
    return cast_module(module, dtype, device)
