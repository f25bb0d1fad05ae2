"""Fused cross-entropy + z-loss: Triton kernels (interpreted on CPU) and the chunked PyTorch reference
against autograd on a plain fp32 log_softmax, in fp32 and bf16, with ignored tokens, a vocabulary that
is not a multiple of the block, in-place backward, and TP=2 (two gloo processes) equal to TP=1."""

import os
import socket

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest
import torch
import torch.multiprocessing as mp

from tessera.kernels import cross_entropy_z, use_triton_interpreter

IGNORE = -100
T, V, BLOCK = 9, 300, 64  # 300 = 4 full blocks + a partial one
ZW = 3e-2


def _data(dtype, seed=0, tokens=T, vocab=V, scale=4.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(tokens, vocab, generator=g) + offset).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[1] = IGNORE
    labels[tokens - 2] = IGNORE
    g_ce = torch.randn(tokens, generator=g)  # upstream gradients: ce and z weighted differently
    g_z = torch.randn(tokens, generator=g)
    return logits, labels, g_ce, g_z


def _plain(logits, labels, zw, g_ce, g_z):
    """fp32 autograd on log_softmax: per-token ce, z, lse and d(sum g_ce*ce + g_z*z)/dlogits."""
    x = logits.detach().float().requires_grad_()
    valid = labels != IGNORE
    logp = torch.log_softmax(x, dim=-1)
    ce = torch.where(valid, -logp.gather(1, labels.clamp(min=0)[:, None])[:, 0], 0.0)
    lse = torch.logsumexp(x, dim=-1)
    z = torch.where(valid, zw * lse.square(), 0.0)
    ((g_ce * ce).sum() + (g_z * z).sum()).backward()
    return ce.detach(), z.detach(), lse.detach(), x.grad


def _ours(backend, logits, labels, zw, g_ce, g_z, **kw):
    x = logits.clone().requires_grad_()
    out = cross_entropy_z(x, labels, zw, ignore_index=IGNORE, backend=backend, block=BLOCK, **kw)
    ((g_ce * out.ce).sum() + (g_z * out.z).sum()).backward()
    return out, x.grad


@pytest.fixture(scope="module", autouse=True)
def _interpreter():
    use_triton_interpreter()


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_plain_log_softmax(backend, dtype):
    logits, labels, g_ce, g_z = _data(dtype)
    ce, z, lse, grad = _plain(logits, labels, ZW, g_ce, g_z)
    out, ours = _ours(backend, logits, labels, ZW, g_ce, g_z)
    # the forward reads the same (bf16-rounded) logits in fp32: fp32 tolerance for both dtypes
    torch.testing.assert_close(out.ce, ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.z, z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.lse, lse, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out.loss, ce + z)
    assert out.ce.dtype == torch.float32 and ours.dtype == dtype  # gradient written in the logits' dtype
    assert (out.ce[labels == IGNORE] == 0).all() and (out.z[labels == IGNORE] == 0).all()
    # fp32: to fp32 rounding; bf16: the gradient itself is rounded to bf16 (8 bits of mantissa)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2 * grad.abs().max().item())
    torch.testing.assert_close(ours.float(), grad, **tol)
    # ignored rows still get the z-loss gradient? no: z is 0 there, and so is ce, so their gradient is 0
    assert (ours[labels == IGNORE] == 0).all()


def test_loss_gradient_and_large_logits():
    """backward through ``loss`` (= ce + z) and through ``lse`` directly; logits far from 0 do not overflow."""
    logits, labels, g_ce, _ = _data(torch.float32, seed=3, offset=300.0)
    for backend in ("reference", "triton"):
        x = logits.clone().requires_grad_()
        out = cross_entropy_z(x, labels, ZW, ignore_index=IGNORE, backend=backend, block=BLOCK)
        ((g_ce * out.loss).sum() + out.lse.sum()).backward()
        r = logits.clone().requires_grad_()
        valid = labels != IGNORE
        lse = torch.logsumexp(r, -1)
        loss = torch.where(valid, lse - r.gather(1, labels.clamp(min=0)[:, None])[:, 0] + ZW * lse.square(), 0.0)
        ((g_ce * loss).sum() + lse.sum()).backward()
        assert torch.isfinite(out.loss).all()
        torch.testing.assert_close(out.loss, loss, rtol=1e-6, atol=1e-4)
        torch.testing.assert_close(x.grad, r.grad, rtol=1e-5, atol=1e-5)


def test_triton_equals_reference_and_block_independence():
    logits, labels, g_ce, g_z = _data(torch.float32, seed=5, tokens=6, vocab=1000)
    ref, gref = _ours("reference", logits, labels, ZW, g_ce, g_z)
    tri, gtri = _ours("triton", logits, labels, ZW, g_ce, g_z)
    torch.testing.assert_close(tri.loss, ref.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gtri, gref, rtol=1e-6, atol=1e-7)
    # the reference's chunk width changes rounding only (default width = the whole row here)
    x = logits.clone().requires_grad_()
    whole = cross_entropy_z(x, labels, ZW, ignore_index=IGNORE, backend="reference")
    torch.testing.assert_close(whole.loss, ref.loss, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_inplace_backward_overwrites_intermediate_logits_only(backend):
    logits, labels, g_ce, g_z = _data(torch.float32, seed=7)
    _, want = _ours(backend, logits, labels, ZW, g_ce, g_z)
    # intermediate logits (as from the output layer): the gradient lands in their buffer
    w = torch.ones(1, requires_grad=True)
    inter = logits * w
    out = cross_entropy_z(inter, labels, ZW, ignore_index=IGNORE, backend=backend, block=BLOCK, inplace_backward=True)
    seen = []
    inter.register_hook(lambda g: seen.append(g))
    ((g_ce * out.ce).sum() + (g_z * out.z).sum()).backward()
    torch.testing.assert_close(seen[0], want, rtol=1e-6, atol=1e-7)
    assert seen[0].data_ptr() == inter.data_ptr()  # no logits-sized gradient buffer was allocated
    torch.testing.assert_close(w.grad, (want * logits).sum().reshape(1), rtol=1e-5, atol=1e-5)
    # a leaf is the caller's own tensor: never overwritten, even when asked
    leaf = logits.clone().requires_grad_()
    out = cross_entropy_z(leaf, labels, ZW, ignore_index=IGNORE, backend=backend, block=BLOCK, inplace_backward=True)
    ((g_ce * out.ce).sum() + (g_z * out.z).sum()).backward()
    assert torch.equal(leaf.detach(), logits)
    torch.testing.assert_close(leaf.grad, want, rtol=1e-6, atol=1e-7)
    # nor a view of a leaf (language_model_loss flattens [b, s, V] with a reshape)
    leaf3 = logits.clone().view(1, T, V).requires_grad_()
    out = cross_entropy_z(leaf3.reshape(T, V), labels, ZW, ignore_index=IGNORE, backend=backend, block=BLOCK,
                          inplace_backward=True)
    ((g_ce * out.ce).sum() + (g_z * out.z).sum()).backward()
    assert torch.equal(leaf3.detach()[0], logits)
    torch.testing.assert_close(leaf3.grad[0], want, rtol=1e-6, atol=1e-7)


def test_dispatch_and_errors():
    logits, labels, _, _ = _data(torch.float32)
    auto = cross_entropy_z(logits, labels, ZW, ignore_index=IGNORE)  # CPU: the reference
    ref = cross_entropy_z(logits, labels, ZW, ignore_index=IGNORE, backend="reference")
    assert torch.equal(auto.loss, ref.loss)
    with pytest.raises(ValueError, match="backend must be one of"):
        cross_entropy_z(logits, labels, backend="cuda")
    with pytest.raises(ValueError, match=r"logits must be \[tokens, V/TP\]"):
        cross_entropy_z(logits, labels[:3])
    with pytest.raises(ValueError, match="dtype"):
        cross_entropy_z(logits.to(torch.float64), labels)
    with pytest.raises(ValueError, match="power of two"):
        cross_entropy_z(logits, labels, backend="triton", block=48)
    # beyond the blocks tessera.kernels.aot compiles ahead of time
    with pytest.raises(ValueError, match="power of two from 16 to 4096, got 8192"):
        cross_entropy_z(logits, labels, backend="triton", block=8192)


def test_language_model_loss_is_deterministic_and_takes_bf16():
    from tessera.model import language_model_loss

    g = torch.Generator().manual_seed(11)
    base = 3 * torch.randn(2, 5, 256, generator=g)
    labels = torch.randint(0, 256, (2, 5), generator=g)
    mask = (torch.rand(2, 5, generator=g) > 0.3).float()
    grads = []
    for _ in range(2):
        x = base.clone().requires_grad_()
        language_model_loss(x, labels, mask, 1e-2).total.backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])  # bitwise, run to run
    xb = base.to(torch.bfloat16).requires_grad_()
    out = language_model_loss(xb, labels, mask, 1e-2)
    out.total.backward()
    ref = language_model_loss(base.to(torch.bfloat16).float(), labels, mask, 1e-2)
    assert out.total.item() == pytest.approx(ref.total.item(), rel=1e-6)
    assert xb.grad.dtype == torch.bfloat16


# ---- TP=2: two gloo processes, each with half of the vocabulary ------------------------------------------
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tp_worker(rank, port, tmpdir):
    import torch.distributed as dist

    from tessera.kernels import cross_entropy_z, use_triton_interpreter

    use_triton_interpreter()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        out = {}
        for dtype in (torch.float32, torch.bfloat16):
            logits, labels, g_ce, g_z = _data(dtype, seed=13, vocab=2 * 160)  # 160 per rank: partial block
            shard = logits.chunk(2, dim=1)[rank].contiguous()
            for backend in ("reference", "triton"):
                x = shard.clone().requires_grad_()
                res = cross_entropy_z(x, labels, ZW, ignore_index=IGNORE, tp_group=dist.group.WORLD,
                                      backend=backend, block=BLOCK)
                ((g_ce * res.ce).sum() + (g_z * res.z).sum()).backward()
                out[(str(dtype), backend)] = (res.loss, res.lse, x.grad)
        torch.save(out, os.path.join(tmpdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_2_matches_single_process(tmp_path):
    mp.spawn(_tp_worker, args=(_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for dtype in (torch.float32, torch.bfloat16):
        logits, labels, g_ce, g_z = _data(dtype, seed=13, vocab=2 * 160)
        for backend in ("reference", "triton"):
            full, grad = _ours(backend, logits, labels, ZW, g_ce, g_z)
            (l0, lse0, g0), (l1, lse1, g1) = (r[(str(dtype), backend)] for r in ranks)
            assert torch.equal(l0, l1) and torch.equal(lse0, lse1)  # the loss is replicated on both ranks
            torch.testing.assert_close(l0, full.loss, rtol=1e-6, atol=1e-5)
            torch.testing.assert_close(lse0, full.lse, rtol=1e-6, atol=1e-5)
            tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
            torch.testing.assert_close(torch.cat([g0, g1], dim=1).float(), grad.float(), **tol)


@pytest.mark.slow  # torch.compile's first call: 5-50 s on the shared 2-core machine
def test_benchmark_rows_with_torch_compile():
    """The kernel benchmark's rows: eager reference, torch.compile of it (or why not), the unfused baseline;
    on a CPU the Triton row says why it was not run."""
    from tessera.bench.kernels import benchmark_kernels

    rows = benchmark_kernels(batches=(1,), vocab=256, device="cpu", ce_seq=8, repeats=1, kernels=("cross_entropy_z",))
    by = {r["impl"]: r for r in rows}
    assert set(by) == {"triton", "reference (eager)", "torch.compile(reference)", "unfused fp32 (eager)"}
    assert by["triton"]["ms"] is None and "CUDA" in by["triton"]["note"]
    assert by["reference (eager)"]["ms"] > 0 and by["reference (eager)"]["speedup_vs_eager"] == 1.0
    comp = by["torch.compile(reference)"]
    assert (comp["ms"] or 0) > 0 or "failed" in comp["note"], comp
    with pytest.raises(ValueError, match="unknown kernels"):
        benchmark_kernels(batches=(1,), vocab=256, kernels=("softmax",))


def test_interpreter_switched_on_after_triton_import_is_a_clear_error():
    """triton's own @jit helpers (tl.max, tl.sum) are decorated when triton is imported and cannot be redone."""
    import subprocess
    import sys

    code = (
        "import os; os.environ.pop('TRITON_INTERPRET', None)\n"
        "import torch, triton.language\n"
        "from tessera.kernels import cross_entropy_z, use_triton_interpreter\n"
        "use_triton_interpreter()\n"
        "try:\n"
        "    cross_entropy_z(torch.randn(2, 8), torch.tensor([1, 2]), backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'TRITON_INTERPRET=1 before' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
