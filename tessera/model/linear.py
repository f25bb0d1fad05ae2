"""The local spec's layer linears: ``y = x W^T``, as ``F.linear`` when one TP rank holds all of W.

megatron's ColumnParallelLinear / RowParallelLinear route even a single rank through Python autograd
functions (the linear's and the identity TP-region copies), which cost more than small matmuls on the
CPU; with one TP rank and nothing else that needs them, the same matmuls run through ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel


def row_major(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a view with the row-major strides of its shape. megatron's ``[b, s, h] -> [s, b, h]``
    transpose with ``b = 1`` leaves a contiguous tensor whose size-1 dim keeps a stride of ``s * h``
    (``.contiguous()`` keeps it too); bf16 ``F.linear`` outside autograd (frozen weights and input: LoRA's
    base layers, generation) takes a far slower CPU kernel for such strides. A view: no copy."""
    return x.view(x.shape) if x.is_contiguous() else x


def single_rank_plain(linear) -> bool:
    """True when megatron's parallel linear reduces to ``F.linear(x, weight)``: one TP rank, no bias,
    no sequence parallelism, expert communication, fused / deferred weight gradients or offloading."""
    cfg = linear.config
    return (linear.bias is None and linear.tp_group.size() == 1 and not linear.sequence_parallel
            and not linear.explicit_expert_comm and not linear.gradient_accumulation_fusion
            and not cfg.defer_embedding_wgrad_compute and cfg._cpu_offloading_context is None)


class SingleRankColumnParallelLinear(tensor_parallel.ColumnParallelLinear):
    """megatron's ColumnParallelLinear; with one TP rank (and nothing else that needs megatron's own
    autograd function) its forward is ``F.linear``: the same matmuls forward and backward. Any other
    case, or an explicit ``weight``, is megatron's forward."""

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if weight is None and single_rank_plain(self):
            return F.linear(row_major(input_), self.weight), None
        return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)


class SingleRankRowParallelLinear(tensor_parallel.RowParallelLinear):
    """megatron's RowParallelLinear, ``F.linear`` with one TP rank (see SingleRankColumnParallelLinear)."""

    def forward(self, input_):
        if single_rank_plain(self):
            return F.linear(row_major(input_), self.weight), None
        return super().forward(input_)
