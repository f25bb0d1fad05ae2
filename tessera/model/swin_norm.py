"""Chameleon-34B's Swin-style norm placement: ``h = x + drop(norm_a(attn(x))); out = h + drop(norm_m(mlp(h)))``
(the norms on the branch outputs, not the inputs), which bounds the growth of the residual stream.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules


@dataclass
class SwinNormTransformerLayerSubmodules(TransformerLayerSubmodules):
    post_self_attn_layernorm: ModuleSpec | type = IdentityOp
    post_mlp_layernorm: ModuleSpec | type = IdentityOp


class SwinNormTransformerLayer(TransformerLayer):
    """megatron's TransformerLayer with the norms moved onto the branch outputs.

    The spec leaves ``input_layernorm`` / ``pre_mlp_layernorm`` as identities and supplies
    ``post_self_attn_layernorm`` / ``post_mlp_layernorm``; they are applied to each branch output
    inside megatron's bias-dropout-add (before the dropout), so everything else (recompute,
    pipelining) is megatron's.
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
