"""The Chameleon layer spec for megatron-core's GPTModel.

Pre-norm RMSNorm, SwiGLU MLP (megatron's MLP with ``layers.SwiGLU`` as its activation), no biases,
per-head QK LayerNorm (``PerHeadLayerNorm``) after the QKV projection and before RoPE, optional
Swin-style norm placement (``SwinNormTransformerLayer``), GQA via ``num_query_groups``. Transformer
Engine modules when TE imports and CUDA is present, megatron's local PyTorch modules otherwise (with
``F.linear`` for the linears when there is one TP rank: ``layers.SingleRank*ParallelLinear``).
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec

from tessera.model.config import ModelConfig
from tessera.model.layers import (
    PerHeadLayerNorm,
    RMSNorm,
    SDPAttention,
    SingleRankColumnParallelLinear,
    SingleRankRowParallelLinear,
    SwiGLU,
    SwinNormTransformerLayer,
    SwinNormTransformerLayerSubmodules,
)


def te_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions.transformer_engine import TENorm  # noqa: F401
    except Exception:  # ImportError, or TE built against another CUDA/torch
        return False
    return True


def _qk_norm_specs(cfg: ModelConfig) -> tuple:
    if not cfg.qk_norm:
        return IdentityOp, IdentityOp
    return (
        ModuleSpec(module=PerHeadLayerNorm, params={"role": "query"}),
        ModuleSpec(module=PerHeadLayerNorm, params={"role": "key"}),
    )


def _base_spec(use_te: bool) -> ModuleSpec:
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        # linear_qkv / linear_fc1 are TE LayerNorm+Linear (the pre-norm fused in; RMSNorm from config).
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    # our RMSNorm for the pre-norms (megatron's local choice refuses sequence parallelism, or RMSNorm with apex)
    sub = dataclasses.replace(spec.submodules, input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm)
    return ModuleSpec(module=spec.module, submodules=sub)


def _norm_spec(use_te: bool):
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return RMSNorm


def chameleon_block_spec(cfg: ModelConfig, config, vp_stage: int | None = None, use_te: bool | None = None):
    """The decoder block of this (virtual) pipeline stage: its layers' spec and the final norm (TE's, or our
    RMSNorm on the local path, where megatron would pick a norm without sequence parallelism)."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    use_te = te_available() if use_te is None else use_te
    layer = chameleon_layer_spec(cfg, use_te)
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config, vp_stage),
                                      layer_norm=_norm_spec(use_te))


def chameleon_layer_spec(cfg: ModelConfig, use_te: bool | None = None) -> ModuleSpec:
    """The transformer layer spec (one layer; GPTModel fans it out)."""
    use_te = te_available() if use_te is None else use_te
    spec = _base_spec(use_te)
    sub = spec.submodules
    attn_sub = dataclasses.replace(sub.self_attention.submodules)
    attn_sub.q_layernorm, attn_sub.k_layernorm = _qk_norm_specs(cfg)
    if not use_te:
        attn_sub.core_attention = SDPAttention  # fused attention for the local path (see layers.py)
        # F.linear when there is one TP rank (megatron's linears otherwise; see layers.py)
        attn_sub.linear_qkv, attn_sub.linear_proj = SingleRankColumnParallelLinear, SingleRankRowParallelLinear
    # SwiGLU as one module on the whole fc1 output (layers.SwiGLU; transformer_config sets
    # use_te_activation_func so megatron's MLP uses it)
    mlp_sub = dataclasses.replace(sub.mlp.submodules, activation_func=SwiGLU)
    if not use_te:
        mlp_sub.linear_fc1, mlp_sub.linear_fc2 = SingleRankColumnParallelLinear, SingleRankRowParallelLinear
    if cfg.swin_norm and use_te:
        # The fused LayerNorm+Linear would put a norm on the branch INPUTS: use plain TE linears.
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear

        attn_sub.linear_qkv = TEColumnParallelLinear
        mlp_sub.linear_fc1 = TEColumnParallelLinear
    mlp = ModuleSpec(module=sub.mlp.module, params=dict(sub.mlp.params), submodules=mlp_sub)
    attention = ModuleSpec(module=sub.self_attention.module, params=dict(sub.self_attention.params), submodules=attn_sub)
    if not cfg.swin_norm:
        layer_sub = dataclasses.replace(sub, self_attention=attention, mlp=mlp)
        return ModuleSpec(module=spec.module, submodules=layer_sub)
    norm = _norm_spec(use_te)
    layer_sub = SwinNormTransformerLayerSubmodules(
        input_layernorm=IdentityOp,
        self_attention=attention,
        self_attn_bda=sub.self_attn_bda,
        pre_mlp_layernorm=IdentityOp,
        mlp=mlp,
        mlp_bda=sub.mlp_bda,
        post_self_attn_layernorm=norm,
        post_mlp_layernorm=norm,
    )
    return ModuleSpec(module=SwinNormTransformerLayer, submodules=layer_sub)
