"""The CPU training attention kernel (tessera/kernels/cpu_attention.c): forward and backward against
float64 SDPA, in megatron's strided layout, and inside the model against the SDPA path it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tessera.kernels import cpu_attention

pytestmark = pytest.mark.skipif(cpu_attention.load() is None, reason=f"no CPU attention: {cpu_attention.unavailable_reason()}")


def _qkv(b, h, g, s, d, dtype, layout="megatron", seed=0):
    """q [b, h, s, d], k / v [b, g, s, d] as views; "megatron": of one [s, b, 3, h, d] buffer, as megatron's
    split of the QKV projection gives them (nothing contiguous); "bhsd": contiguous."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "megatron":
        base = (2 * torch.randn(s, b, 3, h, d, generator=gen)).to(dtype)
        q = base[:, :, 0].permute(1, 2, 0, 3)
        k, v = (base[:, :, i, :g].permute(1, 2, 0, 3) for i in (1, 2))
    else:
        q = (2 * torch.randn(b, h, s, d, generator=gen)).to(dtype)
        k, v = ((2 * torch.randn(b, g, s, d, generator=gen)).to(dtype) for _ in range(2))
    dout = torch.randn(b, h, s, d, generator=gen).to(dtype)
    return q, k, v, dout


def _grads(fn, q, k, v, dout):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


def _reference(q, k, v, dout, causal, scale=None):
    """float64 SDPA: the exact answer for the rounded inputs."""
    fn = lambda a, b_, c: F.scaled_dot_product_attention(a, b_, c, is_causal=causal, scale=scale,  # noqa: E731
                                                         enable_gqa=a.shape[1] != b_.shape[1])
    return _grads(fn, *(t.double() for t in (q, k, v, dout)))


def _rel_err(a, ref):
    """max error over the reference's largest magnitude (at least 1: with one token dq and dk are exactly 0, and
    fp32 leaves a 1e-6 remainder of dP - rowsum(dO * O))."""
    return ((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


@pytest.mark.parametrize("b,h,g,s,d,causal,layout", [
    (2, 4, 4, 128, 64, True, "megatron"),  # MHA, whole blocks
    (1, 4, 2, 200, 32, True, "megatron"),  # GQA, a partial last block
    (2, 3, 3, 77, 48, False, "bhsd"),  # bidirectional, one partial block, 3 column vectors
    (1, 2, 1, 130, 128, True, "bhsd"),  # MQA, head_dim 128 (two 64-column passes)
    (1, 1, 1, 1, 16, True, "bhsd"),  # one token
])
def test_fp32_matches_float64_sdpa(b, h, g, s, d, causal, layout):
    q, k, v, dout = _qkv(b, h, g, s, d, torch.float32, layout)
    ours = _grads(lambda a, b_, c: cpu_attention.attention(a, b_, c, causal=causal), q, k, v, dout)
    ref = _reference(q, k, v, dout, causal)
    for name, a, r in zip(("out", "dq", "dk", "dv"), ours, ref, strict=True):
        assert a.dtype == torch.float32 and a.shape == r.shape
        assert _rel_err(a, r) < 1e-5, name


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_more_threads_than_heads_split_by_blocks(monkeypatch, dtype, tol):
    """With fewer (batch, KV head) pairs than 2 x threads, the forward hands out query blocks and the backward
    key blocks (each task's dQ summed afterwards): 8 threads on one batch of 2 KV heads, 5 blocks."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    q, k, v, dout = _qkv(1, 4, 2, 300, 32, dtype)
    ours = _grads(lambda a, b_, c: cpu_attention.attention(a, b_, c, causal=True), q, k, v, dout)
    for name, a, r in zip(("out", "dq", "dk", "dv"), ours, _reference(q, k, v, dout, True), strict=True):
        assert _rel_err(a, r) < tol, name


def test_scale_is_the_callers():
    q, k, v, dout = _qkv(1, 2, 2, 70, 32, torch.float32, "bhsd")
    ours = _grads(lambda a, b_, c: cpu_attention.attention(a, b_, c, causal=True, scale=0.05), q, k, v, dout)
    for a, r in zip(ours, _reference(q, k, v, dout, True, scale=0.05), strict=True):
        assert _rel_err(a, r) < 1e-5


@pytest.mark.parametrize("bf16_products", [True, False], ids=["bf16-products", "fp32-products"])
@pytest.mark.parametrize("b,h,g,s", [(2, 4, 2, 192), (1, 2, 1, 100)], ids=["task-per-head", "task-per-block"])
def test_bf16_is_at_least_as_accurate_as_torchs_flash_kernel(monkeypatch, bf16_products, b, h, g, s):
    """bf16 in, bf16 out: against the float64 answer, no worse than SDPA's own bf16 kernel, whether the block
    products are bf16 (AVX512-BF16, P and dS rounded to bf16 as SDPA does) or fp32 (every other CPU). With
    fewer heads than 2 x threads the forward hands out one query block per task (the second shape)."""
    monkeypatch.setattr(cpu_attention, "BF16_PRODUCTS", bf16_products)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    q, k, v, dout = _qkv(b, h, g, s, 64, torch.bfloat16)
    ref = _reference(q, k, v, dout, True)
    ours = _grads(lambda a, b_, c: cpu_attention.attention(a, b_, c, causal=True), q, k, v, dout)
    sdpa = _grads(lambda a, b_, c: F.scaled_dot_product_attention(a, b_, c, is_causal=True, enable_gqa=True), q, k, v, dout)
    for name, a, t, r in zip(("out", "dq", "dk", "dv"), ours, sdpa, ref, strict=True):
        assert a.dtype == torch.bfloat16
        assert _rel_err(a, r) <= 1.05 * _rel_err(t, r) + 1e-3, name
        assert _rel_err(a, r) < 1e-2, name


def test_portable_build_matches_float64_sdpa(monkeypatch, tmp_path):
    """The build for a CPU without AVX-512 (the vector code lowered to SSE2) computes the same attention, so
    CI on an AVX-512 machine still covers what other CPUs run."""
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_attention, "_loaded", {})
    monkeypatch.setattr(cpu_attention, "FLAGS", tuple("-march=x86-64" if f == "-march=native" else f for f in cpu_attention.FLAGS))
    assert cpu_attention.load() is not None, cpu_attention.unavailable_reason()
    assert not cpu_attention.bf16_products()  # no AVX512-BF16 in this build
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        q, k, v, dout = _qkv(2, 4, 2, 100, 32, dtype)
        ours = _grads(lambda a, b_, c: cpu_attention.attention(a, b_, c, causal=True), q, k, v, dout)
        for name, a, r in zip(("out", "dq", "dk", "dv"), ours, _reference(q, k, v, dout, True), strict=True):
            assert _rel_err(a, r) < tol, (dtype, name)


def test_output_keeps_megatrons_memory_order():
    """The [s, b, heads, dim] order survives, so the layer's permute back to [s, b, hidden] is free."""
    base = torch.randn(64, 2, 4, 32)  # [s, b, h, d], as RoPE returns q
    q = base.permute(1, 2, 0, 3)
    out = cpu_attention.attention(q, q, q, causal=True)
    assert out.permute(2, 0, 1, 3).is_contiguous()


def test_unsupported_calls_are_refused():
    q = torch.randn(1, 2, 8, 24)  # head_dim not a multiple of 16
    assert not cpu_attention.supports(q, q, q, 0.0)
    q = torch.randn(1, 2, 8, 32)
    assert not cpu_attention.supports(q, q, q, 0.1)  # dropout: SDPA's RNG
    assert not cpu_attention.supports(q, q[:, :, :4], q[:, :, :4], 0.0)  # cross-attention lengths
    assert not cpu_attention.supports(q, q.to(torch.bfloat16), q, 0.0)  # mixed dtypes
    assert not cpu_attention.supports(q.double(), q.double(), q.double(), 0.0)
    with pytest.raises(ValueError, match="does not cover"):
        cpu_attention.attention(q.double(), q.double(), q.double(), causal=True)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("TESSERA_CPU_ATTENTION", "0")
    monkeypatch.setattr(cpu_attention, "_loaded", {})
    assert cpu_attention.load() is None and "TESSERA_CPU_ATTENTION=0" in cpu_attention.unavailable_reason()
    q = torch.randn(1, 2, 8, 32)
    assert not cpu_attention.supports(q, q, q, 0.0)


@pytest.mark.usefixtures("megatron_1proc")
@pytest.mark.parametrize("dtype,autocast", [("float32", False), ("bfloat16", True)])
def test_model_step_equals_the_sdpa_path(monkeypatch, dtype, autocast):
    """A training forward + backward of the model through the kernel equals the same step through SDPA
    (fp32: to fp32 summation order; bf16 under autocast: to bf16 rounding of the logits)."""
    from tessera.model import build_model
    from tessera.model.config import ModelConfig

    monkeypatch.setenv("TESSERA_CPU_ATTENTION", "1")  # the kernel even where SDPA is the faster path (AMX-BF16)
    cfg = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                      vocab_size=256, seq_length=96, params_dtype=dtype, hidden_dropout=0.0, attention_dropout=0.0)
    model = build_model(cfg, init_seed=3)
    ids = torch.randint(0, 256, (2, 96), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(96).unsqueeze(0).expand_as(ids)
    calls = []
    real = cpu_attention._CPUAttention.apply
    monkeypatch.setattr(cpu_attention._CPUAttention, "apply", lambda *a: calls.append(1) or real(*a))

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(ids, pos, None)
        w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
        (logits.float() * w).sum().backward()
        return logits.float().detach(), {n: p.grad.float().clone() for n, p in model.named_parameters()}

    ours, g_ours = step()
    assert len(calls) == cfg.num_layers
    monkeypatch.setattr(cpu_attention, "supports", lambda *a: False)
    ref, g_ref = step()
    assert len(calls) == cfg.num_layers
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == "float32" else dict(rtol=0.05, atol=0.05)
    torch.testing.assert_close(ours, ref, **tol)
    for name in g_ref:
        scale = g_ref[name].abs().max().clamp_min(1e-6)
        assert ((g_ours[name] - g_ref[name]).abs().max() / scale).item() < (1e-4 if dtype == "float32" else 0.1), name
