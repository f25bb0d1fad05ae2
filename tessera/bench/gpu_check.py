"""``tessera bench gpu-check --out DIR``: one command that validates a GPU (docs/training.md, "Validating a GPU").

Parts, each recorded as pass / fail / skip with its numbers and reasons; a failing part never stops
the later ones (each runs in try/except, within its own time budget):

1. ``versions``: Python, torch, CUDA, cuDNN, Triton, megatron-core, Transformer Engine (or its absence),
   the GPU; the CPU compatibility layer (tessera/model/cpu.py) must be inactive.
2. ``kernels``: the compiled (not interpreted) Triton kernels against their PyTorch references: fused
   cross-entropy + z-loss forward / backward in bf16 and fp32, with a tokens x vocab > 2**31 case; the
   sampling step with CFG off / 2 / 3 streams and top-k / top-p at B=64, V=65536, timed against the
   eager reference and torch.compile of it.
3. ``te_vs_local`` .. 6. ``generate``: tessera/bench/gpu_check_model.py (the harness they share -- sizes, a
   part's record and budget -- is tessera/bench/gpu_check_harness.py).
7. ``vq``: the `demo` VQ preset trains in bf16 (tessera/bench/gpu_check_vq.py).
8. ``aot``: every kernel specialisation compiled for sm_80 and sm_90 (tessera.kernels.aot), last,
   with what is left of the time budget.

Writes DIR/gpu_check.json and DIR/gpu_check.md, and prints the table. Exit status: 0 when nothing
failed, 1 when a part failed, 3 (one line) on a machine without CUDA. ``--compile-only`` runs part 8
anywhere. ``--dry-run-cpu`` (a developer check) runs every part's code on the CPU at tiny sizes,
Triton through its interpreter, so the script's Python is exercised before GPU time is spent.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tessera.bench.gpu_check_harness import (
    DRY_SIZES,
    GPU_SIZES,
    Context,
    OutOfTime,
    Part,
    Skip,
    median_ms,
    rel_err,
    run_part,
)
from tessera.utils import atomic_write_text

EXIT_NO_CUDA = 3
TOTAL_BUDGET_S = 470.0  # the whole run must fit in 8 minutes on one H100


# ---- part 1: versions ------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def part_versions(p: Part) -> None:
    import torch

    p.note(python=platform.python_version(), torch=torch.__version__, torch_cuda=torch.version.cuda,
           cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    try:
        import triton

        p.note(triton=triton.__version__)
    except Exception as exc:  # noqa: BLE001
        p.note(triton=f"not importable: {type(exc).__name__}: {exc}")
    p.note(megatron_core=_version("megatron-core") or _version("megatron_core"))
    te = _version("transformer-engine") or _version("transformer_engine")
    if te is None:
        try:
            import transformer_engine  # noqa: F401

            te = getattr(transformer_engine, "__version__", "unknown version")
        except Exception as exc:  # noqa: BLE001 - absent, or built against another CUDA / torch
            te = f"absent ({type(exc).__name__})"
    p.note(transformer_engine=te, tessera_interpreter=os.environ.get("TRITON_INTERPRET", "unset"))
    if p.ctx.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        p.note(gpu=props.name, capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
               memory_gib=round(props.total_memory / 2**30, 1), gpus_visible=torch.cuda.device_count())
    else:
        p.note(gpu=None, cpu=platform.processor() or platform.machine())
    from tessera.model.cpu import enable_cpu_compat, is_cpu_compat_enabled

    active = enable_cpu_compat()  # what build_model / initialize_parallel call: a no-op when CUDA is present
    if p.ctx.dry_run:
        p.note(cpu_compat_active=active, cpu_compat_note="dry run: the CPU layer is expected to be active")
    else:
        p.check("CPU compatibility layer inactive", not active and not is_cpu_compat_enabled(), active=active)
    p.check("megatron-core importable", _importable("megatron.core"))


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001
        return False
    return True


# ---- part 2: kernels ---------------------------------------------------------------------------------
def part_kernels(p: Part) -> None:
    import torch

    from tessera.kernels import _backend

    dev = p.ctx.device
    if dev == "cuda":
        interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or _backend._kernels_interpreted()
        p.check("Triton kernels compiled, not interpreted", not interpreted)
    else:
        _backend.use_triton_interpreter()
    s = p.ctx.sizes
    for dtype in (torch.bfloat16, torch.float32):
        for tokens, vocab in s.ce_shapes:
            p.need(10, "a cross-entropy case")
            _ce_case(p, tokens, vocab, dtype, dev)
    p.need(30, "the tokens x vocab > 2**31 cross-entropy case")
    if s.ce_big is not None:
        _ce_big_case(p, *s.ce_big, dev)
    else:
        _ce_big_strided_cpu(p)
    p.need(30, "the sampling step")
    _sampling_cases(p, dev)


def _ce_reference(x, labels, zw: float, upstream=None):
    """fp32 per-token loss, lse and d(sum loss)/dx of logits ``x`` (autograd on log_softmax)."""
    import torch

    z = x.detach().float().requires_grad_()
    lse = torch.logsumexp(z, dim=-1)
    ce = lse - z.gather(1, labels[:, None])[:, 0]
    loss = ce + zw * lse.square()
    loss.backward(upstream if upstream is not None else torch.ones_like(loss))
    return loss.detach(), lse.detach(), z.grad


def _ce_case(p: Part, tokens: int, vocab: int, dtype, dev: str) -> None:
    import torch

    from tessera.kernels import cross_entropy_z_reference, cross_entropy_z_triton

    g = torch.Generator(device=dev).manual_seed(tokens + vocab)
    x = (4 * torch.randn(tokens, vocab, generator=g, device=dev)).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=g, device=dev)
    zw = 1e-4
    want_loss, want_lse, want_grad = _ce_reference(x, labels, zw)
    xt = x.clone().requires_grad_()
    out = cross_entropy_z_triton(xt, labels, zw)
    out.loss.sum().backward()
    name = f"cross_entropy_z {str(dtype).replace('torch.', '')} [{tokens}x{vocab}]"
    grad_tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    p.check(f"{name} forward", rel_err(out.loss, want_loss) < 1e-5 and rel_err(out.lse, want_lse) < 1e-5,
            loss_rel_err=rel_err(out.loss, want_loss), lse_rel_err=rel_err(out.lse, want_lse), limit=1e-5)
    p.check(f"{name} backward", rel_err(xt.grad.float(), want_grad) < grad_tol,
            grad_rel_err=rel_err(xt.grad.float(), want_grad), limit=grad_tol, grad_dtype=str(xt.grad.dtype))
    if dev == "cuda" and dtype == torch.bfloat16 and tokens * vocab >= 1 << 28:
        reps = p.ctx.sizes.timing_reps

        def run(fn):
            def go():
                xt.grad = None
                fn(xt, labels, zw).loss.sum().backward()
            return go

        t_tri = median_ms(run(cross_entropy_z_triton), dev, reps)
        t_ref = median_ms(run(cross_entropy_z_reference), dev, reps)
        moved = tokens * vocab * x.element_size() * 3  # forward read, backward read + write
        p.note(**{f"ce_{tokens}x{vocab}_bf16_triton_ms": t_tri, f"ce_{tokens}x{vocab}_bf16_reference_ms": t_ref,
                  f"ce_{tokens}x{vocab}_bf16_triton_gbps": moved / t_tri / 1e6})


def _ce_big_case(p: Part, tokens: int, vocab: int, dev: str) -> None:
    """bf16 logits with tokens x vocab > 2**31: every row's loss against a chunked fp32 reference, the
    gradient of the first rows and of the last rows (whose offsets exceed 2**31 elements)."""
    import torch

    from tessera.kernels import cross_entropy_z_triton

    assert tokens * vocab > 2**31
    x = torch.empty(tokens, vocab, device=dev, dtype=torch.bfloat16)
    g = torch.Generator(device=dev).manual_seed(0)
    for r0 in range(0, tokens, 2048):  # fill in chunks: a 4 GiB fp32 temporary is not needed
        x[r0 : r0 + 2048] = (4 * torch.randn(min(2048, tokens - r0), vocab, device=dev, generator=g)).to(x.dtype)
    labels = torch.randint(0, vocab, (tokens,), device=dev, generator=g)
    zw = 1e-4
    x.requires_grad_()
    out = cross_entropy_z_triton(x, labels, zw)
    out.loss.sum().backward()
    worst = 0.0
    for r0 in range(0, tokens, 1024):
        want, _, _ = _ce_reference(x[r0 : r0 + 1024].detach(), labels[r0 : r0 + 1024], zw)
        worst = max(worst, rel_err(out.loss[r0 : r0 + 1024], want))
    first = slice(0, 16)
    last = slice(tokens - 16, tokens)
    g_err = max(rel_err(x.grad[sl].float(), _ce_reference(x[sl].detach(), labels[sl], zw)[2]) for sl in (first, last))
    p.check(f"cross_entropy_z bf16 [{tokens}x{vocab}] (> 2**31 logits) forward", worst < 1e-5,
            loss_rel_err_worst_chunk=worst, last_row_offset=(tokens - 1) * vocab, limit=1e-5)
    p.check(f"cross_entropy_z bf16 [{tokens}x{vocab}] (> 2**31 logits) backward, rows beyond 2**31", g_err < 1e-2,
            grad_rel_err=g_err, limit=1e-2)


def _ce_big_strided_cpu(p: Part) -> None:
    """The dry run's stand-in for the > 2**31 case: three rows 2**30 + 64 elements apart in a sparse
    file mapped into memory (only the rows touched are ever written), run through the interpreter."""
    import tempfile

    import torch

    from tessera.kernels import cross_entropy_z_triton

    v, stride, front = 256, (1 << 30) + 64, 1 << 31
    with tempfile.TemporaryDirectory(prefix="gpu-check-sparse-") as tmp:
        big = torch.from_file(os.path.join(tmp, "x.bin"), shared=True, size=front + 2 * stride + v, dtype=torch.bfloat16)
        x = big[front:].as_strided((3, v), (stride, 1))
        values = (4 * torch.randn(3, v, generator=torch.Generator().manual_seed(0))).to(torch.bfloat16)
        x.copy_(values)
        labels = torch.tensor([1, 2, 3])
        want, _, want_grad = _ce_reference(values, labels, 1e-4)
        xt = x.detach().requires_grad_()
        out = cross_entropy_z_triton(xt, labels, 1e-4)
        out.loss.sum().backward()
        p.check("cross_entropy_z bf16 rows 2**31 elements apart (strided, dry run)",
                rel_err(out.loss, want) < 1e-5 and rel_err(xt.grad.float(), want_grad) < 1e-2,
                loss_rel_err=rel_err(out.loss, want), grad_rel_err=rel_err(xt.grad.float(), want_grad))
        del big, x, xt


def _sampling_rules(vocab: int, device: str):
    import torch

    from tessera.kernels import TokenRules

    n_img = min(8192, vocab // 4)
    table = torch.zeros(vocab, dtype=torch.int8)
    table[:8] = 2
    table[vocab - n_img :] = 1
    return TokenRules(table.to(device), boi_id=2, eoi_id=3, eos_id=1, pad_id=0,
                      image_tokens_per_image=min(1024, n_img), max_seq_len=1 << 20)


def _sampling_cases(p: Part, dev: str) -> None:
    import torch

    from tessera.kernels import (
        DecodeState,
        ModalitySampling,
        SamplingParams,
        sample_step_reference,
        sample_step_triton,
    )

    s = p.ctx.sizes
    b, v = s.sample_batch, s.sample_vocab
    rules = _sampling_rules(v, dev)
    cases = {
        "CFG off, text top-p 0.9 / image top-k 100": SamplingParams(
            text=ModalitySampling(temperature=1.0, top_p=0.9), image=ModalitySampling(temperature=1.0, top_k=100)),
        "CFG 2 streams, image top-k 100 + top-p 0.95": SamplingParams(
            text=ModalitySampling(temperature=0.8, top_k=50), image=ModalitySampling(temperature=1.0, top_k=100, top_p=0.95),
            cfg_groups=2, cfg_scale=3.0),
        "CFG 3 streams, image top-p 0.9": SamplingParams(
            text=ModalitySampling(temperature=1.0), image=ModalitySampling(temperature=1.0, top_p=0.9),
            cfg_groups=3, cfg_scale=2.0, cfg_scale_text=3.0),
    }
    g = torch.Generator(device="cpu").manual_seed(3)
    for name, params in cases.items():
        p.need(15, f"sampling case {name}")
        rows = params.cfg_groups * b
        logits = (3 * torch.randn(rows, v, generator=g)).to(device=dev, dtype=torch.bfloat16)
        # half the sequences inside an image (codes written 0..), half in text
        mode = (torch.arange(b) % 2).to(torch.int32)
        start = DecodeState(mode=mode.repeat(params.cfg_groups).to(dev),
                            codes_written=(torch.arange(b) % 7).to(torch.int32).repeat(params.cfg_groups).to(dev),
                            position=torch.full((rows,), 16, dtype=torch.int32, device=dev),
                            done=torch.zeros(rows, dtype=torch.int32, device=dev))
        outs = {}
        for impl, fn in (("triton", sample_step_triton), ("reference", sample_step_reference)):
            st = start.clone()
            probs = torch.zeros(b, v, device=dev)
            tok = fn(logits, st, rules, params, 1234, 5, probs_out=probs)
            outs[impl] = (tok, probs, st)
        (t_tok, t_prob, t_st), (r_tok, r_prob, r_st) = outs["triton"], outs["reference"]
        mismatched = int((t_tok != r_tok).sum())
        same_sets = bool(torch.equal(t_prob == 0, r_prob == 0))
        prob_err = float((t_prob - r_prob).abs().max())
        states_equal = all(torch.equal(getattr(t_st, f), getattr(r_st, f)) for f in ("mode", "codes_written", "position"))
        # tokens may differ only where float rounding moves a CDF boundary: at most one row in 64
        p.check(f"sample_step [{rows}, {v}] bf16, {name}",
                mismatched <= max(1, b // 64) and same_sets and prob_err < 1e-5 and (mismatched > 0 or states_equal),
                tokens_mismatched=mismatched, kept_sets_equal=same_sets, probs_max_abs_err=prob_err)
        reps = s.timing_reps

        def step(fn, params=params, logits=logits, start=start):
            return lambda: fn(logits, start.clone(), rules, params, 1234, 5)

        timings = {"triton": median_ms(step(sample_step_triton), dev, reps),
                   "eager reference": median_ms(step(sample_step_reference), dev, reps)}
        # torch.compile's first call takes tens of seconds (graph breaks at the reference's data-dependent
        # branches): once, when the budget allows; `tessera bench kernels` has the full comparison
        if s.compile_reference and dev == "cuda" and name == next(iter(cases)) and p.time_left() > 60:
            try:
                t0 = time.perf_counter()
                compiled = torch.compile(sample_step_reference, dynamic=False)
                step(compiled)()
                timings["torch.compile(reference)"] = median_ms(step(compiled), dev, reps)
                p.note(**{f"sampling_compile_first_call_s[{name}]": time.perf_counter() - t0})
            except Exception as exc:  # noqa: BLE001 - graph breaks or a missing compiler: report, go on
                p.note(**{f"sampling_compile_error[{name}]": f"{type(exc).__name__}: {str(exc)[:200]}"})
        elif s.compile_reference and dev == "cuda" and name == next(iter(cases)):
            p.note(sampling_compile="torch.compile(reference) not timed: too little of the budget left "
                                    "(tessera bench kernels times it)")
        for impl, ms in timings.items():
            p.note(**{f"sampling_ms[{name}][{impl}]": ms})
        p.note(**{f"sampling_speedup_vs_eager[{name}]": timings["eager reference"] / timings["triton"]})


# ---- part 8: ahead-of-time compilation -------------------------------------------------------------------
def part_aot(p: Part) -> None:
    s = p.ctx.sizes
    left = p.time_left()
    if left < 20:
        raise Skip(f"time budget: {left:.0f} s left (the whole sweep runs in CI: tests/test_kernels_aot.py)")
    out = p.ctx.out / "aot.json"
    cmd = [sys.executable, "-m", "tessera.kernels.aot", "--arch", ",".join(map(str, s.aot_archs)),
           "--json", str(out), "--quiet"]
    if s.aot_kernels:
        cmd += ["--kernels", ",".join(s.aot_kernels)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    timeout = None if p.ctx.dry_run else max(10.0, left)
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise OutOfTime(f"the compile sweep did not finish in {timeout:.0f} s") from None
    if not out.exists():
        raise RuntimeError(f"tessera.kernels.aot exited {proc.returncode}: {proc.stderr.strip()[-400:]}")
    rep = json.loads(out.read_text())
    sm = rep["summary"]
    p.note(triton=rep["triton"], archs=rep["archs"], compiled=sm["compiled"], wall_seconds=sm["wall_seconds"],
           report=str(out))
    failed = [f"sm_{r['arch']} {r['kernel']} {r['constexprs']}: {r['error'][:200]}"
              for r in rep["results"] if not r["duplicate"] and not r["ok"]]
    p.check("every kernel specialisation compiles", not failed, failed=len(failed), first_failures=failed[:3])


# ---- the run ----------------------------------------------------------------------------------------
PARTS: tuple[tuple[str, str, float], ...] = (
    # (name, title, budget seconds on a GPU)
    ("versions", "versions; CPU compatibility layer inactive", 20),
    ("kernels", "compiled Triton kernels vs PyTorch references", 90),
    ("te_vs_local", "Transformer Engine spec == local spec (bf16)", 50),
    ("cpu_checkpoint", "a CPU-saved checkpoint loads on the GPU with the same logits", 60),
    ("train", "tessera train in bf16: loss, memory, speed, syncs, save / resume / SIGTERM", 170),
    ("generate", "generation latency at batch 1 and 8 with CFG vs the bandwidth floor", 60),
    ("vq", "the demo VQ trains in bf16; its tokenizer reads the same codes on the GPU and the CPU", 45),
    ("aot", "every kernel specialisation compiles for sm_80 / sm_90", 60),
)


def _part_fn(name: str) -> Callable[[Part], None]:
    if name in ("versions", "kernels", "aot"):
        return globals()[f"part_{name}"]
    if name == "vq":
        from tessera.bench.gpu_check_vq import part_vq

        return part_vq
    from tessera.bench import gpu_check_model

    return getattr(gpu_check_model, f"part_{name}")


def run_gpu_check(out: Path, dry_run: bool = False, parts: tuple[str, ...] | None = None,
                  budget_s: float = TOTAL_BUDGET_S, log: Callable[[str], None] = print) -> dict:
    """Run the parts (all by default) and write DIR/gpu_check.json and DIR/gpu_check.md."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    sizes = DRY_SIZES if dry_run else GPU_SIZES
    ctx = Context(out=out, dry_run=dry_run, sizes=sizes, device="cpu" if dry_run else "cuda",
                  deadline=time.monotonic() + budget_s)
    chosen = parts or tuple(n for n, _, _ in PARTS)
    unknown = set(chosen) - {n for n, _, _ in PARTS}
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; choose from {[n for n, _, _ in PARTS]}")
    t0 = time.monotonic()
    results = []
    for name, title, budget in PARTS:
        if name not in chosen:
            continue
        log(f"== {name}: {title}")
        if not dry_run and time.monotonic() > ctx.deadline - 5:
            # not validated is not passed: recorded as failed, with the reason
            results.append({"part": name, "title": title, "status": "fail", "seconds": 0.0, "numbers": {},
                            "checks": [], "reason": f"not run: the run's {budget_s:.0f} s budget is spent"})
            log(f"   fail: {results[-1]['reason']}")
            continue
        try:
            fn = _part_fn(name)
        except Exception as exc:  # noqa: BLE001 - the model parts' module needs megatron-core
            results.append({"part": name, "title": title, "status": "fail", "seconds": 0.0, "numbers": {},
                            "checks": [], "reason": f"cannot import the part: {type(exc).__name__}: {exc}"})
        else:
            results.append(run_part(fn, name, title, budget, ctx))
        r = results[-1]
        log(f"   {r['status']} ({r['seconds']} s) {r['reason']}".rstrip())
    report = {
        "command": "tessera " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "mode": "dry-run-cpu" if dry_run else "gpu",
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "seconds": round(time.monotonic() - t0, 1),
        "passed": all(r["status"] != "fail" for r in results),
        "parts": results,
    }
    _write(out, report)
    log(format_report(report))
    return report


def _write(out: Path, report: dict) -> None:
    from tessera.bench.report import write_json

    write_json(out / "gpu_check.json", report)
    atomic_write_text(out / "gpu_check.md", format_report(report, markdown=True) + "\n")


def format_report(report: dict, markdown: bool = False) -> str:
    head = (f"tessera bench gpu-check ({report['mode']}) on {report['device']}, {report['time']}, "
            f"{report['seconds']} s: {'PASSED' if report['passed'] else 'FAILED'}")
    rows = []
    for r in report["parts"]:
        rows.append((r["part"], r["status"], f"{r['seconds']:.1f}", r["reason"] or r["title"]))
        for c in r["checks"]:
            nums = ", ".join(f"{k}={v}" for k, v in c.items() if k not in ("check", "status"))
            rows.append(("", c["status"], "", f"{c['check']}: {nums}" if nums else c["check"]))
        nums = ", ".join(f"{k}={v}" for k, v in r["numbers"].items() if k != "traceback")
        if nums:
            rows.append(("", "", "", nums))
    if markdown:
        lines = [f"**{head}**", "", "| part | status | s | details |", "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {d.replace('|', '/')} |" for a, b, c, d in rows]
        return "\n".join(lines)
    w = [max(len(x[i]) for x in rows + [("part", "status", "s", "")]) for i in range(3)]
    lines = [head, f"{'part'.ljust(w[0])}  {'status'.ljust(w[1])}  {'s'.rjust(w[2])}  details"]
    lines += [f"{a.ljust(w[0])}  {b.ljust(w[1])}  {c.rjust(w[2])}  {d}" for a, b, c, d in rows]
    return "\n".join(lines)


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="directory for gpu_check.json, gpu_check.md and logs")
    p.add_argument("--compile-only", action="store_true",
                   help="only compile every Triton kernel specialisation for sm_80 / sm_90 (no GPU needed)")
    p.add_argument("--dry-run-cpu", action="store_true",
                   help="developer check: run every part's code on the CPU at tiny sizes (Triton interpreted)")
    p.add_argument("--parts", default=None, help=f"comma-separated subset of: {','.join(n for n, _, _ in PARTS)}")
    p.add_argument("--budget-seconds", type=float, default=TOTAL_BUDGET_S, help="time budget of the whole run")
    p.add_argument("--strength", type=int, choices=(1, 2), default=1,
                   help="--compile-only: 1 = every argument class, 2 = every pair of classes (minutes)")


def _argv(args: argparse.Namespace) -> list[str]:
    """The options of ``args`` as a command line (to re-run the check in a fresh process)."""
    argv = ["--out", str(args.out), "--budget-seconds", str(args.budget_seconds), "--strength", str(args.strength)]
    argv += ["--compile-only"] * args.compile_only + ["--dry-run-cpu"] * args.dry_run_cpu
    return argv + (["--parts", args.parts] if args.parts else [])


def cmd_gpu_check(args: argparse.Namespace) -> int:
    parts = tuple(x for x in args.parts.split(",") if x) if args.parts else None
    if args.compile_only:
        from tessera.kernels.aot import ARCHS, compile_all, format_summary

        args.out.mkdir(parents=True, exist_ok=True)
        report = compile_all(ARCHS, args.strength, log=None)
        from tessera.bench.report import write_json

        write_json(args.out / "aot.json", report)
        print(format_summary(report))
        return 0 if report["summary"]["failed"] == 0 else 1
    if args.dry_run_cpu:
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and "triton" in sys.modules:
            # the interpreter must be on before triton is imported: run the check in a fresh process
            env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
            return subprocess.run([sys.executable, "-m", "tessera.bench.gpu_check", *_argv(args)], env=env).returncode
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if not args.dry_run_cpu and not torch.cuda.is_available():
        print(f"tessera bench gpu-check: no CUDA device (torch {torch.__version__} sees none); nothing to validate "
              "here (--compile-only and --dry-run-cpu run without one)")
        return EXIT_NO_CUDA
    try:
        report = run_gpu_check(args.out, dry_run=args.dry_run_cpu, parts=parts, budget_s=args.budget_seconds)
    except ValueError as exc:
        raise SystemExit(f"tessera bench gpu-check: {exc}") from None
    return 0 if report["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m tessera.bench.gpu_check``: the same command without the ``tessera`` CLI, which imports
    every subcommand (a machine missing one of their dependencies can still run the check)."""
    p = argparse.ArgumentParser(prog="python -m tessera.bench.gpu_check", description=__doc__.split("\n\n")[0])
    register(p)
    return cmd_gpu_check(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
