"""``tessera bench gpu-check``: the no-GPU exit, the part runner (a failing part never stops the later
ones), the report files, and the parts' code run on the CPU at tiny sizes (--dry-run-cpu)."""

import json
import os
import subprocess
import sys

import pytest

from tessera.bench import gpu_check


def test_without_cuda_exits_3_with_one_line(tmp_path, capsys):
    from tessera.cli import main

    assert main(["bench", "gpu-check", "--out", str(tmp_path / "gc")]) == gpu_check.EXIT_NO_CUDA
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no CUDA device" in out
    assert not (tmp_path / "gc" / "gpu_check.json").exists()


def test_parts_fail_skip_and_time_out_independently(tmp_path, monkeypatch):
    def broken(p):
        p.check("a check that passed", True, value=1)
        raise RuntimeError("boom\nsecond line")

    def skipped(p):
        raise gpu_check.Skip("no Transformer Engine here")

    def slow(p):
        p.check("first step", True)
        p.need(1e9, "the next step")

    def fine(p):
        p.check("works", True, ms=1.23456789)
        p.note(speed=2.0)

    def failing_check(p):
        p.check("numbers off", False, err=0.5, limit=1e-3)

    for name, fn in (("versions", broken), ("kernels", skipped), ("aot", slow)):
        monkeypatch.setattr(gpu_check, f"part_{name}", fn)
    from tessera.bench import gpu_check_model

    monkeypatch.setattr(gpu_check_model, "part_te_vs_local", fine)
    monkeypatch.setattr(gpu_check_model, "part_generate", failing_check)
    lines = []
    report = gpu_check.run_gpu_check(tmp_path, dry_run=False, parts=("versions", "kernels", "te_vs_local", "generate",
                                                                     "aot"), budget_s=60, log=lines.append)
    status = {r["part"]: r for r in report["parts"]}
    assert [r["part"] for r in report["parts"]] == ["versions", "kernels", "te_vs_local", "generate", "aot"]
    assert status["versions"]["status"] == "fail" and status["versions"]["reason"] == "RuntimeError: boom"
    assert "traceback" in status["versions"]["numbers"] and status["versions"]["checks"][0]["status"] == "pass"
    assert status["kernels"]["status"] == "skip" and status["kernels"]["reason"] == "no Transformer Engine here"
    assert status["te_vs_local"]["status"] == "pass" and status["te_vs_local"]["checks"][0]["ms"] == 1.23457
    assert status["generate"]["status"] == "fail" and status["generate"]["reason"] == "numbers off"
    assert status["aot"]["status"] == "fail" and status["aot"]["reason"].startswith("time budget")
    assert report["passed"] is False
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["parts"] == report["parts"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert md.count("\n| ") >= 8 and "FAILED" in md and "numbers off: err=0.5, limit=0.001" in md
    assert any("FAILED" in line for line in lines)  # the table is printed too
    with pytest.raises(ValueError, match="unknown parts"):
        gpu_check.run_gpu_check(tmp_path, parts=("versions", "nope"), log=lines.append)


def test_parts_after_the_budget_are_failed_not_run(tmp_path, monkeypatch):
    called = []
    monkeypatch.setattr(gpu_check, "part_versions", lambda p: called.append(p))
    report = gpu_check.run_gpu_check(tmp_path, parts=("versions",), budget_s=0, log=lambda s: None)
    (part,) = report["parts"]
    assert not called and part["status"] == "fail" and part["reason"].endswith("budget is spent")
    assert report["passed"] is False


def test_dry_run_fast_parts(tmp_path):
    """A fast subset of the dry run, in this process (the interpreter is on): versions, the TE-vs-local
    comparison code, generation latency and the VQ training at tiny sizes."""
    report = gpu_check.run_gpu_check(tmp_path, dry_run=True, parts=("versions", "te_vs_local", "generate", "vq"),
                                     log=lambda s: None)
    assert report["passed"], gpu_check.format_report(report)
    parts = {r["part"]: r for r in report["parts"]}
    assert all(r["status"] == "pass" for r in parts.values())
    assert parts["versions"]["numbers"]["cpu_compat_active"] is True  # the dry run runs the CPU layer
    assert len(parts["te_vs_local"]["checks"]) == 6
    gen = parts["generate"]["checks"]
    assert len(gen) == 2 and all(c["per_token_ms"] > 0 for c in gen)
    vq = {c["check"].split(" (")[0]: c for c in parts["vq"]["checks"]}
    assert len(vq) == 4
    assert vq["a step reads back only the codebook upkeep"]["host_syncs_max"] >= 1  # counted, not skipped
    assert vq["the saved tokenizer gives the same codes on the GPU and the CPU"]["codes_equal"] == 1.0  # CPU == CPU


@pytest.mark.slow  # every part on the CPU: ~4-6 minutes on 2 busy cores (training runs three times)
def test_dry_run_every_part(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the command turns it on itself
    proc = subprocess.run([sys.executable, "-m", "tessera", "bench", "gpu-check", "--dry-run-cpu", "--out",
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=1800)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert proc.returncode == 0, gpu_check.format_report(report)
    assert [r["part"] for r in report["parts"]] == [n for n, _, _ in gpu_check.PARTS]
    assert all(r["status"] == "pass" for r in report["parts"])
    assert (tmp_path / "gpu_check.md").is_file() and "PASSED" in proc.stdout
