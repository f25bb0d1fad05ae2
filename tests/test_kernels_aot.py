"""Every Triton kernel compiles for sm_80 and sm_90 (no GPU: triton.compile with the ptxas Triton ships)
in every specialisation the host code can produce, and the sweep's declarations match what the host
code really launches."""

import dataclasses
import inspect
import itertools
import json
import os
import subprocess
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # this process: interpreted kernels; the sweep runs in a subprocess

import pytest
import torch

from tessera.kernels import aot, cross_entropy_z_triton, use_triton_interpreter
from tessera.kernels.cross_entropy import _backward_triton
from tessera.kernels.sampling import (
    DecodeState,
    ModalitySampling,
    SamplingParams,
    TokenRules,
    sample_step_triton,
)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The strength-1 sweep for sm_80 and sm_90 through ``tessera bench gpu-check --compile-only``, compiled
    once for every test here (in a fresh Triton cache: each specialisation is really compiled)."""
    out = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tessera", "bench", "gpu-check", "--compile-only", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert (out / "aot.json").exists(), proc.stderr[-3000:]
    rep = json.loads((out / "aot.json").read_text())
    rep["exit"], rep["stdout"] = proc.returncode, proc.stdout
    print(f"\n{proc.stdout.strip()}\n(whole command: {time.perf_counter() - t0:.1f} s)")
    return rep


def test_every_kernel_specialisation_compiles_for_sm80_and_sm90(report):
    assert report["summary"]["failed"] == 0 and report["exit"] == 0, aot.format_summary(report)
    assert report["stdout"].startswith(f"Triton {report['triton']}: {report['summary']['compiled']} specialisations")
    results = report["results"]
    for sweep in aot.sweeps():
        cnames = [n for n, d in sweep.params.items() if isinstance(d, aot.Constexpr)]
        for arch in aot.ARCHS:
            mine = [r for r in results if r["kernel"] == sweep.kernel and r["arch"] == arch]
            # every constexpr combination the host code can pass ...
            want = {tuple(map(str, c)) for c in itertools.product(*(sweep.params[n].values for n in cnames))}
            assert {tuple(str(r["row"][n]) for n in cnames) for r in mine} == want, (sweep.kernel, arch)
            # ... and every class of every argument, each in at least one launch
            for name, levels in aot._levels(sweep).items():
                seen = {r["row"][name] for r in mine if name in r["row"]}
                assert seen == {aot._level_text(lv) for lv in levels}, (sweep.kernel, arch, name, seen)
            # the PTX / cubin are for this architecture; every compile checked its row offsets
            assert all(r["ok"] and r["offsets_checked"] > 0 for r in mine if not r["duplicate"])


def test_sampling_kernel_compiles_with_rng_key_equal_to_1(report):
    """The bug the sweep found: a key of 1 was compiled as a constant and `rng_key.to()` failed."""
    for arch in aot.ARCHS:
        rows = [r for r in report["results"] if r["kernel"] == "sample_step_kernel" and r["arch"] == arch
                and r["row"]["rng_key"] == "one"]
        assert rows and all(r["ok"] for r in rows)
        assert all(r["signature"]["rng_key"] == "i32" for r in rows)  # do_not_specialize: no constant


def test_integers_equal_to_1_and_divisible_by_16_are_specialised(report):
    """The sweep really reaches Triton's specialisations (not one generic signature per kernel)."""
    sig = [r["signature"] for r in report["results"]]
    for kernel_param in ("stride", "V", "vocab_start", "t_k", "n_groups", "eos_id"):
        kinds = {s[kernel_param] for s in sig if kernel_param in s}
        assert "constexpr" in kinds, kernel_param
    assert {"i32", "i32 D", "i64", "i64 D"} <= {s["stride"] for s in sig}
    assert {"*bf16", "*bf16 D"} <= {s["logits_ptr"] for s in sig}  # cross-entropy logits may be views


def test_sweep_declares_exactly_each_kernels_parameters():
    import importlib

    for sweep in aot.sweeps():
        kernel = getattr(importlib.import_module(sweep.module), sweep.kernel)
        fn = getattr(kernel, "fn", kernel)
        assert list(sweep.params) == list(inspect.signature(fn).parameters), sweep.kernel
    # every Triton kernel of the kernel modules is swept (helpers start with "_")
    from tessera.kernels import _backend

    kernels = set()
    for mod_name in _backend._KERNEL_MODULES:
        mod = importlib.import_module(mod_name)
        kernels |= {n for n, v in vars(mod).items() if hasattr(v, "fn") and not n.startswith("_")}
    assert kernels == {s.kernel for s in aot.sweeps()}


@pytest.mark.parametrize("strength", [1, 2])
def test_plan_covers_levels_and_pairs(strength):
    for sweep in aot.sweeps():
        levels = aot._levels(sweep)
        rows = aot.plan(sweep, strength, salt=90)
        cnames = [n for n, d in sweep.params.items() if isinstance(d, aot.Constexpr)]
        combos = set(itertools.product(*(levels[n] for n in cnames)))
        assert {tuple(r[n] for n in cnames) for r in rows} == combos
        for n, lv in levels.items():
            assert {r[n] for r in rows if n in r} == set(lv), (sweep.kernel, n)
        for r in rows:  # what the host code fixes is not in the row (launch_args fills it in)
            assert not set(sweep.fixed({n: r[n] for n in cnames})) & set(r)
        if strength == 2:  # every pair of levels that some constexpr combination can realise
            combos_free = [({n: c[i] for i, n in enumerate(cnames)}, set(levels) - set(cnames) - set(
                sweep.fixed(dict(zip(cnames, c, strict=True))))) for c in combos]
            for a, b in itertools.combinations(levels, 2):
                possible = set()
                for c, free in combos_free:
                    if (a in c or a in free) and (b in c or b in free):
                        possible |= set(itertools.product([c[a]] if a in c else levels[a],
                                                          [c[b]] if b in c else levels[b]))
                assert {(r[a], r[b]) for r in rows if a in r and b in r} == possible, (sweep.kernel, a, b)


def test_int_classes_follow_triton():
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    for value in (0, 1, 2, 16, 17, -16, 2**31 - 1, 2**31, 2**31 + 16, 2**32 + 1, *aot.INT_CLASSES.values()):
        ty, attr = native_specialize_impl(BaseBackend, value, False, True, True)
        want = "one" if ty == "constexpr" else f"{ty}{'/16' if attr == 'D' else ''}"
        assert aot.int_class(value) == want, value


def test_check_flags_32_bit_row_offsets():
    """The offset check reads the TTIR: an i32 offset of a pointer argument is reported."""

    class Fake:
        asm = {"ptx": ".target sm_90", "cubin": b"x",
               "ttir": "%3 = tt.addptr %arg0, %2 : !tt.ptr<bf16>, i32\n%5 = tt.addptr %labels_ptr, %4 : !tt.ptr<i64>, i64\n"
                        "%7 = tt.addptr %base, %6 : !tt.ptr<bf16>, i32"}
        metadata = type("M", (), {"shared": 0})()

    class K:
        arg_names = ["logits_ptr", "stride", "labels_ptr"]

    problems, checked = aot._checks(90, Fake(), K())
    assert checked == 2 and problems == ["logits_ptr is offset by an i32 (rows beyond 2**31 elements wrap)"]
    Fake.asm = {**Fake.asm, "ptx": ".target sm_80"}
    Fake.metadata.shared = 300_000
    problems, _ = aot._checks(90, Fake(), K())
    assert "PTX does not target sm_90" in problems and any("shared memory" in p for p in problems)


# ---- the host code's launches fall inside the declarations ---------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _interp():
    use_triton_interpreter()


def _rules(v: int, device="cpu") -> TokenRules:
    table = torch.zeros(v, dtype=torch.int8)
    table[:8] = 2
    table[v // 2 :] = 1
    return TokenRules(table, boi_id=2, eoi_id=3, eos_id=1, pad_id=0, image_tokens_per_image=4, max_seq_len=64)


def test_host_launches_are_declared():
    """Capture what sample_step_triton and cross_entropy_z_triton launch over many inputs (dtypes, CFG,
    probabilities, vocabulary sizes, misaligned views) and check each against the sweep."""
    seen_blocks = set()
    with aot.capture_launches() as launches:
        for v, dtype, groups, probs in itertools.product((300, 5000), (torch.float32, torch.bfloat16, torch.float16),
                                                         (1, 2, 3), (False, True)):
            n = 2
            big = torch.randn(groups * n * (v + 3) + 1).to(dtype)
            # a misaligned view with an odd row stride: the host code must realign it
            logits = big[1 : 1 + groups * n * (v + 3)].view(groups * n, v + 3)[:, :v]
            params = SamplingParams(text=ModalitySampling(top_k=1), cfg_groups=groups, cfg_scale=2.0)
            table = torch.empty(v + 1, dtype=torch.int8)[1:]  # misaligned too
            rules = dataclasses.replace(_rules(v), modality_table=table.copy_(_rules(v).modality_table))
            state = DecodeState.start([3] * (groups * n))
            out = torch.empty(n, v + 1)[:, 1:] if probs else None
            sample_step_triton(logits, state, rules, params, seed=0, offset=1, probs_out=out)
        for v, dtype, block in itertools.product((1, 17, 300, 5000), (torch.float32, torch.bfloat16), (None, 16, 64)):
            x = torch.randn(5, v + 1).to(dtype)[:, 1:].requires_grad_()  # unaligned rows, stride v + 1
            out = cross_entropy_z_triton(x, torch.randint(0, v, (5,)), 1e-4, block=block)
            out.loss.sum().backward()
            grad = torch.empty(5, v, dtype=dtype)
            _backward_triton(x.detach(), torch.zeros(5, dtype=torch.long), *(torch.zeros(5),) * 3, 0, grad, block)
    assert len(launches) == 2 * 3 * 3 * 2 + 4 * 2 * 3 * 3
    for sweep, args, kwargs in launches:
        assert aot.check_launch(sweep, args, kwargs) == []
        seen_blocks.add((sweep.kernel, kwargs["BLOCK"]))
    assert {b for k, b in seen_blocks if k == "sample_step_kernel"} == {512, 4096}


def test_check_launch_reports_undeclared_arguments():
    sweep = next(s for s in aot.sweeps() if s.kernel == "sample_step_kernel")
    with aot.capture_launches() as launches:
        logits = torch.randn(2, 300)
        sample_step_triton(logits, DecodeState.start([3, 3]), _rules(300), SamplingParams(), 0, 0)
    _, args, kwargs = launches[0]
    args = list(args)
    assert aot.check_launch(sweep, tuple(args), kwargs) == []
    bad = list(args)
    bad[0] = torch.randn(2, 301)[:, 1:]  # logits rows the host code promises to align
    assert any("logits_ptr" in p for p in aot.check_launch(sweep, tuple(bad), kwargs))
    assert any("BLOCK" in p for p in aot.check_launch(sweep, tuple(args), {**kwargs, "BLOCK": 1024}))
    assert any("num_warps" in p for p in aot.check_launch(sweep, tuple(args), {**kwargs, "num_warps": 8}))
    bad = list(args)
    bad[10] = 2**31  # V as i64
    assert any(p.startswith("sample_step_kernel: V=") for p in aot.check_launch(sweep, tuple(bad), kwargs))


@pytest.mark.slow  # 332 compiles: about 100 s of CPU time, minutes of wall time on a shared machine
def test_every_pair_of_argument_classes_compiles():
    rep = aot.compile_all(aot.ARCHS, strength=2)
    assert rep["summary"]["failed"] == 0, aot.format_summary(rep)
    assert rep["summary"]["compiled"] > 300
