"""Compile every Triton kernel for real GPUs ahead of time, on any machine (no GPU needed).

Triton compiles a kernel once per *specialisation* of its arguments, at the first launch that needs
it: the constexpr values and launch options (``num_warps``), each pointer's dtype and whether its
address is 16-byte aligned, each integer's width (i32, or i64 from 2**31 up), whether it is divisible
by 16, and integers equal to 1, which become compile-time constants unless the parameter is listed
in ``do_not_specialize``. A specialisation that does not compile fails at that first launch, on the
GPU, mid-run. This module declares, per kernel, what the host code can pass (``sweeps()``), plans a set
of launches that covers every constexpr combination and every argument class, binds each launch with
Triton's own runtime binder for a CUDA target (so the specialisation is the one a GPU run would
build) and compiles it with ``triton.compile`` down to a cubin with the ptxas Triton ships.

``python -m tessera.kernels.aot [--arch 80,90] [--strength 1|2] [--kernels NAME,..] [--json out.json]``
(``tessera bench gpu-check --compile-only`` runs it too). Strength 1 (the default test run): every
constexpr combination, and every class of every argument at least once. Strength 2: every pair of
argument classes (and constexpr values) in at least one launch.

Each compiled launch is also checked for what a GPU would reject or get wrong at load time: the PTX
targets the requested architecture, shared memory fits the architecture's per-block limit, and every
row offset added to a kernel's pointer arguments is 64-bit (tokens x vocab may exceed 2**31).
Works with Triton 3.6 to 3.9 (the runtime-binder internals it reuses are the same there).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ARCHS = (80, 90)
# Largest dynamic shared memory one block may use (bytes): A100 (sm_80) and H100 (sm_90).
SHARED_LIMIT = {80: 166912, 90: 232448}

# Integer argument classes and a value of each: what Triton specialises on is ==1 (a constant), i32
# vs i64 (from 2**31) and divisible by 16 or not. An integer parameter gets every class unless the
# host code rules some out (I32: sizes and ids below 2**31); a superset of what the host code passes
# is cheap to cover and cannot miss a reachable class.
INT_CLASSES: dict[str, int] = {"one": 1, "i32/16": 4096, "i32": 4097, "i64/16": 1 << 32, "i64": (1 << 32) + 1}
I32 = ("one", "i32/16", "i32")
_ALIGNED = {True: "aligned", False: "unaligned"}  # the levels of a pointer whose dtype follows another

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int8: "i8",
                torch.int32: "i32", torch.int64: "i64"}


# ---- what each kernel can be launched with -----------------------------------------------------
@dataclass(frozen=True)
class Ptr:
    """A tensor argument: its dtypes, and whether the host code can pass an address that is not
    16-byte aligned (a view). ``like``: the dtype follows that pointer (a gradient written in the
    logits' dtype)."""

    dtypes: tuple[torch.dtype, ...] = ()
    like: str | None = None
    unaligned: bool = True


@dataclass(frozen=True)
class Int:
    classes: tuple[str, ...] = tuple(INT_CLASSES)


@dataclass(frozen=True)
class Float:
    """A Python float: always fp32, never specialised."""


@dataclass(frozen=True)
class Constexpr:
    values: tuple


Domain = Ptr | Int | Float | Constexpr


@dataclass(frozen=True)
class KernelSweep:
    """The launches the host code can make of one kernel.

    ``params``: every kernel parameter, in order. ``options``: the launch options the host code passes
    for given constexprs (num_warps...). ``fixed``: arguments the host code fixes for given constexprs
    (parameter -> level, e.g. an unused output pointer), overriding the plan.
    """

    module: str
    kernel: str
    params: dict[str, Domain]
    options: Callable[[dict], dict] = field(default=lambda constexprs: {})
    fixed: Callable[[dict], dict] = field(default=lambda constexprs: {})


def _sampling_fixed(constexprs: dict) -> dict:
    if constexprs["WRITE_PROBS"]:
        return {}
    # without probabilities sample_step_triton passes its token buffer (a fresh int64 tensor), stride 0
    return {"probs_ptr": (torch.int64, True), "probs_stride": "i32/16"}


def _ce_options(constexprs: dict) -> dict:
    from .cross_entropy import _triton_num_warps

    return {"num_warps": _triton_num_warps(constexprs["BLOCK"])}


def sweeps() -> tuple[KernelSweep, ...]:
    from .cross_entropy import TRITON_BLOCKS
    from .sampling import TRITON_BLOCKS as SAMPLING_BLOCKS

    floats = (torch.float32, torch.bfloat16, torch.float16)
    state = Ptr((torch.int32,))
    i32 = Int(I32)
    sampling = KernelSweep(
        module="tessera.kernels._sampling_triton",
        kernel="sample_step_kernel",
        params={
            # sample_step_triton copies logits rows / a modality table that are not 16-byte aligned
            "logits_ptr": Ptr(floats, unaligned=False), "stride": Int(("i32/16", "i64/16")),
            "table_ptr": Ptr((torch.int8,), unaligned=False),
            "mode_ptr": state, "cw_ptr": state, "pos_ptr": state, "done_ptr": state,
            "tok_ptr": Ptr((torch.int64,), unaligned=False),  # allocated by sample_step_triton
            "probs_ptr": Ptr((torch.float32,)), "probs_stride": Int(),
            # the vocabulary, ids, group count, image length and context (int32 positions) are < 2**31
            "V": i32, "n_groups": i32, "boi_id": i32, "eoi_id": i32, "eos_id": i32, "pad_id": i32,
            "n_img": i32, "max_len": i32,
            "t_temp": Float(), "t_k": Int(), "t_p": Float(), "i_temp": Float(), "i_k": Int(), "i_p": Float(),
            "g_img": Float(), "g_txt": Float(), "rng_key": Int(),  # a uint32: i64 from 2**31
            "CFG": Constexpr((1, 2, 3)), "WRITE_PROBS": Constexpr((False, True)),
            "BLOCK": Constexpr(SAMPLING_BLOCKS),
        },
        fixed=_sampling_fixed,
    )
    out = Ptr((torch.float32,), unaligned=False)  # [tokens] vectors allocated by cross_entropy.py
    ce_fwd = KernelSweep(
        module="tessera.kernels._ce_triton",
        kernel="ce_forward_kernel",
        params={
            "logits_ptr": Ptr(floats), "stride": Int(), "labels_ptr": Ptr((torch.int64,)),
            "max_ptr": out, "sumexp_ptr": out, "target_ptr": out,
            # this rank's vocabulary slice and its first global id are < 2**31
            "V": i32, "vocab_start": i32, "BLOCK": Constexpr(TRITON_BLOCKS),
        },
        options=_ce_options,
    )
    ce_bwd = KernelSweep(
        module="tessera.kernels._ce_triton",
        kernel="ce_backward_kernel",
        params={
            "logits_ptr": Ptr(floats), "stride": Int(), "grad_ptr": Ptr(like="logits_ptr"), "grad_stride": Int(),
            "labels_ptr": Ptr((torch.int64,)), "lse_ptr": out, "coef_sm_ptr": out, "coef_hot_ptr": out,
            "V": i32, "vocab_start": i32, "BLOCK": Constexpr(TRITON_BLOCKS),
        },
        options=_ce_options,
    )
    return sampling, ce_fwd, ce_bwd


# ---- planning: which launches cover the classes ------------------------------------------------
def _levels(sweep: KernelSweep) -> dict[str, list]:
    """The factor levels of each parameter that varies (floats do not)."""
    out: dict[str, list] = {}
    for name, d in sweep.params.items():
        if isinstance(d, Ptr):
            aligned = (True, False) if d.unaligned else (True,)
            out[name] = [_ALIGNED[a] for a in aligned] if d.like else [(t, a) for t in d.dtypes for a in aligned]
        elif isinstance(d, Int):
            out[name] = list(d.classes)
        elif isinstance(d, Constexpr):
            out[name] = list(d.values)
    return out


def plan(sweep: KernelSweep, strength: int = 1, salt: int = 0) -> list[dict]:
    """Launch rows (parameter -> level) covering every constexpr combination and, with strength 1,
    every level of every parameter; with strength 2, every pair of levels of any two parameters. A
    row holds the parameters it realises: the constexprs and those the host code does not fix for
    them (``KernelSweep.fixed``); ``launch_args`` fills in the fixed ones."""
    if strength not in (1, 2):
        raise ValueError(f"strength must be 1 or 2, got {strength}")
    levels = _levels(sweep)
    cnames = [n for n, d in sweep.params.items() if isinstance(d, Constexpr)]
    others = [n for n in levels if n not in cnames]
    combos = [dict(zip(cnames, c, strict=True)) for c in itertools.product(*(levels[n] for n in cnames))]
    free = [[n for n in others if n not in sweep.fixed(c)] for c in combos]
    never = [n for n in others if not any(n in f for f in free)]
    if never:
        raise ValueError(f"{sweep.kernel}: {never} are fixed for every constexpr combination; declare them fixed")
    if strength == 1:
        return _plan_each_level(levels, combos, free, salt)
    return _plan_pairs(levels, cnames, combos, free)


def _plan_each_level(levels: dict, combos: list[dict], free: list[list[str]], salt: int) -> list[dict]:
    """Every constexpr combination once, free parameters cycling through their levels (offset per
    parameter so rows differ), then extra rows until every level of every parameter has appeared."""
    counter = {n: salt + j for j, n in enumerate(levels)}
    missing = {(n, i) for n in levels for i in range(len(levels[n]))}

    def row_for(k: int) -> dict:
        row = dict(combos[k])
        for n in free[k]:
            i = counter[n] % len(levels[n])
            counter[n] += 1
            row[n] = levels[n][i]
        for n, v in row.items():
            missing.discard((n, levels[n].index(v)))
        return row

    rows = [row_for(k) for k in range(len(combos))]
    while missing:
        n = min(missing)[0]
        rows.append(row_for(next(k for k, f in enumerate(free) if n in f)))
    return rows


def _plan_pairs(levels: dict, cnames: list[str], combos: list[dict], free: list[list[str]]) -> list[dict]:
    """Greedy pairwise covering (each row adds the levels that cover the most uncovered pairs)."""
    names = list(levels)

    def feasible(a: str, la, b: str, lb) -> bool:
        return any(all(n in f or (n in c and c[n] == lv) for n, lv in ((a, la), (b, lb)))
                   for c, f in zip(combos, free, strict=True))

    uncovered = {(a, la, b, lb) for a, b in itertools.combinations(names, 2)
                 for la in levels[a] for lb in levels[b] if feasible(a, la, b, lb)}
    order = {n: i for i, n in enumerate(names)}

    def pair(a, la, b, lb):
        return (a, la, b, lb) if order[a] < order[b] else (b, lb, a, la)

    rows = []

    def fill(k: int, row: dict) -> None:
        for n in free[k]:
            if n not in row:
                row[n] = max(levels[n], key=lambda lv: sum(pair(n, lv, m, lm) in uncovered for m, lm in row.items()))
        for (a, la), (b, lb) in itertools.combinations(row.items(), 2):
            uncovered.discard(pair(a, la, b, lb))
        rows.append(row)

    for k, c in enumerate(combos):
        fill(k, dict(c))
    while uncovered:
        a, la, b, lb = min(uncovered, key=repr)
        k = next(k for k, (c, f) in enumerate(zip(combos, free, strict=True))
                 if all(n in f or (n in c and c[n] == lv) for n, lv in ((a, la), (b, lb))))
        row = dict(combos[k])
        row.update({n: lv for n, lv in ((a, la), (b, lb)) if n not in cnames})
        fill(k, row)
    return rows


# ---- the host code's launches against the declarations -------------------------------------------
def int_class(value: int) -> str:
    if value == 1:
        return "one"
    wide = not -(1 << 31) <= value < (1 << 31)
    return ("i64" if wide else "i32") + ("/16" if value % 16 == 0 else "")


@contextlib.contextmanager
def capture_launches():
    """Record instead of run every launch of the swept kernels (``kernel[grid](*args, **kwargs)``):
    yields a list that fills with (KernelSweep, args, kwargs). The host code's outputs are left unwritten."""
    import importlib

    launches: list = []
    patched = []

    class _Recorder:
        def __init__(self, sweep):
            self.sweep = sweep

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.sweep, args, kwargs))

    try:
        for sw in sweeps():
            mod = importlib.import_module(sw.module)
            patched.append((mod, sw.kernel, getattr(mod, sw.kernel)))
            setattr(mod, sw.kernel, _Recorder(sw))
        yield launches
    finally:
        for mod, name, kernel in patched:
            setattr(mod, name, kernel)


def _constexprs_of(sweep: KernelSweep, row: dict) -> dict:
    return {n: row[n] for n, d in sweep.params.items() if isinstance(d, Constexpr)}


def check_launch(sweep: KernelSweep, args: tuple, kwargs: dict) -> list[str]:
    """Where a launch the host code made falls outside what ``sweep`` declares (empty: inside), so
    the ahead-of-time sweep covers it."""
    n_pos = sum(not isinstance(d, Constexpr) for d in sweep.params.values())
    if len(args) != n_pos:
        return [f"{sweep.kernel}: {len(args)} positional arguments, the sweep declares {n_pos}"]
    problems = []
    constexprs = {n: kwargs.get(n) for n, d in sweep.params.items() if isinstance(d, Constexpr)}
    for n, v in constexprs.items():
        if v not in sweep.params[n].values:
            problems.append(f"{n}={v!r} not in {sweep.params[n].values}")
    if problems:
        return [f"{sweep.kernel}: {p}" for p in problems]
    fixed = sweep.fixed(constexprs)
    values = dict(zip((n for n, d in sweep.params.items() if not isinstance(d, Constexpr)), args, strict=True))
    dtype_of = {n: v.dtype for n, v in values.items() if isinstance(v, torch.Tensor)}
    for name, v in values.items():
        d = sweep.params[name]
        if isinstance(d, Ptr):
            if not isinstance(v, torch.Tensor):
                problems.append(f"{name}: expected a tensor, got {type(v).__name__}")
                continue
            aligned = v.data_ptr() % 16 == 0
            level = _ALIGNED[aligned] if d.like else (v.dtype, aligned)
            if name in fixed:
                ok = level == fixed[name]
            elif d.like:
                ok = v.dtype == dtype_of.get(d.like) and (aligned or d.unaligned)
            else:
                ok = v.dtype in d.dtypes and (aligned or d.unaligned)
            if not ok:
                problems.append(f"{name}: {v.dtype}, {'' if aligned else 'not '}16-byte aligned: not declared")
        elif isinstance(d, Int):
            if not isinstance(v, int) or isinstance(v, bool):
                problems.append(f"{name}: expected an int, got {type(v).__name__}")
                continue
            c = int_class(v)
            if c != fixed.get(name, c) or c not in d.classes:
                problems.append(f"{name}={v} is {c}, declared {fixed.get(name, d.classes)}")
        elif not isinstance(v, float):
            problems.append(f"{name}: expected a float, got {type(v).__name__}")
    options = {k: v for k, v in kwargs.items() if k not in constexprs}
    if options != sweep.options(constexprs):
        problems.append(f"launch options {options} != declared {sweep.options(constexprs)}")
    return [f"{sweep.kernel}: {p}" for p in problems]


# ---- binding and compiling -----------------------------------------------------------------------
def _tensor(dtype: torch.dtype, aligned: bool) -> torch.Tensor:
    t = torch.empty(64, dtype=dtype)  # CPU allocations are at least 64-byte aligned
    return t if aligned else t[1:]  # one element in: an address not divisible by 16


def launch_args(sweep: KernelSweep, row: dict) -> tuple[list, dict]:
    """Positional arguments and keyword arguments (constexprs + options) of a planned launch."""
    row = {**row, **sweep.fixed(_constexprs_of(sweep, row))}
    args, constexprs = [], {}
    for name, d in sweep.params.items():
        if isinstance(d, Ptr):
            if d.like:
                dtype = row[d.like][0]
                aligned = row[name] == _ALIGNED[True]
            else:
                dtype, aligned = row[name]
            args.append(_tensor(dtype, aligned))
        elif isinstance(d, Int):
            args.append(INT_CLASSES[row[name]])
        elif isinstance(d, Float):
            args.append(1.0)
        else:
            constexprs[name] = row[name]
    return args, {**constexprs, **sweep.options(constexprs)}


def _jit_kernel(sweep: KernelSweep):
    import importlib

    from triton.runtime.jit import JITFunction

    kernel = getattr(importlib.import_module(sweep.module), sweep.kernel)
    if not isinstance(kernel, JITFunction):
        raise RuntimeError(
            f"{sweep.module}.{sweep.kernel} is decorated for Triton's interpreter (TRITON_INTERPRET=1): "
            "ahead-of-time compilation needs a process without it (compile_all re-runs itself in one)"
        )
    return kernel


def bind(kernel, target, args: list, kwargs: dict):
    """(options, signature, constexprs, attrs) exactly as ``JITFunction.run`` would build them for
    ``target``: the same binder code, specialisation and option parsing."""
    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # what run() adds, where it exists
        if hasattr(knobs.compilation, name):
            kwargs[name] = getattr(knobs.compilation, name)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    return kernel._pack_args(backend, kwargs, bound, specialization, options)


# A scalar pointer plus an offset in the TTIR; the pointer is named after the parameter (%logits_ptr)
# or numbered (%arg0), depending on the Triton version.
_ADDPTR = re.compile(r"tt\.addptr %(\w+), %\S+ : !tt\.ptr<[^>]+>, (i\d+)")


def _checks(arch: int, compiled, kernel) -> tuple[list[str], int]:
    """What a GPU would refuse or get wrong that compiling alone does not report, and how many
    pointer-argument offsets were checked for 64 bits."""
    problems = []
    ptx = compiled.asm.get("ptx", "")
    if f".target sm_{arch}" not in ptx:
        problems.append(f"PTX does not target sm_{arch}")
    if not compiled.asm.get("cubin"):
        problems.append("no cubin")
    shared = int(getattr(compiled.metadata, "shared", 0) or 0)
    if shared > SHARED_LIMIT[arch]:
        problems.append(f"needs {shared} bytes of shared memory, sm_{arch} allows {SHARED_LIMIT[arch]}")
    offsets = []
    for name, ty in _ADDPTR.findall(compiled.asm.get("ttir", "")):
        numbered = re.fullmatch(r"arg(\d+)", name)
        name = kernel.arg_names[int(numbered.group(1))] if numbered else name
        if name in kernel.arg_names:  # a pointer argument itself, not a pointer computed from one
            offsets.append(name)
            if ty != "i64":
                problems.append(f"{name} is offset by an {ty} (rows beyond 2**31 elements wrap)")
    return sorted(set(problems)), len(offsets)


def _signature_text(signature: dict, attrs: dict) -> dict:
    """parameter -> 'type' with ' D' when Triton assumes divisibility by 16 ('constexpr' for constants)."""
    out = {}
    for i, (name, ty) in enumerate(signature.items()):
        a = attrs.get((i,), [])
        out[name] = ty + (" D" if any(k == "tt.divisibility" for k, *_ in a) else "")
    return out


def compile_plan(sweeps_: Iterable[KernelSweep], archs: Iterable[int] = ARCHS, strength: int = 1,
                 log: Callable[[str], None] | None = None) -> list[dict]:
    """Compile every planned launch of every kernel for every architecture; one result dict each.
    Launches that bind to the same specialisation are compiled once."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sweeps_ = list(sweeps_)
    results, seen = [], {}
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for sweep in sweeps_:
            kernel = _jit_kernel(sweep)
            for row in plan(sweep, strength, salt=arch):
                args, kwargs = launch_args(sweep, row)
                options, signature, constexprs, attrs = bind(kernel, target, args, kwargs)
                sig = _signature_text(signature, attrs)
                key = (sweep.kernel, arch, json.dumps(sig, sort_keys=True),
                       repr(sorted(constexprs.items())), repr(sorted(options.__dict__.items())))
                rec = {"kernel": sweep.kernel, "arch": arch, "signature": sig,
                       "constexprs": {kernel.arg_names[p[0]]: v for p, v in constexprs.items()},
                       "num_warps": options.num_warps, "row": {k: _level_text(v) for k, v in row.items()}}
                if key in seen:
                    results.append({**rec, **seen[key], "duplicate": True})
                    continue
                t0, c0 = time.perf_counter(), _cpu_seconds()
                try:
                    ck = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                        options=options.__dict__)
                    problems, checked = _checks(arch, ck, kernel)
                    out = {"ok": not problems, "error": "; ".join(problems), "offsets_checked": checked,
                           "shared_bytes": int(getattr(ck.metadata, "shared", 0) or 0)}
                except Exception as exc:  # noqa: BLE001 - every failure is a result to report
                    out = {"ok": False, "error": _error_text(exc)}
                out["seconds"] = round(time.perf_counter() - t0, 3)
                out["cpu_seconds"] = round(_cpu_seconds() - c0, 3)  # ptxas included; stabler than wall time
                seen[key] = out
                results.append({**rec, **out, "duplicate": False})
                if log is not None:
                    log(f"sm_{arch} {sweep.kernel} {rec['constexprs']} {'ok' if out['ok'] else 'FAILED'} "
                        f"{out['seconds']:.2f}s {out['error']}".rstrip())
    return results


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _level_text(v) -> str:
    if isinstance(v, tuple):
        return f"{_DTYPE_NAMES[v[0]]}{'' if v[1] else ' unaligned'}"
    return str(v)


def _error_text(exc: BaseException) -> str:
    """One line per level of a Triton compilation error ('line N: source'), then the root message."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        node, src = getattr(exc, "node", None), getattr(exc, "src", None)
        if hasattr(node, "lineno") and src:
            parts.append(f"line {node.lineno}: {src.splitlines()[node.lineno - 1].strip()}")
            if getattr(exc, "error_message", None):
                parts.append(exc.error_message)
        elif not hasattr(exc, "node"):
            parts.append(f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}")
        exc = exc.__cause__ or exc.__context__
    return " | ".join(parts)


def summary(results: list[dict]) -> dict:
    compiled = [r for r in results if not r["duplicate"]]
    return {
        "launches": len(results),
        "compiled": len(compiled),
        "failed": sum(not r["ok"] for r in compiled),
        "seconds": round(sum(r["seconds"] for r in compiled), 2),
        "cpu_seconds": round(sum(r["cpu_seconds"] for r in compiled), 2),
        "per_kernel": {k: sum(r["kernel"] == k for r in compiled) for k in dict.fromkeys(r["kernel"] for r in results)},
    }


def compile_all(archs: Iterable[int] = ARCHS, strength: int = 1, cache_dir: str | Path | None = None,
                log: Callable[[str], None] | None = None, kernels: Iterable[str] | None = None) -> dict:
    """Compile the whole sweep; {'triton', 'archs', 'strength', 'summary', 'results'}. In a process
    whose kernels are decorated for the interpreter, runs ``python -m tessera.kernels.aot`` in a
    subprocess without it. ``cache_dir``: Triton's cache (default: a fresh temporary one, so every
    specialisation is really compiled). ``kernels``: only these (default: every kernel)."""
    archs = tuple(archs)
    kernels = tuple(kernels) if kernels else None
    from ._backend import interpreter_requested

    if interpreter_requested():
        return _compile_in_subprocess(archs, strength, cache_dir, log, kernels)
    import triton

    with tempfile.TemporaryDirectory(prefix="tessera-aot-") as tmp:
        previous = triton.knobs.cache.dir
        triton.knobs.cache.dir = str(cache_dir or tmp)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*FP_FUSION.*")
                t0 = time.perf_counter()
                chosen = [s for s in sweeps() if kernels is None or s.kernel in kernels]
                if kernels and len(chosen) != len(kernels):
                    raise ValueError(f"unknown kernels {sorted(set(kernels) - {s.kernel for s in chosen})}")
                results = compile_plan(chosen, archs, strength, log)
                wall = time.perf_counter() - t0
        finally:
            triton.knobs.cache.dir = previous
    return {"triton": triton.__version__, "archs": list(archs), "strength": strength,
            "summary": {**summary(results), "wall_seconds": round(wall, 2)}, "results": results}


def _compile_in_subprocess(archs, strength, cache_dir, log, kernels) -> dict:
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory(prefix="tessera-aot-") as tmp:
        out = Path(tmp) / "aot.json"
        cmd = [sys.executable, "-m", "tessera.kernels.aot", "--arch", ",".join(map(str, archs)),
               "--strength", str(strength), "--json", str(out), "--quiet"]
        if cache_dir is not None:
            cmd += ["--cache-dir", str(cache_dir)]
        if kernels:
            cmd += ["--kernels", ",".join(kernels)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if not out.exists():
            raise RuntimeError(f"tessera.kernels.aot failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        report = json.loads(out.read_text())
    if log is not None:
        for r in report["results"]:
            if not r["duplicate"]:
                log(f"sm_{r['arch']} {r['kernel']} {r['constexprs']} {'ok' if r['ok'] else 'FAILED'} {r['error']}")
    return report


def format_summary(report: dict) -> str:
    s = report["summary"]
    lines = [f"Triton {report['triton']}: {s['compiled']} specialisations compiled for "
             f"{', '.join(f'sm_{a}' for a in report['archs'])} (strength {report['strength']}, "
             f"{s['launches']} planned launches) in {s['wall_seconds']} s ({s['cpu_seconds']} s of CPU); "
             f"{s['failed']} failed"]
    for r in report["results"]:
        if not r["duplicate"] and not r["ok"]:
            lines.append(f"  FAILED sm_{r['arch']} {r['kernel']} {r['constexprs']} {r['signature']}: {r['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tessera.kernels.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default=",".join(map(str, ARCHS)), help="comma-separated compute capabilities (80,90)")
    p.add_argument("--strength", type=int, choices=(1, 2), default=1)
    p.add_argument("--json", type=Path, default=None, help="write the full report here")
    p.add_argument("--cache-dir", default=None, help="Triton cache (default: a fresh temporary directory)")
    p.add_argument("--kernels", default=None, help="comma-separated kernel names (default: every kernel)")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    a = p.parse_args(argv)
    try:
        archs = tuple(int(x) for x in a.arch.split(",") if x)
    except ValueError:
        raise SystemExit(f"--arch: expected comma-separated integers such as 80,90, got {a.arch!r}") from None
    bad = [x for x in archs if x not in SHARED_LIMIT]
    if bad:
        raise SystemExit(f"--arch: {bad} not supported; choose from {sorted(SHARED_LIMIT)}")
    kernels = tuple(k for k in a.kernels.split(",") if k) if a.kernels else None
    report = compile_all(archs, a.strength, a.cache_dir, log=None if a.quiet else print, kernels=kernels)
    if a.json:
        from tessera.utils import atomic_write_json

        atomic_write_json(a.json, report, trailing_newline=True)
    print(format_summary(report))
    return 0 if report["summary"]["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
