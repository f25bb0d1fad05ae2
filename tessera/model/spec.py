"""The Chameleon layer specs for megatron-core's GPTModel, written out the way Megatron-LM writes its own
(``get_gpt_layer_local_spec``, ``get_gpt_layer_with_transformer_engine_spec``): every submodule of a
layer in one place.

Four layer trees, picked by ``chameleon_layer_spec(cfg, use_te)``:

- ``local_layer_spec``: megatron's local (pure PyTorch) modules: torch RMSNorm pre-norms, the parallel
  linears (``F.linear`` with one TP rank), SDPA core attention;
- ``te_layer_spec``: Transformer Engine: each pre-norm fused into the linear after it
  (``TELayerNormColumnParallelLinear``), TE's fused attention, ``TERowParallelLinear``;
- ``local_swin_layer_spec`` / ``te_swin_layer_spec``: Chameleon-34B's norm placement (norms on the branch
  outputs), so the linears are plain and the norms separate modules in both.

Chameleon's parts, one small module each: per-head QK-norm (``qk_norm``), Swin norm placement
(``swin_norm``), SwiGLU (``swiglu``); and the local spec's core attention (``attention``) and single-rank
linears (``linear``). ``chameleon_block_spec`` adds the final norm, named here too (megatron would take it
from whichever norm library happens to be installed). Transformer Engine is used when it imports AND CUDA
is present (``te_status``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.extensions.transformer_engine import (
    TEColumnParallelLinear,
    TEDotProductAttention,
    TELayerNormColumnParallelLinear,
    TENorm,
    TERowParallelLinear,
)
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from tessera.model.attention import SDPAttention
from tessera.model.config import ModelConfig
from tessera.model.layer_names import TE_FUSED_NORMS
from tessera.model.linear import SingleRankColumnParallelLinear, SingleRankRowParallelLinear
from tessera.model.qk_norm import PerHeadLayerNorm
from tessera.model.rms_norm import RMSNorm
from tessera.model.swiglu import SwiGLU
from tessera.model.swin_norm import SwinNormTransformerLayer, SwinNormTransformerLayerSubmodules


@dataclass(frozen=True)
class TEStatus:
    available: bool
    reason: str  # why not, or which version is used


def te_status() -> TEStatus:
    """Whether the Transformer Engine spec can run here: TE imports (and megatron-core loads it) AND CUDA
    is present."""
    if not torch.cuda.is_available():
        return TEStatus(False, "no CUDA")
    try:
        import transformer_engine
    except ImportError:
        return TEStatus(False, "Transformer Engine not installed")
    except Exception as exc:  # built against another CUDA / torch
        return TEStatus(False, f"Transformer Engine failed to import ({type(exc).__name__}: {exc})")
    from megatron.core.extensions import transformer_engine as megatron_te

    if not megatron_te.HAVE_TE:
        return TEStatus(False, "megatron-core could not load Transformer Engine")
    return TEStatus(True, f"Transformer Engine {getattr(transformer_engine, '__version__', '?')} on CUDA")


def local_layer_spec(cfg: ModelConfig) -> ModuleSpec:
    """Pre-norm layer from megatron's local modules (the CPU, and GPUs without Transformer Engine)."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,  # torch.nn.RMSNorm, sequence-parallel aware (rms_norm.py)
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=SingleRankColumnParallelLinear,
                    core_attention=SDPAttention,
                    linear_proj=SingleRankRowParallelLinear,
                    q_layernorm=ModuleSpec(module=PerHeadLayerNorm, params={"role": "query"}) if cfg.qk_norm else IdentityOp,
                    k_layernorm=ModuleSpec(module=PerHeadLayerNorm, params={"role": "key"}) if cfg.qk_norm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=SingleRankColumnParallelLinear,  # [gate; up]
                    activation_func=SwiGLU,  # used because transformer_config sets use_te_activation_func
                    linear_fc2=SingleRankRowParallelLinear,
                ),
            ),
            mlp_bda=get_bias_dropout_add,
            # checkpoints name the pre-norms as TE's fused linears do, so local and TE checkpoints share keys
            sharded_state_dict_keys_map=dict(TE_FUSED_NORMS),
        ),
    )


def te_layer_spec(cfg: ModelConfig) -> ModuleSpec:
    """Pre-norm layer from Transformer Engine modules; each pre-norm is fused into the linear after it."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp,  # in linear_qkv
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=TELayerNormColumnParallelLinear,  # RMSNorm + linear
                    core_attention=TEDotProductAttention,
                    linear_proj=TERowParallelLinear,
                    q_layernorm=ModuleSpec(module=PerHeadLayerNorm, params={"role": "query"}) if cfg.qk_norm else IdentityOp,
                    k_layernorm=ModuleSpec(module=PerHeadLayerNorm, params={"role": "key"}) if cfg.qk_norm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp,  # in linear_fc1
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=TELayerNormColumnParallelLinear,  # RMSNorm + linear, [gate; up]
                    activation_func=SwiGLU,
                    linear_fc2=TERowParallelLinear,
                ),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def local_swin_layer_spec(cfg: ModelConfig) -> ModuleSpec:
    """Swin-norm layer (``h = x + norm(attn(x)); out = h + norm(mlp(h))``) from megatron's local modules."""
    return ModuleSpec(
        module=SwinNormTransformerLayer,
        submodules=SwinNormTransformerLayerSubmodules(
            input_layernorm=IdentityOp,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=SingleRankColumnParallelLinear,
                    core_attention=SDPAttention,
                    linear_proj=SingleRankRowParallelLinear,
                    q_layernorm=ModuleSpec(module=PerHeadLayerNorm, params={"role": "query"}) if cfg.qk_norm else IdentityOp,
                    k_layernorm=ModuleSpec(module=PerHeadLayerNorm, params={"role": "key"}) if cfg.qk_norm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            post_self_attn_layernorm=RMSNorm,  # on the attention output, inside bias-dropout-add
            pre_mlp_layernorm=IdentityOp,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=SingleRankColumnParallelLinear,
                    activation_func=SwiGLU,
                    linear_fc2=SingleRankRowParallelLinear,
                ),
            ),
            mlp_bda=get_bias_dropout_add,
            post_mlp_layernorm=RMSNorm,  # on the MLP output
        ),
    )


def te_swin_layer_spec(cfg: ModelConfig) -> ModuleSpec:
    """Swin-norm layer from Transformer Engine modules: plain TE linears (a fused LayerNorm+Linear would
    put the norm on the branch input) and separate ``TENorm`` norms on the branch outputs."""
    return ModuleSpec(
        module=SwinNormTransformerLayer,
        submodules=SwinNormTransformerLayerSubmodules(
            input_layernorm=IdentityOp,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=TEColumnParallelLinear,
                    core_attention=TEDotProductAttention,
                    linear_proj=TERowParallelLinear,
                    q_layernorm=ModuleSpec(module=PerHeadLayerNorm, params={"role": "query"}) if cfg.qk_norm else IdentityOp,
                    k_layernorm=ModuleSpec(module=PerHeadLayerNorm, params={"role": "key"}) if cfg.qk_norm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            post_self_attn_layernorm=TENorm,
            pre_mlp_layernorm=IdentityOp,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=TEColumnParallelLinear,
                    activation_func=SwiGLU,
                    linear_fc2=TERowParallelLinear,
                ),
            ),
            mlp_bda=get_bias_dropout_add,
            post_mlp_layernorm=TENorm,
        ),
    )


def chameleon_layer_spec(cfg: ModelConfig, use_te: bool | None = None) -> ModuleSpec:
    """The transformer layer spec (one layer; GPTModel fans it out). ``use_te=None``: ``te_status()``."""
    use_te = te_status().available if use_te is None else use_te
    if cfg.swin_norm:
        return te_swin_layer_spec(cfg) if use_te else local_swin_layer_spec(cfg)
    return te_layer_spec(cfg) if use_te else local_layer_spec(cfg)


def chameleon_block_spec(cfg: ModelConfig, config: TransformerConfig, use_te: bool | None = None,
                         vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """This (virtual) pipeline stage's decoder: its layers and the final norm (``TENorm`` with TE, our RMSNorm
    otherwise), as megatron's ``get_gpt_decoder_block_spec`` builds it."""
    use_te = te_status().available if use_te is None else use_te
    layer = chameleon_layer_spec(cfg, use_te)
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage),
        layer_norm=TENorm if use_te else RMSNorm,
    )
