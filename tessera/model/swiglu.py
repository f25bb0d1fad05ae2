"""The MLP's activation: ``swiglu([gate; up]) = silu(gate) * up`` on the whole ``linear_fc1`` output.

One autograd function with one new buffer each way, in megatron's ``MLP`` through
``MLPSubmodules.activation_func`` (``config.use_te_activation_func`` is megatron's switch for "the spec
supplies the activation module"; nothing here needs Transformer Engine).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class _SwiGLUFunction(torch.autograd.Function):
    """``silu(gate) * up`` of ``x = [gate; up]`` (last dim) with one new buffer each way.

    megatron's unfused GLU (``silu(x_glu) * (x_linear + glu_linear_offset)``) allocates the silu, the
    ``+ 0.0`` and the product in the forward, and in the backward two products, silu's gradient and the
    ``torch.cat`` that joins the halves' gradients; on the CPU each fresh temporary costs about as much
    as the arithmetic. Here the forward keeps only its input, and the backward writes ``[dgate; dup]``
    over that input (the fc1 output, which nothing else needs by then; were it saved elsewhere too,
    autograd's version check would raise instead of computing with the overwritten values) with one
    temporary. Same operations on the same values as autograd's (``silu_backward(g * up, gate)`` and
    ``g * silu(gate)``), so the results match bit for bit, up to the sign of zero (the ``+ 0.0`` turned
    -0.0 into +0.0)."""

    @staticmethod
    def forward(ctx, x):
        gate, up = torch.chunk(x, 2, dim=-1)
        out = F.silu(gate)
        out.mul_(up)
        ctx.save_for_backward(x)
        # only an intermediate result may be overwritten, never a leaf (or a view of one) the caller holds
        root = x if x._base is None else x._base
        ctx.overwrite = root.grad_fn is not None
        return out

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        dx = x if ctx.overwrite else x.clone(memory_format=torch.contiguous_format)
        gate, up = torch.chunk(dx, 2, dim=-1)
        silu = F.silu(gate)
        up.mul_(g)  # g * up: silu's incoming gradient
        torch.ops.aten.silu_backward.grad_input(up, gate, grad_input=gate)  # dgate, elementwise over gate
        torch.mul(g, silu, out=up)  # dup
        return dx


class SwiGLU(MegatronModule):
    """The MLP's activation as one module on the whole ``linear_fc1`` output [..., 2 * ffn/TP]:
    ``silu(gate) * up`` with gate / up the first / second half (megatron's ``[gate; up]`` layout,
    per TP rank). The MLP class, its TP group and its sharded state dict stay megatron's."""

    def __init__(self, config: TransformerConfig, **_: Any):
        super().__init__(config=config)
        if not (config.gated_linear_unit and config.activation_func is F.silu):
            raise ValueError("SwiGLU needs config.gated_linear_unit=True and activation_func=F.silu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2:
            raise ValueError(f"SwiGLU expects [..., 2 * ffn] (gate; up), got last dim {x.shape[-1]}")
        return _SwiGLUFunction.apply(x)
