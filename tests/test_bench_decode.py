"""benchmark_decode / benchmark_decode_step run at a tiny size and report what they promise."""

from __future__ import annotations

from tessera.bench.decode import benchmark_decode, benchmark_decode_step, format_decode_table


def test_benchmark_decode_tiny():
    r = benchmark_decode("tiny", batches=(1, 2), prompt_len=4, new_tokens=3, repeats=1, verbose=False,
                         dtypes=("float32",), hf_dtypes=("float32",))
    assert r["greedy_match_fp32"] is True  # same weights, same greedy tokens as transformers
    keys = {(row["impl"], row["dtype"], row["batch"]) for row in r["rows"]}
    # the fused CPU step (when it builds here) is also timed against our own all-PyTorch step
    impls = ("tessera", "tessera-torch-step", "transformers") if r["step_backend"]["float32"].startswith("fused") \
        else ("tessera", "transformers")
    assert keys == {(impl, "float32", b) for impl in impls for b in (1, 2)}
    assert all(row["tokens_per_s"] > 0 and row["ttft_ms"] > 0 for row in r["rows"])
    assert r["speedup"]["batch1_same_dtype"] > 0
    f = r["floor"]["float32"]
    assert f["floor_ms"] > 0 and f["copy_gbps"] > 0 and f["weight_bytes"] > 0
    assert f["ratio_to_floor"] == f["measured_ms"] / f["floor_ms"]
    assert "tokens/s" in format_decode_table(r) and "x the floor" in format_decode_table(r)
    assert f"decode step: {r['step_backend']['float32']}" in format_decode_table(r)


def test_benchmark_decode_step_tiny():
    r = benchmark_decode_step("tiny", batch=2, context=4, steps=3, rounds=1, dtypes=("float32",))
    assert set(r) == {"tessera-float32", "transformers-float32"}
    assert all(v["min_ms"] > 0 and v["median_ms"] >= v["min_ms"] for v in r.values())


def test_benchmark_decode_latency_tiny():
    """The GPU check's generation numbers, here on the CPU (no CUDA graphs: said so, rows without them)."""
    from tessera.bench.decode import benchmark_decode_latency, format_latency_table

    r = benchmark_decode_latency("tiny", batches=(1, 2), prompt_len=4, new_tokens=5, repeats=1, dtype="float32")
    assert r["cuda_graphs_off"] == "device cpu" and r["device"] == "cpu"
    assert [(row["batch"], row["rows"], row["cuda_graphs"]) for row in r["rows"]] == [(1, 2, False), (2, 4, False)]
    for row in r["rows"]:
        assert row["per_token_ms"] > 0 and row["tokens_per_s"] > 0 and row["graph_stats"] is None
        assert row["ratio_to_floor"] == row["per_token_ms"] / row["floor_ms"]
    # the floor grows with the rows (their KV cache) on top of the weights every step reads
    assert r["rows"][1]["floor_ms"] > r["rows"][0]["floor_ms"] > r["weight_bytes"] / (r["copy_gbps"] * 1e9) * 1e3
    assert "x floor" in format_latency_table(r) and "CUDA graphs not measured: device cpu" in format_latency_table(r)


def test_bench_import_is_light():
    """tessera.bench.decode is imported by the GPU check: no megatron, no CUDA initialisation on import."""
    import subprocess
    import sys

    code = ("import sys, torch, tessera.bench.decode as b; "
            "assert callable(b.benchmark_decode_latency); "
            "assert not any(m.startswith('megatron') for m in sys.modules), 'megatron imported'; "
            "assert not torch.cuda.is_initialized()")
    subprocess.run([sys.executable, "-c", code], check=True)
