"""The fused CPU decoding step (tessera/kernels/cpu_decode.c via tessera/generate/cpu_step.py): bf16 against
the PyTorch step, the build cache, the fallbacks and the errors. fp32 equality with the GPTModel's full
forward (GQA, MHA, Swin norm, ragged left padding) is in tests/test_generate.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tessera.generate.decoder import DecoderError, KVCacheDecoder
from tessera.kernels import cpu_decode
from tests.test_generate import has_c_compiler, make_model

pytestmark = pytest.mark.skipif(not has_c_compiler(), reason="no C compiler: the fused CPU step cannot be built")


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """load() as in a new process, building into an empty cache directory."""
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_decode, "_loaded", {})
    monkeypatch.setattr(cpu_decode, "_why_not", [])
    return tmp_path


def _ragged_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, 80, (3, 9), generator=g)
    pad = torch.tensor([0, 4, 7])
    for r, p in enumerate(pad.tolist()):
        ids[r, :p] = 0
    return ids, pad


@pytest.mark.parametrize("groups,swin", [(2, False), (None, True)], ids=["gqa", "mha-swin"])
def test_bf16_fused_step_matches_torch_step(groups, swin):
    """bf16 weights: both round every matmul's input and output to bf16 and accumulate in fp32; only the
    summation order differs, so the logits agree to a couple of bf16 ulps over many steps."""
    model = make_model(groups=groups, swin=swin, seed=2, scale=0.3)
    ref = KVCacheDecoder(model, dtype=torch.bfloat16, fused_cpu_step=False)
    fused = KVCacheDecoder(model, dtype=torch.bfloat16, fused_cpu_step=True)
    assert fused.step_backend.startswith("fused C step") and ref.step_backend == "PyTorch ops"
    ids, pad = _ragged_batch()
    for d in (ref, fused):
        d.allocate(3, 40)
    a, b = ref.prefill(ids, pad), fused.prefill(ids, pad)
    agree = 0
    for _ in range(24):
        tok = a.float().argmax(-1)
        a, b = ref.step(tok), fused.step(tok)
        assert a.dtype == b.dtype == torch.bfloat16
        torch.testing.assert_close(b.float(), a.float(), atol=0.03, rtol=0.02)
        agree += int((a.float().argmax(-1) == b.float().argmax(-1)).all())
    assert agree >= 22  # argmax may flip only on a near-tie
    # the cache the C step wrote is the cache the PyTorch step wrote
    torch.testing.assert_close(fused.cache[..., : fused.length, :], ref.cache[..., : ref.length, :],
                               atol=0.05, rtol=0.05)


def test_fused_step_errors():
    model = make_model(seed=3)
    dec = KVCacheDecoder(model, dtype=torch.float32, fused_cpu_step=True)
    dec.allocate(1, 4)
    dec.prefill(torch.tensor([[8, 9, 10]]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"token ids outside the embedding \[0, 128\)"):
        dec.step(torch.tensor([128]))
    dec.step(torch.tensor([11]))
    with pytest.raises(DecoderError, match="cache full"):
        dec.step(torch.tensor([12]))


def test_library_is_built_once_per_cpu(fresh_library, monkeypatch):
    lib = cpu_decode.load()
    assert lib is not None, cpu_decode.unavailable_reason()
    built = list(fresh_library.glob("cpu_decode-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(cpu_decode, "_loaded", {})
    assert cpu_decode.load() is not None
    assert [p.stat().st_mtime_ns for p in fresh_library.glob("cpu_decode-*.so")] == [stamp]  # reused
    # a build for another CPU (flags differ) gets another name: -march=native code is never shared
    cc = cpu_decode._compiler()
    here = cpu_decode._library_path(cc)
    monkeypatch.setattr(cpu_decode, "_cpu_signature", lambda: "flags : sse2")
    assert cpu_decode._library_path(cc) != here


def test_disabled_or_unsupported_falls_back_to_torch(fresh_library, monkeypatch):
    model = make_model(seed=4)
    monkeypatch.setenv("TESSERA_CPU_DECODE", "0")
    dec = KVCacheDecoder(model, dtype=torch.float32)
    assert "TESSERA_CPU_DECODE=0" in dec.step_backend and dec._fused is None
    with pytest.raises(DecoderError, match="fused_cpu_step=True but .*TESSERA_CPU_DECODE=0"):
        KVCacheDecoder(model, dtype=torch.float32, fused_cpu_step=True)
    monkeypatch.setenv("TESSERA_CPU_DECODE", "1")
    monkeypatch.setattr(cpu_decode, "_loaded", {})
    monkeypatch.setattr(model.config, "activation_func", F.gelu)  # not SwiGLU: the C step has no such MLP
    dec = KVCacheDecoder(model, dtype=torch.float32)
    assert dec._fused is None and "the MLP is not SwiGLU" in dec.step_backend
    assert KVCacheDecoder(make_model(seed=4), dtype=torch.float32)._fused is not None


def test_large_batches_step_through_torch(monkeypatch):
    """Above FUSED_STEP_MAX_BATCH rows the PyTorch path (oneDNN GEMMs) runs the step instead."""
    from tessera.generate import decoder as decoder_mod

    model = make_model(seed=5)
    fused = KVCacheDecoder(model, dtype=torch.bfloat16, fused_cpu_step=True)
    ref = KVCacheDecoder(model, dtype=torch.bfloat16, fused_cpu_step=False)
    calls = []
    real_step = fused._fused.step
    monkeypatch.setattr(fused._fused, "step", lambda *a: calls.append(1) or real_step(*a))
    ids, pad = _ragged_batch(1)
    for limit, expect_fused in ((3, True), (2, False)):
        monkeypatch.setattr(decoder_mod, "FUSED_STEP_MAX_BATCH", limit)
        calls.clear()
        for d in (fused, ref):
            d.allocate(3, 20)
        a, b = ref.prefill(ids, pad), fused.prefill(ids, pad)
        assert torch.equal(a, b)  # the prefill is the PyTorch path in both
        for _ in range(3):
            tok = a.float().argmax(-1)
            a, b = ref.step(tok), fused.step(tok)
            if not expect_fused:  # same ops on the same prepacked weights
                assert torch.equal(a, b)
        assert bool(calls) == expect_fused


def test_portable_build_matches_torch_step(fresh_library, monkeypatch):
    """The build without AVX512 (the plain-C loops every other x86-64 CPU gets) computes the same step."""
    monkeypatch.setattr(cpu_decode, "FLAGS", tuple("-march=x86-64" if f == "-march=native" else f
                                                   for f in cpu_decode.FLAGS))
    model = make_model(groups=2, seed=6, scale=0.3)
    ids, pad = _ragged_batch(2)
    for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 0.03)):
        ref = KVCacheDecoder(model, dtype=dtype, fused_cpu_step=False)
        fused = KVCacheDecoder(model, dtype=dtype, fused_cpu_step=True)
        for d in (ref, fused):
            d.allocate(3, 20)
        a, b = ref.prefill(ids, pad), fused.prefill(ids, pad)
        for _ in range(6):
            tok = a.float().argmax(-1)
            a, b = ref.step(tok), fused.step(tok)
            torch.testing.assert_close(b.float(), a.float(), atol=tol, rtol=tol)
