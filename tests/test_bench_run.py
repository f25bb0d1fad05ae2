"""Each `tessera bench` subcommand runs at a tiny size and writes JSON with the machine description."""

from __future__ import annotations

import json

import pytest

from tessera.cli import main

MACHINE_KEYS = {"cpu_model", "cpu_cores", "torch_version", "gpu_name", "matmul_tflops_fp32", "matmul_tflops_bf16",
                "copy_gbps"}


def _run(tmp_path, *argv) -> dict:
    out = tmp_path / "out.json"
    rc = main(["bench", *argv, "--json", str(out), "--measure-seconds", "0.05"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert MACHINE_KEYS <= set(data["machine"])
    assert data["machine"]["matmul_tflops_fp32"] > 0 and data["machine"]["copy_gbps"] > 0
    return data


def test_machine_peaks_are_measured():
    from tessera.bench.machine import measure_copy_gbps, measure_matmul_tflops

    # 2 x 256^3 FLOPs must take some time: a wrong FLOP count or unit would be off by orders of magnitude
    assert 1e-4 < measure_matmul_tflops(size=256, seconds=0.05) < 1e3
    assert 0.1 < measure_copy_gbps(megabytes=16, seconds=0.05) < 1e5


def test_bench_train_tiny_against_transformers(tmp_path, capsys):
    data = _run(tmp_path, "train", "--preset", "tiny", "--seq-length", "32", "--micro-batch", "2", "--steps", "2",
                "--warmup", "1")
    res = data["results"]
    assert [r["implementation"] for r in res["rows"]] == ["tessera (megatron-core)", "transformers Chameleon"]
    ours, theirs = res["rows"]
    # same shape on both sides: the same parameter count, the exact count of the preset
    assert ours["params"] == theirs["params"] == res["parameters"]
    for r in res["rows"]:
        assert r["tokens_per_s"] == pytest.approx(2 * 32 / r["step_s_best"])
        assert r["mfu"] == pytest.approx(res["flops_per_token"] * r["tokens_per_s"] / (res["peak_tflops"] * 1e12))
        assert 4.0 < r["loss"] < 7.0  # ~ln(vocab 256) = 5.5 at init: both really computed a loss
    assert "speed-up vs transformers" in capsys.readouterr().out


def test_bench_vq_tiny_against_transformers(tmp_path):
    res = _run(tmp_path, "vq", "--preset", "tiny", "--batch", "2", "--steps", "1")["results"]
    ops = {(r["implementation"], r["op"]) for r in res["rows"]}
    assert ops == {("tessera VQ", "encode"), ("tessera VQ", "decode"), ("transformers ChameleonVQVAE", "encode")}
    enc = [r for r in res["rows"] if r["op"] == "encode"]
    assert enc[0]["encoder_params"] == enc[1]["encoder_params"]  # same shape
    assert res["encode_speedup_vs_transformers"] > 0


def test_bench_data_tiny(tmp_path, capsys):
    res = _run(tmp_path, "data", "--seq-length", "64", "--global-batch", "2", "--micro-batch", "2",
               "--steps", "3")["results"]
    ours, floor = res["rows"]
    assert ours["tokens"] == floor["tokens"] == 3 * 2 * 64
    assert ours["tokens_per_s_per_core"] > 0 and floor["tokens_per_s_per_core"] > 0
    assert "deprecated" not in capsys.readouterr().err


def test_bench_data_old_spellings_still_work(tmp_path, capsys):
    """`tessera data bench` and --seq / --batch / --data: one release as deprecated aliases, said on stderr."""
    pretok = tmp_path / "pretok"
    from tessera.bench.data import build_small_dataset

    built = build_small_dataset(tmp_path / "build", docs=20)
    built.rename(pretok)
    out = tmp_path / "old.json"
    assert main(["data", "bench", "--data", str(pretok), "--seq", "32", "--batch", "2", "--steps", "2",
                 "--json", str(out), "--measure-seconds", "0.01"]) == 0
    err = capsys.readouterr().err
    for old in ("tessera data bench", "--seq is deprecated", "--batch is deprecated", "--data is deprecated"):
        assert old in err
    res = json.loads(out.read_text())["results"]
    assert res["data"] == {"pretok": str(pretok)} and (res["global_batch"], res["micro_batch"]) == (2, 2)
    assert res["rows"][0]["tokens"] == 2 * 2 * 32


def test_bench_kernels_tiny(tmp_path):
    pytest.importorskip("tessera.bench.kernels")
    # --no-compile: torch.compile's first call takes 10-30 s here; tests/test_kernels_cross_entropy.py covers it (-m slow)
    res = _run(tmp_path, "kernels", "--batches", "1", "--vocab", "512", "--no-compile", "--attn-shapes", "1x2x80x32")["results"]
    assert res["rows"] and "reference" in res["note"]
    eager = [r for r in res["rows"] if r["impl"] == "reference (eager)"]
    assert {r["kernel"] for r in eager} == {"sample_step", "cross_entropy_z fwd+bwd"} and all(r["ms"] > 0 for r in eager)
    attn = [r for r in res["rows"] if r["kernel"] == "attention fwd+bwd (causal)"]
    assert {(r["shape"], r["impl"]) for r in attn} == {
        (f"[1, 2, 80, 32] {dt}", impl) for dt in ("fp32", "bf16") for impl in ("C (cpu_attention.c)", "SDPA (eager)")}
    assert all(r["ms"] > 0 for r in attn), attn


def test_bench_decode_tiny(tmp_path):
    res = _run(tmp_path, "decode", "--preset", "tiny", "--batches", "1", "--prompt-len", "8", "--new-tokens", "4",
               "--dtype", "fp32")["results"]
    impls = {r["impl"] for r in res["rows"]}
    # with the fused CPU step our all-PyTorch step is timed too (tessera-torch-step)
    expected = {"tessera", "transformers"} | ({"tessera-torch-step"}
                                             if res["step_backend"]["float32"].startswith("fused") else set())
    assert impls == expected and all(r["tokens_per_s"] > 0 for r in res["rows"])
    assert res["greedy_match_fp32"] is True  # same weights, same greedy tokens
