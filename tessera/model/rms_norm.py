"""The local layers' RMSNorm: ``y = x / sqrt(mean(x^2) + eps) * weight`` over the hidden dimension.

A plain ``torch.nn.RMSNorm`` (the generation decoder reads it as one), built the way megatron's
``WrappedTorchNorm`` builds it, but whose weight carries megatron's ``sequence_parallel`` attribute: under
sequence parallelism each TP rank norms a slice of the sequence, and ``finalize_model_grads`` sums the
gradients of weights marked so over the TP group. megatron's own local choices cannot serve here:
``WrappedTorchNorm`` refuses sequence parallelism, and apex's ``FusedLayerNorm`` (picked where apex is
installed) is LayerNorm only.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm:
    """``RMSNorm(config, hidden_size, eps)`` returns a ``torch.nn.RMSNorm`` (``__new__``, as megatron's
    ``WrappedTorchNorm``), so module specs can name it like any megatron norm."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: Any) -> torch.nn.RMSNorm:
        if config.normalization != "RMSNorm":
            raise ValueError(f"tessera's local norm is RMSNorm, the config asks for {config.normalization}")
        norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        norm.weight.sequence_parallel = config.sequence_parallel
        return norm
