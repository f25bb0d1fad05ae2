"""The cached decoder with Transformer Engine's module layout, on the CPU: TE fuses the pre-attention and
pre-MLP norms into ``linear_qkv`` / ``linear_fc1`` (``layer_norm_weight``, ``layer_norm_bias``,
``normalization``, ``eps``, ``zero_centered_gamma``) and leaves ``input_layernorm`` /
``pre_mlp_layernorm`` as IdentityOp; the final norm is TE's own RMSNorm (``TENorm``). TE cannot run here, so the test rebuilds that layout with
duck-typed modules carrying the local model's own weights and checks the decoder reads the fused norms."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.identity_op import IdentityOp
from torch import nn

from tessera.generate.decoder import DecoderError, KVCacheDecoder
from tests.test_generate import full_logits, make_model


class FakeTELayerNormLinear(nn.Module):
    """Attribute layout of megatron's TELayerNormColumnParallelLinear (te.pytorch.LayerNormLinear)."""

    def __init__(self, weight, norm_weight, eps, zero_centered, normalization="RMSNorm", norm_bias=None):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(torch.empty(0))  # TE registers an empty bias when bias=False
        self.layer_norm_weight = nn.Parameter((norm_weight - 1 if zero_centered else norm_weight).detach().clone())
        self.layer_norm_bias = None if norm_bias is None else nn.Parameter(norm_bias.detach().clone())
        self.normalization, self.eps, self.zero_centered_gamma = normalization, eps, zero_centered


class RMSNorm(nn.Module):
    """Attribute layout of Transformer Engine's standalone RMSNorm (what megatron's TENorm returns)."""

    def __init__(self, weight, eps, zero_centered):
        super().__init__()
        self.weight = nn.Parameter((weight - 1 if zero_centered else weight).detach().clone())
        self.eps, self.zero_centered_gamma = eps, zero_centered


RMSNorm.__module__ = "transformer_engine.pytorch.module.rmsnorm"  # how the decoder recognises TE's norms


def te_layout(model, zero_centered: bool):
    """``model`` rearranged in place (a GPTModel holds process groups: no deepcopy) with each layer's
    pre-norms moved into its qkv / fc1 linears, TE-style; same weights, same function."""
    te = model
    for layer in te.decoder.layers:
        attn_norm, mlp_norm = layer.input_layernorm, layer.pre_mlp_layernorm
        assert type(attn_norm) is nn.RMSNorm and type(mlp_norm) is nn.RMSNorm  # the local spec's norms
        layer.self_attention.linear_qkv = FakeTELayerNormLinear(
            layer.self_attention.linear_qkv.weight, attn_norm.weight, attn_norm.eps, zero_centered)
        layer.mlp.linear_fc1 = FakeTELayerNormLinear(layer.mlp.linear_fc1.weight, mlp_norm.weight, mlp_norm.eps,
                                                     zero_centered)
        layer.input_layernorm, layer.pre_mlp_layernorm = IdentityOp(), IdentityOp()
    final = te.decoder.final_layernorm
    te.decoder.final_layernorm = RMSNorm(final.weight, final.eps, zero_centered)
    return te


def decode(model, ids: list[int], steps: int) -> list[torch.Tensor]:
    dec = KVCacheDecoder(model, dtype=torch.float32)
    dec.allocate(1, len(ids))
    out = [dec.prefill(torch.tensor([ids[: len(ids) - steps]]), torch.tensor([0]))[0]]
    for t in ids[len(ids) - steps : -1]:
        out.append(dec.step(torch.tensor([t]))[0])
    return out


@pytest.mark.parametrize("zero_centered", [False, True], ids=["gamma", "zero-centered-gamma"])
def test_fused_te_norms_are_read(zero_centered):
    model = make_model(seed=4, scale=0.3)  # norm weights randomised away from 1: skipping them shows
    ids = list(range(10, 30))
    ref = full_logits(model, ids)  # the local spec's own forward, before the rearrangement
    te = te_layout(model, zero_centered)
    got = decode(te, ids, steps=4)
    for j, logits in enumerate(got):
        torch.testing.assert_close(logits, ref[len(ids) - 4 - 1 + j], atol=2e-5, rtol=1e-4)
    # The same layout without the fused tables (what the decoder used to see) gives other logits.
    for layer in te.decoder.layers:
        del layer.self_attention.linear_qkv.layer_norm_weight, layer.mlp.linear_fc1.layer_norm_weight
    assert (decode(te, ids, steps=1)[0] - ref[-2]).abs().max() > 1e-2


def test_fused_layernorm_with_bias_matches_torch():
    """normalization='LayerNorm' (TE's other kind) with layer_norm_bias: the decoder's fused norm is
    torch's LayerNorm with those tables."""
    model = make_model(seed=5, scale=0.3)
    te = te_layout(model, zero_centered=False)
    g = torch.Generator().manual_seed(0)
    lin = te.decoder.layers[0].mlp.linear_fc1
    w, b = torch.randn(64, generator=g), torch.randn(64, generator=g)
    te.decoder.layers[0].mlp.linear_fc1 = FakeTELayerNormLinear(lin.weight, w, 1e-5, False, "LayerNorm", b)
    dec = KVCacheDecoder(te, dtype=torch.float32)
    x = torch.randn(3, 64, generator=g)
    ref = nn.LayerNorm(64, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(w), ref.bias.copy_(b)
        torch.testing.assert_close(dec.layers[0].ln_mlp(x), ref(x))


def test_fused_and_separate_norm_is_an_error():
    model = make_model(seed=6)
    separate = model.decoder.layers[1].input_layernorm
    te = te_layout(model, zero_centered=False)
    te.decoder.layers[1].input_layernorm = separate
    with pytest.raises(DecoderError, match="layer 1: both a fused layer_norm_weight and a separate input_layernorm"):
        KVCacheDecoder(te, dtype=torch.float32)
