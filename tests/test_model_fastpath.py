"""The CPU fast paths of the training step (issue #9) change no numbers: batch-first logits without the
vocabulary-wide transpose, the one-module SwiGLU, the cached-cos/sin RoPE, and the cross-entropy
reference's row tiles, each against the megatron / untiled computation it replaces."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F

from tessera.model.config import ModelConfig

pytestmark = pytest.mark.usefixtures("megatron_1proc")

TINY = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                   vocab_size=256, seq_length=32)


def _step(model, ids, seed=0):
    """Logits and every parameter's gradient of sum(logits * fixed random weights)."""
    model.zero_grad(set_to_none=True)
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    logits = model(ids, pos, None)
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed))
    (logits.float() * w).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _ids(b=3, s=17):
    return torch.randint(0, TINY.vocab_size, (b, s), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batch_first_logits_equal_megatron_postprocess(dtype):
    from megatron.core.models.gpt import GPTModel

    from tessera.model import build_model

    model = build_model(dataclasses.replace(TINY, params_dtype=dtype), init_seed=3)
    ids = _ids()
    fast, g_fast = _step(model, ids)
    assert fast.shape == (3, 17, TINY.vocab_size) and fast.is_contiguous()
    model._postprocess = functools.partial(GPTModel._postprocess, model)  # megatron's [s,b,V] -> transpose
    ref, g_ref = _step(model, ids)
    assert torch.equal(fast, ref)  # same rows through the same matmul
    for name in g_ref:  # the weight gradients sum the tokens in another order
        torch.testing.assert_close(g_fast[name], g_ref[name], rtol=1e-5, atol=1e-4)


def test_labels_still_go_through_megatron_loss():
    from tessera.model import build_model

    model = build_model(TINY, init_seed=3)
    ids = _ids()
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        logits = model(ids, pos, None)
        per_token = model(ids, pos, None, labels=ids)
    expect = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1), reduction="none")
    torch.testing.assert_close(per_token.reshape(-1), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_swiglu_module_equals_megatron_glu(dtype):
    from tessera.model import build_model
    from tessera.model.swiglu import SwiGLU

    cfg = dataclasses.replace(TINY, params_dtype=dtype)
    ours = build_model(cfg, init_seed=3)
    assert all(isinstance(layer.mlp.activation_func, SwiGLU) for layer in ours.decoder.layers)
    megatron = build_model(cfg, init_seed=3, use_te_activation_func=False)  # megatron's chunk / silu / mul
    assert megatron.decoder.layers[0].mlp.activation_func is F.silu
    assert ours.state_dict().keys() == megatron.state_dict().keys()  # no new state
    ids = _ids()
    (a, ga), (b, gb) = _step(ours, ids), _step(megatron, ids)
    assert torch.equal(a, b)
    assert all(torch.equal(ga[k], gb[k]) for k in ga)


def test_swiglu_function_bit_identical_to_autograd():
    from tessera.model.swiglu import _SwiGLUFunction

    for dtype in (torch.float32, torch.bfloat16):
        for intermediate in (False, True):  # the backward overwrites an intermediate input, never a leaf
            g = torch.Generator().manual_seed(0)
            x0 = (3 * torch.randn(8, 3, 2 * 40, generator=g)).to(dtype)
            go = torch.randn(8, 3, 40, generator=g).to(dtype)
            a, b = x0.clone().requires_grad_(), x0.clone().requires_grad_()
            gate, up = (a * 1 if intermediate else a).chunk(2, -1)
            (F.silu(gate) * up).backward(go)
            y = _SwiGLUFunction.apply(b * 1 if intermediate else b)
            y.backward(go)
            assert torch.equal(y, F.silu(x0.chunk(2, -1)[0]) * x0.chunk(2, -1)[1])
            assert torch.equal(a.grad, b.grad) and torch.equal(b, x0)


def test_rope_cos_sin_cached_per_freqs_and_invalidated_by_inplace_change():
    from tessera.model.rope import _rope_cos_sin

    freqs = torch.randn(6, 1, 1, 8)
    c1, s1 = _rope_cos_sin(freqs, 1.0, torch.float32)
    assert _rope_cos_sin(freqs, 1.0, torch.float32)[0] is c1  # every layer after the first reuses them
    assert torch.equal(c1, torch.cos(freqs)) and torch.equal(s1, torch.sin(freqs))
    cb, _ = _rope_cos_sin(freqs, 1.0, torch.bfloat16)
    assert cb.dtype == torch.bfloat16 and torch.equal(cb, torch.cos(freqs).to(torch.bfloat16))
    freqs.mul_(2)
    c2, _ = _rope_cos_sin(freqs, 1.0, torch.float32)
    assert torch.equal(c2, torch.cos(freqs))
    with torch.inference_mode():  # no version counter there: computed, not cached
        f = torch.randn(6, 1, 1, 8)
        assert torch.equal(_rope_cos_sin(f, 0.5, torch.float32)[1], torch.sin(f) * 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [None, 48])
def test_cross_entropy_reference_tiles_change_nothing(monkeypatch, dtype, block):
    """Many small row tiles (with partial ones, and column chunks when ``block`` is set) give the same
    bits as one tile; vocab_start offsets the labels as on a TP rank (some labels owned elsewhere)."""
    from tessera.kernels import cross_entropy as ce

    g = torch.Generator().manual_seed(1)
    tokens, v, start = 37, 200, 100
    logits = (4 * torch.randn(tokens, v, generator=g)).to(dtype)
    labels = torch.randint(0, 2 * v, (tokens,), generator=g)  # this "rank" owns ids [100, 300)
    lse = torch.logsumexp(logits.float(), dim=1)
    coef_hot, coef_sm = torch.randn(tokens, generator=g), torch.randn(tokens, generator=g)

    def run():
        stats = ce._forward_stats_reference(logits, labels, start, block)
        grads = []
        for inplace in (False, True):
            x = logits.clone()
            grad = x if inplace else torch.empty_like(x)
            ce._backward_reference(x, labels, lse, coef_sm, coef_hot, start, grad, block)
            grads.append(grad)
        return stats, grads

    (one_stats, one_grads) = run()
    monkeypatch.setattr(ce, "_REF_TILE_ELEMENTS", 64)
    monkeypatch.setattr(ce, "_REF_MIN_ROWS", 1)
    assert ce._ref_tiles(tokens, v, block)[0] < tokens
    (tiled_stats, tiled_grads) = run()
    assert all(torch.equal(a, b) for a, b in zip(one_stats, tiled_stats, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(one_grads, tiled_grads, strict=True))
    # and against the plain formula: coef_sm * softmax - coef_hot * onehot(owned label)
    m, s, t = one_stats
    torch.testing.assert_close(m + torch.log(s), lse, rtol=1e-5, atol=1e-5)
    local = labels - start
    owned = (local >= 0) & (local < v)
    expect = coef_sm[:, None] * torch.softmax(logits.float(), dim=1)
    expect[owned.nonzero()[:, 0], local[owned]] -= coef_hot[owned]
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(one_grads[0].float(), expect, **tol)
    torch.testing.assert_close(t[owned], logits.float()[owned.nonzero()[:, 0], local[owned]])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_single_rank_linears_equal_megatron_linears(monkeypatch, dtype):
    from tessera.model import build_model
    from tessera.model import linear as layers
    from tessera.model.linear import SingleRankColumnParallelLinear, SingleRankRowParallelLinear

    model = build_model(dataclasses.replace(TINY, params_dtype=dtype), init_seed=3)
    layer = model.decoder.layers[0]
    assert isinstance(layer.self_attention.linear_qkv, SingleRankColumnParallelLinear)
    assert isinstance(layer.mlp.linear_fc2, SingleRankRowParallelLinear)
    assert layers.single_rank_plain(layer.mlp.linear_fc1)
    ids = _ids()
    fast, g_fast = _step(model, ids)
    monkeypatch.setattr(layers, "single_rank_plain", lambda linear: False)  # megatron's autograd functions
    ref, g_ref = _step(model, ids)
    assert torch.equal(fast, ref)
    for name in g_ref:
        torch.testing.assert_close(g_fast[name], g_ref[name], rtol=1e-5, atol=1e-5)


def test_frozen_batch_one_forward_gives_f_linear_row_major_inputs(monkeypatch):
    """A batch of one, weights and input without gradients (LoRA's base layers, generation): megatron's
    [b, s, h] -> [s, b, h] transpose leaves a stride of s * h on the size-1 dim; every F.linear the single-rank
    path calls gets row-major strides instead (bf16 CPU linears outside autograd are far slower otherwise)
    and the logits are unchanged."""
    from tessera.model import build_model
    from tessera.model import linear as layers

    model = build_model(dataclasses.replace(TINY, params_dtype="bfloat16"), init_seed=3).eval()
    ids = _ids(b=1)
    with torch.no_grad():
        ref = model(ids, torch.arange(ids.shape[1])[None], None)
    seen, plain = [], F.linear

    def recording_linear(x, w, b=None):
        seen.append((tuple(x.shape), x.stride()))
        return plain(x, w, b)

    monkeypatch.setattr(layers.F, "linear", recording_linear)
    with torch.no_grad():
        out = model(ids, torch.arange(ids.shape[1])[None], None)
    assert len(seen) >= 4 * TINY.num_layers
    for shape, stride in seen:
        expect = [1] * len(shape)
        for i in range(len(shape) - 2, -1, -1):
            expect[i] = expect[i + 1] * shape[i + 1]
        assert list(stride) == expect, (shape, stride)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
