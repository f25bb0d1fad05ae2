"""The Chameleon pieces megatron-core lacks: per-head QK-norm and the Swin-style norm placement (and the local
layers' fast paths: an RMSNorm that works with sequence parallelism, SwiGLU, single-rank linears, SDPA)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from tessera.kernels import cpu_attention


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


class RMSNorm:
    """The local (non-Transformer-Engine) RMSNorm: a ``torch.nn.RMSNorm``, built as megatron's
    ``WrappedTorchNorm`` builds it (``__new__`` returns the torch module itself), whose weight also carries
    megatron's ``sequence_parallel`` attribute, so that under sequence parallelism ``finalize_model_grads``
    sums its gradient over the TP ranks (each normed a slice of the sequence). megatron's local choices
    cannot do RMSNorm with sequence parallelism (``WrappedTorchNorm`` refuses it) or RMSNorm at all where
    apex is installed (``FusedLayerNorm`` is LayerNorm only)."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: Any) -> torch.nn.RMSNorm:
        if config.normalization != "RMSNorm":
            raise ValueError(f"tessera's local norm is RMSNorm, the config asks for {config.normalization}")
        norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        norm.weight.sequence_parallel = config.sequence_parallel
        return norm


def single_rank_plain(linear) -> bool:
    """True when megatron's parallel linear reduces to ``F.linear(x, weight)``: one TP rank, no bias,
    no sequence parallelism, expert communication, fused / deferred weight gradients or offloading."""
    cfg = linear.config
    return (linear.bias is None and linear.tp_group.size() == 1 and not linear.sequence_parallel
            and not linear.explicit_expert_comm and not linear.gradient_accumulation_fusion
            and not cfg.defer_embedding_wgrad_compute and cfg._cpu_offloading_context is None)


class SingleRankColumnParallelLinear(tensor_parallel.ColumnParallelLinear):
    """megatron's ColumnParallelLinear; with one TP rank (and nothing else that needs megatron's own
    autograd function) its forward is ``F.linear``: the same matmuls forward and backward, without
    the Python autograd functions (the linear's and the identity TP-region copies) that cost more
    than small matmuls on the CPU. Any other case, or an explicit ``weight``, is megatron's forward."""

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if weight is None and single_rank_plain(self):
            return F.linear(input_, self.weight), None
        return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)


class SingleRankRowParallelLinear(tensor_parallel.RowParallelLinear):
    """megatron's RowParallelLinear, ``F.linear`` with one TP rank (see SingleRankColumnParallelLinear)."""

    def forward(self, input_):
        if single_rank_plain(self):
            return F.linear(input_, self.weight), None
        return super().forward(input_)


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
    per TP rank). The spec hands it to megatron's ``MLP`` through ``MLPSubmodules.activation_func``,
    which ``MLP`` uses when ``config.use_te_activation_func`` is set (the flag means "the spec supplies
    the activation module"; nothing here needs Transformer Engine), so the MLP class, its TP group and
    its sharded state dict stay megatron's."""

    def __init__(self, config: TransformerConfig, **_: Any):
        super().__init__(config=config)
        if not (config.gated_linear_unit and config.activation_func is F.silu):
            raise ValueError("SwiGLU needs config.gated_linear_unit=True and activation_func=F.silu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2:
            raise ValueError(f"SwiGLU expects [..., 2 * ffn] (gate; up), got last dim {x.shape[-1]}")
        return _SwiGLUFunction.apply(x)


@dataclass
class SwinNormTransformerLayerSubmodules(TransformerLayerSubmodules):
    post_self_attn_layernorm: ModuleSpec | type = IdentityOp
    post_mlp_layernorm: ModuleSpec | type = IdentityOp


class SwinNormTransformerLayer(TransformerLayer):
    """Chameleon-34B's norm reordering: ``h = x + drop(norm(attn(x))); out = h + drop(norm(mlp(h)))``.

    The spec leaves ``input_layernorm`` / ``pre_mlp_layernorm`` as identities and supplies
    ``post_self_attn_layernorm`` / ``post_mlp_layernorm``; they are applied to each branch output
    inside megatron's bias-dropout-add, so everything else (recompute, pipelining) is megatron's.
    """

    def __init__(self, config: TransformerConfig, submodules: SwinNormTransformerLayerSubmodules, *args, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        norm_kwargs = dict(config=self.config, hidden_size=self.config.hidden_size, eps=self.config.layernorm_epsilon)
        self.post_self_attn_layernorm = build_module(submodules.post_self_attn_layernorm, **norm_kwargs)
        self.post_mlp_layernorm = build_module(submodules.post_mlp_layernorm, **norm_kwargs)
        self._attn_bda, self._mlp_bda = self.self_attn_bda, self.mlp_bda
        self.self_attn_bda = self._normed_bda(self._attn_bda, "post_self_attn_layernorm")
        self.mlp_bda = self._normed_bda(self._mlp_bda, "post_mlp_layernorm")

    def _normed_bda(self, bda_factory, norm_name: str):
        def factory(training: bool, fused: bool):
            bda = bda_factory(training, fused)

            def normed(x_with_bias, residual, prob):
                out, bias = x_with_bias
                if bias is not None:  # Chameleon has no biases; norm(out + bias) would need them folded first
                    out, bias = out + bias, None
                return bda((getattr(self, norm_name)(out), bias), residual, prob)

            return normed

        return factory


class SDPAttention(DotProductAttention):
    """megatron's local core attention through ``torch.nn.functional.scaled_dot_product_attention``.

    megatron's ``DotProductAttention`` materialises the [b, heads, s, s] scores and runs several
    elementwise passes over them; on the CPU those passes, not the matmuls, dominate a step at
    s = 1024. SDPA's fused (flash) kernels never build that matrix; on the CPU, our own kernel
    (tessera/kernels/cpu_attention.c) is faster still and is used where it covers the call. Same constructor, same
    ``softmax_scale``, same dropout RNG (megatron's tracker); anything SDPA cannot express here
    (explicit masks, biases, packed sequences, KV-cache shapes) goes to megatron's implementation.
    """

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if (attention_mask is not None or attention_bias is not None or packed_seq_params is not None
                or getattr(self, "softmax_offset", None) is not None or query.shape[0] != key.shape[0]
                or mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask)):
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        sq, b, np_, hn = query.shape
        # [s, b, heads, hn] -> [b, heads, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        p = self.attention_dropout.p if self.training else 0.0
        causal = mask_type == AttnMaskType.causal and sq > 1
        if query.device.type == "cpu":
            if torch.is_autocast_enabled("cpu"):  # SDPA's autocast rule: run in the autocast dtype
                dtype = torch.get_autocast_dtype("cpu")
                q, k, v = (t.to(dtype) for t in (q, k, v))
            if cpu_attention.supports(q, k, v, p):
                ctx = cpu_attention.attention(q, k, v, causal=causal, scale=self.softmax_scale)
                return ctx.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if p > 0 and not self.config.sequence_parallel \
            else contextlib.nullcontext()
        with rng:
            ctx = F.scaled_dot_product_attention(
                q, k, v, dropout_p=p, is_causal=causal,
                scale=self.softmax_scale, enable_gqa=k.shape[1] != np_,
            )
        return ctx.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)
