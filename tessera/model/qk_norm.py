"""Chameleon's per-head QK-norm: ``y[h] = (x[h] - mean(x[h])) / sqrt(var(x[h]) + eps) * weight[h] + bias[h]``
for every query (key) head h, over head_dim.

The spec puts it in megatron's ``q_layernorm`` / ``k_layernorm`` slots, which SelfAttention applies after
the QKV projection and before RoPE.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint


class PerHeadLayerNorm(MegatronModule):
    """LayerNorm over head_dim with a separate affine (weight AND bias) per head: transformers'
    ``ChameleonLayerNorm`` for ``q_norm`` / ``k_norm``.

    megatron's ``qk_layernorm`` shares one [head_dim] weight across heads; Chameleon learns
    [heads, head_dim]. The parameters are split across TP ranks with the heads (dim 0), and the
    sharded state dict says so, so dist_checkpointing reshards them like the QKV projection.
    ``role`` is "query" (num_attention_heads rows) or "key" (num_query_groups rows).
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, role: str = "query", **_: Any):
        super().__init__(config=config)
        if role not in ("query", "key"):
            raise ValueError(f"PerHeadLayerNorm role must be 'query' or 'key', got {role!r}")
        heads = config.num_attention_heads if role == "query" else (config.num_query_groups or config.num_attention_heads)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if heads % tp:
            raise ValueError(f"{role} heads {heads} are not divisible by tensor parallel size {tp}")
        self.role, self.eps, self.head_dim = role, eps, hidden_size
        self.heads_per_partition = heads // tp
        device = None if config.use_cpu_initialization or not torch.cuda.is_available() else torch.cuda.current_device()
        shape = (self.heads_per_partition, hidden_size)
        self.weight = torch.nn.Parameter(torch.ones(shape, dtype=config.params_dtype, device=device))
        self.bias = torch.nn.Parameter(torch.zeros(shape, dtype=config.params_dtype, device=device))
        for p in (self.weight, self.bias):
            set_tensor_model_parallel_attributes(p, is_parallel=True, dim=0, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., heads_per_partition, head_dim] (megatron passes [s, b, heads, head_dim])."""
        if x.shape[-2:] != self.weight.shape:
            raise ValueError(f"{self.role} norm expects [..., {self.heads_per_partition}, {self.head_dim}], got {tuple(x.shape)}")
        return F.layer_norm(x, (self.head_dim,), None, None, self.eps) * self.weight + self.bias

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state_dict, prefix, {"weight": 0, "bias": 0}, sharded_offsets)

    def extra_repr(self) -> str:
        return f"{self.role}: heads={self.heads_per_partition}, head_dim={self.head_dim}, eps={self.eps}"
