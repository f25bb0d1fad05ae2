"""Kernel micro-benchmarks: each Triton kernel against its eager PyTorch reference and ``torch.compile`` of it.

``benchmark_kernels(batches, vocab, device)`` returns one row per (kernel, batch, implementation):

* ``sample_step``: one decoding step, logits [batch, vocab] bf16, text top-p 0.9 / image top-k 100
  (every row starts in text mode, so the top-p path with its full-row sort in the reference runs).
* ``cross_entropy_z``: forward + backward of the fused CE + z-loss on logits [batch * seq, vocab] bf16
  (seq = ``ce_seq``: 1024 on a GPU, 128 on a CPU to keep the run minutes, not hours), plus the unfused
  fp32 path training used before (``logits.float()``, log_softmax CE + logsumexp) for memory.
* ``attention``: causal self-attention forward + backward at [batch, heads, seq, head_dim] (``attn_shapes``)
  in fp32 and bf16, q / k / v as megatron lays them out ([s, b, heads, dim] views): the CPU training
  kernel (``cpu_attention.c``) against ``F.scaled_dot_product_attention`` (PyTorch's CPU flash kernel).
  On a GPU there is no CPU kernel to time, so these rows say so.

Implementations are timed round-robin (a, b, c, a, b, c, ...) after one warm-up call each (the
warm-up holds the compile); ``ms`` is the median. ``peak_extra_mib`` is the peak CUDA memory above
what was allocated before the call (``torch.cuda.max_memory_allocated``); on a CPU it is not measured
(None). On a CPU the Triton rows say why they were not run: Triton needs CUDA to run natively, and the
interpreter is a test tool, not something to time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tessera.kernels import cpu_attention
from tessera.kernels._backend import triton_importable
from tessera.kernels.cross_entropy import cross_entropy_z_reference, cross_entropy_z_triton
from tessera.kernels.sampling import (
    DecodeState,
    ModalitySampling,
    SamplingParams,
    TokenRules,
    sample_step_reference,
    sample_step_triton,
)
from tessera.utils import default_device, short_dtype_name

Z_LOSS_WEIGHT = 1e-5  # Chameleon-7B's


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rules(vocab: int, device: torch.device) -> TokenRules:
    """A synthetic vocabulary: 8 specials, text pieces, up to 8192 image codes at the end (Chameleon's order)."""
    n_img = min(8192, vocab // 4)
    table = torch.zeros(vocab, dtype=torch.int8)
    table[:8] = 2
    table[vocab - n_img :] = 1
    return TokenRules(table.to(device), boi_id=2, eoi_id=3, eos_id=1, pad_id=0, image_tokens_per_image=1024,
                      max_seq_len=1 << 30)


def _compiled(fn: Callable, device: torch.device, enabled: bool = True) -> tuple[Callable | None, str]:
    """torch.compile(fn), or None and the reason it cannot run here."""
    if not enabled:
        return None, "skipped: compile=False (--no-compile)"
    if not hasattr(torch, "compile"):
        return None, "torch.compile not available in this torch"
    try:
        return torch.compile(fn, dynamic=False), ""
    except Exception as e:  # noqa: BLE001 - any failure is reported in the row, not raised
        return None, f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"


def _measure(impls: dict[str, Callable | None], device: torch.device, repeats: int) -> dict[str, dict]:
    """Warm each implementation up once, then time them round-robin; median ms, peak extra CUDA memory."""
    res: dict[str, dict] = {}
    live = {}
    for name, fn in impls.items():
        if fn is None:
            continue
        try:
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            res[name] = {"warmup_s": time.perf_counter() - t0, "times": [], "peak": None, "error": ""}
            live[name] = fn
        except Exception as e:  # noqa: BLE001 - e.g. torch.compile without a working compiler
            res[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"}
    for _ in range(repeats):
        for name, fn in live.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            res[name]["times"].append(time.perf_counter() - t0)
            if device.type == "cuda":
                peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
                res[name]["peak"] = max(res[name]["peak"] or 0.0, peak)
    return res


def _rows(kernel: str, batch: int, shape: str, impls: dict[str, Callable | None], notes: dict[str, str],
          device: torch.device, repeats: int, eager: str) -> list[dict]:
    res = _measure(impls, device, repeats)
    eager_ms = statistics.median(res[eager]["times"]) * 1e3 if res.get(eager, {}).get("times") else None
    rows = []
    for name in impls:
        r = res.get(name)
        row = {"kernel": kernel, "batch": batch, "shape": shape, "impl": name, "ms": None, "speedup_vs_eager": None,
               "peak_extra_mib": None, "note": notes.get(name, "")}
        if r is not None and r.get("times"):
            ms = statistics.median(r["times"]) * 1e3
            row.update(ms=ms, speedup_vs_eager=(eager_ms / ms) if eager_ms else None, peak_extra_mib=r["peak"])
            if name.startswith("torch.compile"):
                row["note"] = (row["note"] + f" first call (compile) {r['warmup_s']:.1f} s").strip()
        elif r is not None:
            row["note"] = (row["note"] + " failed: " + r["error"]).strip()
        rows.append(row)
    return rows


def _sampling_rows(batch: int, vocab: int, device: torch.device, repeats: int, run_triton: bool,
                   triton_note: str, compile: bool) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(batch)
    logits = (3 * torch.randn(batch, vocab, generator=g)).to(device=device, dtype=torch.bfloat16)
    rules = _rules(vocab, device)
    params = SamplingParams(text=ModalitySampling(temperature=1.0, top_p=0.9),
                            image=ModalitySampling(temperature=1.0, top_k=100))
    start = DecodeState.start([16] * batch, device=device)

    def step(fn):
        return lambda: fn(logits, start.clone(), rules, params, 1234, 0)  # the same state every call

    compiled, why = _compiled(sample_step_reference, device, compile)
    if compiled is not None:
        why = "graph breaks at the reference's data-dependent branches;"
    impls = {
        "triton": step(sample_step_triton) if run_triton else None,
        "reference (eager)": step(sample_step_reference),
        "torch.compile(reference)": step(compiled) if compiled is not None else None,
    }
    notes = {"triton": triton_note if not run_triton else "", "torch.compile(reference)": why}
    return _rows("sample_step", batch, f"[{batch}, {vocab}] bf16", impls, notes, device, repeats, "reference (eager)")


def _unfused_fp32(logits: torch.Tensor, labels: torch.Tensor, zw: float) -> torch.Tensor:
    """What training computed before the fused kernel: an fp32 copy of the logits, CE and logsumexp on it."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    ce = torch.nn.functional.cross_entropy(x, labels, reduction="none")
    return ce + zw * lse.square()


def _ce_rows(batch: int, seq: int, vocab: int, device: torch.device, repeats: int, run_triton: bool,
             triton_note: str, compile: bool) -> list[dict]:
    tokens = batch * seq
    g = torch.Generator(device="cpu").manual_seed(batch)
    logits = (3 * torch.randn(tokens, vocab, generator=g)).to(device=device, dtype=torch.bfloat16).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=g).to(device)

    def fwd_bwd(fn):
        def go():
            logits.grad = None
            fn(logits, labels, Z_LOSS_WEIGHT).mean().backward()
        return go

    def ref_loss(x, y, zw):
        return cross_entropy_z_reference(x, y, zw).loss

    def tri_loss(x, y, zw):
        return cross_entropy_z_triton(x, y, zw).loss

    compiled, why = _compiled(ref_loss, device, compile)
    impls = {
        "triton": fwd_bwd(tri_loss) if run_triton else None,
        "reference (eager)": fwd_bwd(ref_loss),
        "torch.compile(reference)": fwd_bwd(compiled) if compiled is not None else None,
        "unfused fp32 (eager)": fwd_bwd(_unfused_fp32),
    }
    notes = {"triton": triton_note if not run_triton else "", "torch.compile(reference)": why,
             "unfused fp32 (eager)": "logits.float() + log_softmax CE + logsumexp (before the fused kernel)"}
    rows = _rows("cross_entropy_z fwd+bwd", batch, f"[{batch}x{seq}, {vocab}] bf16", impls, notes, device, repeats,
                 "reference (eager)")
    return rows


def _attention_rows(shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device,
                    repeats: int) -> list[dict]:
    b, h, s, d = shape
    g = torch.Generator().manual_seed(s)
    base = torch.randn(s, b, 3, h, d, generator=g).to(dtype)  # megatron's QKV split: [s, b, heads, dim] views
    q, k, v = (base[:, :, i].permute(1, 2, 0, 3) for i in range(3))
    dout = torch.randn(b, h, s, d, generator=g).to(dtype)

    def fwd_bwd(fn):
        def go():
            fn(*(t.detach().requires_grad_() for t in (q, k, v))).backward(dout)
        return go

    ours_ok = device.type == "cpu" and cpu_attention.supports(q, k, v, 0.0)
    impls = {
        "C (cpu_attention.c)": fwd_bwd(lambda a, b_, c: cpu_attention.attention(a, b_, c, causal=True)) if ours_ok else None,
        "SDPA (eager)": fwd_bwd(lambda a, b_, c: F.scaled_dot_product_attention(a, b_, c, is_causal=True)),
    }
    why = ("not run: a CPU kernel (on a GPU attention is SDPA / Transformer Engine)" if device.type != "cpu"
           else f"not run: {cpu_attention.unavailable_reason() or 'shape not covered'}")
    name = short_dtype_name(dtype)
    return _rows("attention fwd+bwd (causal)", b, f"[{b}, {h}, {s}, {d}] {name}", impls,
                 {"C (cpu_attention.c)": "" if ours_ok else why}, device, repeats, "SDPA (eager)")


KERNELS = ("sample_step", "cross_entropy_z", "attention")
ATTN_SHAPES = ((2, 4, 512, 64), (1, 8, 2048, 128))  # the demo's training shape; a 7B-like head at 2k tokens


def benchmark_kernels(batches: tuple[int, ...] = (1, 8, 64), vocab: int = 65536, device: str | None = None, *,
                      ce_seq: int | None = None, repeats: int | None = None, compile: bool = True,
                      kernels: tuple[str, ...] = KERNELS,
                      attn_shapes: tuple[tuple[int, int, int, int], ...] = ATTN_SHAPES) -> list[dict]:
    """Rows for ``tessera bench kernels`` (see the module docstring). ``batches``: decoding batch for
    ``sample_step``, sequences of ``ce_seq`` tokens for the cross-entropy; ``attn_shapes``: [batch, heads,
    seq, head_dim] for the attention rows. ``compile=False`` skips the
    torch.compile rows (their first call compiles for seconds to minutes on a CPU)."""
    unknown = set(kernels) - set(KERNELS)
    if unknown:
        raise ValueError(f"benchmark_kernels: unknown kernels {sorted(unknown)}; choose from {KERNELS}")
    dev = default_device(device)
    on_gpu = dev.type == "cuda"
    run_triton = on_gpu and triton_importable()
    triton_note = ("not run: Triton needs a CUDA device (its CPU interpreter is for tests, not timing)" if not on_gpu
                   else "not run: triton does not import")
    seq = ce_seq if ce_seq is not None else (1024 if on_gpu else 128)
    reps = repeats if repeats is not None else (10 if on_gpu else 3)
    rows: list[dict] = []
    if "sample_step" in kernels:
        for b in batches:
            rows += _sampling_rows(b, vocab, dev, reps, run_triton, triton_note, compile)
    if "cross_entropy_z" in kernels:
        for b in batches:
            rows += _ce_rows(b, seq, vocab, dev, reps, run_triton, triton_note, compile)
    if "attention" in kernels:
        for shape in attn_shapes:
            for dtype in (torch.float32, torch.bfloat16):
                rows += _attention_rows(shape, dtype, dev, reps)
    return rows


def run_kernels(batches: tuple[int, ...] = (1, 8, 64), vocab: int = 65536, device: str | None = None,
                compile: bool = True, attn_shapes: tuple[tuple[int, int, int, int], ...] | None = None) -> dict:
    """``tessera bench kernels``: the rows of ``benchmark_kernels`` and a note on what was timed where."""
    rows = benchmark_kernels(batches=batches, vocab=vocab, device=device, compile=compile,
                             attn_shapes=attn_shapes or ATTN_SHAPES)
    on_gpu = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    note = ("kernels: Triton vs PyTorch reference" if on_gpu else
            "kernels on CPU: Triton cannot run natively here, so these time the PyTorch references only, "
            "and the CPU attention kernel against SDPA")
    return {"batches": list(batches), "vocab": vocab, "note": note, "rows": rows}
