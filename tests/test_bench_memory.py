"""`tessera bench memory`: the plan's memory formulas against bytes measured on a real training step.

Fast: the meter on a hand-made graph; the reduced model; one-process measurements of both shipped configs
reduced (GQA + swin norm in bf16 with the distributed optimizer; MHA + dropout in fp32 with Adam), every
recompute mode; a 2-process TP=2 + sequence-parallel measurement through the command and its JSON.
Slow: the shipped configs' own (capped) layouts with 4 processes (TP 2 x DP 2; TP 2 x PP 2), DP=2
without the distributed optimizer, and PP 2 with virtual stages (the interleaved schedule).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tessera.bench.memory import compare, reduced_model, reduced_train_config, run_ranks
from tessera.bench.memory_measure import SavedTensorMeter
from tessera.config import ConfigError
from tessera.model.config import get_preset
from tessera.pretrain.config import load_train_config
from tessera.pretrain.layout import RECOMPUTE_MODES

pytestmark = pytest.mark.timeout(900)


def test_meter_counts_each_saved_storage_once_while_autograd_holds_it():
    w = torch.randn(32, 8, requires_grad=True)
    x = torch.randn(64, 32, requires_grad=True)
    meter = SavedTensorMeter([], exclude={w.untyped_storage().data_ptr()})
    with meter:
        step = meter.forward_step(lambda it, model: (None, None))  # only for its micro-batch counter
        step(None, None)
        with meter._phase_forward():
            y = x.exp()  # saves its result: 64 x 32 fp32
            u = y.view(-1).sin()  # saves a view of y: the same storage, counted once
            with torch.no_grad():
                x * x  # nothing saved
            loss = u.sum() + (x @ w).sum()  # saves x and w; w is a parameter (excluded)
        assert meter.live_bytes == 2 * 64 * 32 * 4
        loss.backward()
    assert meter.live_bytes == 0  # autograd freed them in the backward
    assert meter.peak_bytes == 2 * 64 * 32 * 4
    s = meter.summary(layers=1, microbatches=1)
    assert s["outside"] == 2 * 64 * 32 * 4 and s["per_layer"] == 0 and s["shared"] == 0


def test_reduced_model_keeps_the_per_layer_structure():
    big = get_preset("chameleon-34b")
    m = reduced_model(big, hidden=512, layers=4, seq=256, tp=2)
    assert (m.hidden_size, m.num_attention_heads, m.num_query_groups, m.num_layers, m.seq_length) == (512, 16, 2, 4, 256)
    assert m.num_attention_heads // m.num_query_groups == big.num_attention_heads // big.num_query_groups  # GQA 8:1
    assert m.ffn_hidden_size == 1376 and m.ffn_hidden_size / 512 == pytest.approx(big.ffn_hidden_size / big.hidden_size)
    assert m.vocab_size == 4096 and m.vocab_size % (128 * 2) == 0  # 65536 x 512/8192
    assert m.swin_norm and m.qk_norm and m.z_loss_weight == big.z_loss_weight
    seven = reduced_model(get_preset("chameleon-7b"), hidden=256, layers=2, seq=64, tp=1)
    assert seven.num_query_groups is None and seven.hidden_dropout == 0.1
    with pytest.raises(ConfigError, match="cannot keep 8 query heads per KV group"):
        reduced_model(big, hidden=128, layers=2, seq=64, tp=1)
    with pytest.raises(ConfigError, match="multiple of 32"):
        reduced_model(big, hidden=100, layers=2, seq=64, tp=1)


def _check(res: dict, modes=RECOMPUTE_MODES) -> dict:
    rows = {(r["rank"], r["mode"], r["term"]): r for r in res["terms"]}
    ranks = {r["rank"] for r in res["terms"]}
    for rank in ranks:
        for mode in modes:
            for term in ("activations_per_layer", "activations_outside_layers", "activations_peak"):
                assert (rank, mode, term) in rows, (rank, mode, term)
        for term in ("params", "weights", "grads", "optimizer"):
            assert (rank, modes[0], term) in rows
    bad = [r for r in res["terms"] if r["compared"] and r["rel_error"] > 0.10]
    assert not bad, bad
    assert res["within_tolerance"] and res["worst_rel_error"] <= 0.10
    return rows


@pytest.mark.parametrize("config, overrides, bf16", [
    # GQA 8:1, swin norm, QK-norm, no dropout; bf16 weights, fp32 grads, fp32 master + Adam (distributed, DP 1)
    ("configs/chameleon-34b.yaml", [], True),
    # multi-head attention, pre-norm, hidden dropout 0.1; fp32 with plain (not distributed) Adam
    ("configs/chameleon-7b.yaml", ["--precision", "fp32", "--parallel.distributed_optimizer", "false",
                                   "--parallel.overlap_param_gather", "false"], False),
])
def test_plan_matches_measured_bytes_in_one_process(megatron_1proc, config, overrides, bf16):
    cfg = reduced_train_config(load_train_config(config, overrides), hidden=256, layers_per_stage=2, seq=64,
                               tp=1, pp=1, dp=1)
    res = compare(cfg, run_ranks(cfg, 1, RECOMPUTE_MODES))
    rows = _check(res)
    d = 2 if bf16 else 4
    x, h = 64, 256
    # what the formulas say, seen in the measurement: full recomputation keeps the layer input per layer...
    assert rows[(0, "full", "activations_per_layer")]["measured"] == d * x * h
    # ...selective drops only the flash-style core attention's fp32 log-sum-exp (8 heads), none keeps it
    # (megatron's checkpoint keeps the attention mask type as a 4-byte tensor instead)
    none, sel = (rows[(0, r, "activations_per_layer")]["measured"] for r in ("none", "selective"))
    assert none - sel == 4 * x * 8 - 4
    # the optimizer: fp32 master + m + v (bf16) or m + v (fp32: the master weights are the model's)
    n = rows[(0, "none", "params")]["measured"]
    assert rows[(0, "none", "optimizer")]["measured"] == pytest.approx((12 if bf16 else 8) * n, rel=1e-3)
    assert rows[(0, "none", "weights")]["measured"] == pytest.approx(d * n, rel=1e-3)


def _memory_cli(tmp_path, *args) -> dict:
    out = tmp_path / "memory.json"
    cmd = [sys.executable, "-m", "tessera", "bench", "memory", *args, "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=800, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "worst |measured / plan - 1|" in r.stdout
    return json.loads(out.read_text())


def test_tp2_sequence_parallel_through_the_command(tmp_path):
    """Two processes, TP 2 with sequence parallelism (7B-like: MHA, dropout, distributed optimizer): the
    TP-split and sequence-split terms, and the JSON the command writes."""
    data = _memory_cli(tmp_path, "--config", "configs/chameleon-7b.yaml", "--hidden", "128", "--seq", "64",
                       "--tp", "2", "--dp", "1")
    assert data["benchmark"] == "memory" and {"cpu_model", "torch_version"} <= set(data["machine"])
    res = data["results"]
    assert res["layout"]["tp"] == 2 and res["layout"]["sequence_parallel"] and res["layout"]["world_size"] == 2
    rows = _check(res)
    assert {r["tp_rank"] for r in res["terms"]} == {0, 1}
    assert rows[(0, "full", "activations_per_layer")]["measured"] == 2 * 64 * 128 / 2  # a sequence shard


def test_bad_memory_arguments_fail_clearly(capsys):
    """Each mistake is one line on stderr and exit status 2, before any process starts."""
    from tessera.cli import main

    for args, message in [
        (["--config", "configs/chameleon-7b.yaml", "--modes", "some"], "--modes 'some': expected a comma-separated subset"),
        (["--config", "configs/chameleon-34b.yaml", "--hidden", "128"], "pick a larger --hidden"),
        (["--config", "configs/chameleon-7b.yaml", "--parallel.nope", "1"], "nope"),
    ]:
        capsys.readouterr()
        assert main(["bench", "memory", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


@pytest.mark.slow  # 4 processes, ~1-2 min
@pytest.mark.parametrize("config, args", [
    ("configs/chameleon-7b.yaml", []),  # TP 2 + SP, DP 2, distributed optimizer (sharded)
    ("configs/chameleon-34b.yaml", ["--dp", "1"]),  # TP 2 + SP, PP 2: 1F1B in-flight micro-batches
    ("configs/chameleon-34b.yaml", ["--tp", "1", "--pp", "1", "--parallel.distributed_optimizer", "false",
                                    "--parallel.overlap_param_gather", "false", "--parallel.sequence_parallel",
                                    "false"]),  # DP 2, plain Adam
    # PP 2 with the interleaved schedule (2 virtual chunks) and 4 micro-batches: its warm-up and steady state
    ("configs/chameleon-34b.yaml", ["--tp", "1", "--dp", "1", "--layers-per-stage", "1", "--parallel.vp", "2",
                                    "--microbatches", "4"]),
])
def test_shipped_configs_measured(tmp_path, config, args):
    res = _memory_cli(tmp_path, "--config", config, *args)["results"]
    _check(res)
