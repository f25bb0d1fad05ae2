"""megatron's scale features under gloo on the CPU give the 1-process run's losses and grad norms step for step:
the distributed optimizer (with and without overlapped gradient reduce / parameter gather), sequence
parallelism, full and selective recomputation, and a distributed-optimizer checkpoint resumed under
another layout (its optimizer state resharded). Every run also counts its host syncs (one per step).

Tiny model, 4 steps, seq 32, warmup 0, lr 3e-3, the session's tiny pretokenized corpus, fp32 (rel 1e-5:
the layouts sum the same numbers in another order; measured agreement ~1e-7). The settings' checks
(clear errors) are at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tessera.config import ConfigError

ARGS = ["configs/demo.yaml", "--model.preset", "tiny", "--train.steps", "4", "--optim.warmup", "0",
        "--optim.lr", "3e-3", "--data.seq_length", "32", "--train.eval_interval", "0", "--train.save_interval", "2"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", TESSERA_COUNT_SYNCS="1")

pytestmark = pytest.mark.timeout(600)


def _launch(run, nproc, *extra, env=None):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                if nproc > 1 else [sys.executable])
    cmd = [*launcher, "-m", "tessera.pretrain.trainer", *ARGS, "--train.run_dir", str(run), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=dict(ENV, **(env or {})))


def _records(run, nproc, *extra):
    r = _launch(run, nproc, *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same(got, ref, what, steps=(1, 2, 3, 4)):
    got = [g for g in got if g["step"] in steps]
    ref = [r for r in ref if r["step"] in steps]
    assert [g["step"] for g in got] == [r["step"] for r in ref] == list(steps), what
    for key in ("loss", "grad_norm"):
        a, b = [g[key] for g in got], [r[key] for r in ref]
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7), f"{what}: {key} {a} != 1-process {b}"
    assert [g["host_syncs"] for g in got] == [1] * len(got), what


@pytest.fixture(scope="module")
def data(tiny_pretok):
    return str(tiny_pretok["train"])


@pytest.fixture(scope="module")
def ref(tmp_path_factory, data):
    recs = _records(tmp_path_factory.mktemp("scale") / "ref", 1, "--data.path", data)
    assert len({r["loss"] for r in recs}) == 4 and recs[-1]["loss"] < recs[0]["loss"]  # it learns
    return recs


def test_dp2_distributed_optimizer_matches_one_process(ref, data, tmp_path):
    """DP=2, megatron's DistributedOptimizer: Adam state and fp32 main params sharded over the two replicas
    (reduce-scatter of the gradients, all-gather of the updated parameters under gloo)."""
    run = tmp_path / "distopt"
    _assert_same(_records(run, 2, "--data.path", data, "--parallel.distributed_optimizer", "true"), ref, "DP2+distopt")
    import yaml

    resolved = yaml.safe_load((run / "config.yaml").read_text())["resolved"]
    assert resolved["data_parallel_size"] == 2 and resolved["world_size"] == 2


def test_dp2_distributed_optimizer_with_overlap_matches_one_process(ref, data, tmp_path):
    """The same with overlap_grad_reduce + overlap_param_gather and small buckets (several buckets reduce
    while the backward runs; the parameters are gathered by forward pre-hooks), an evaluation and a
    checkpoint in between (both must see the gathered parameters)."""
    got = _records(tmp_path / "overlap", 2, "--data.path", data, "--parallel.distributed_optimizer", "true",
                   "--parallel.overlap_grad_reduce", "true", "--parallel.overlap_param_gather", "true",
                   "--parallel.ddp_bucket_size", "20000", "--train.eval_interval", "2",
                   "--data.eval_path", data)
    _assert_same(got, ref, "DP2+distopt+overlap")


def test_tp2_sequence_parallel_matches_one_process(ref, data, tmp_path):
    """TP=2 with sequence parallelism: norms and dropout on sequence slices, all-gather / reduce-scatter around
    the parallel linears, the norms' gradients summed over TP by finalize_model_grads."""
    got = _records(tmp_path / "sp", 2, "--data.path", data, "--parallel.tp", "2", "--parallel.sequence_parallel", "true")
    _assert_same(got, ref, "TP2+SP")


@pytest.mark.slow  # a 2-process run, ~15 s
def test_pp2_full_recompute_matches_one_process(ref, data, tmp_path):
    """PP=2, every layer's activations recomputed in the backward (megatron's full, uniform)."""
    got = _records(tmp_path / "full", 2, "--data.path", data, "--parallel.pp", "2", "--model.recompute", "full")
    _assert_same(got, ref, "PP2+full recompute")


@pytest.mark.slow  # a 2-process run, ~15 s
def test_tp2_selective_recompute_matches_one_process(ref, data, tmp_path):
    """TP=2, core attention recomputed in the backward (megatron's selective)."""
    got = _records(tmp_path / "sel", 2, "--data.path", data, "--parallel.tp", "2", "--model.recompute", "selective")
    _assert_same(got, ref, "TP2+selective recompute")


def test_distributed_optimizer_checkpoint_resumes_under_another_layout(ref, data, tmp_path):
    """Saved at step 2 by DP=2 with the distributed optimizer (its state sharded over DP), killed after step 3,
    resumed by TP=2 (DP=1, the optimizer state resharded over the TP-split weights): steps 3 and 4 are the
    uninterrupted 1-process run's."""
    run = tmp_path / "resharded"
    first = _launch(run, 2, "--data.path", data, "--parallel.distributed_optimizer", "true",
                    env={"TESSERA_DEBUG_KILL_AT": "step:3"})
    assert first.returncode != 0 and (run / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    second = _launch(run, 2, "--data.path", data, "--parallel.distributed_optimizer", "true", "--parallel.tp", "2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "(step 2), RNG reseeded" in second.stdout  # another layout
    got = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    _assert_same(got, ref, "DP2+distopt -> TP2+distopt", steps=(3, 4))


# ---- the settings' checks -------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,match", [
    (["--parallel.sequence_parallel", "true"], "parallel.sequence_parallel needs tensor parallelism"),
    (["--parallel.tp", "2", "--parallel.sequence_parallel", "true", "--data.seq_length", "33"],
     "data.seq_length 33 is not divisible by parallel.tp 2"),
    (["--parallel.overlap_param_gather", "true", "--parallel.overlap_grad_reduce", "true"],
     "overlap_param_gather needs parallel.distributed_optimizer"),
    (["--parallel.overlap_param_gather", "true", "--parallel.distributed_optimizer", "true"],
     "overlap_param_gather needs parallel.overlap_grad_reduce"),
    (["--parallel.context_parallel", "2"], "parallel.context_parallel 2: only 1 is supported"),
    (["--parallel.ddp_bucket_size", "0"], "ddp_bucket_size must be >= 1"),
])
def test_scale_settings_are_checked_with_clear_errors(overrides, match):
    from tessera.pretrain.config import load_train_config
    from tessera.pretrain.scale import validate_scale

    cfg = load_train_config("configs/demo.yaml", ["--model.preset", "tiny", "--data.seq_length", "32", *overrides])
    with pytest.raises(ConfigError, match=match):
        validate_scale(cfg, 2)


@pytest.mark.parametrize("overrides,match", [
    (["--model.recompute", "sometimes"], "model.recompute 'sometimes' is not one of"),
    (["--model.recompute_num_layers", "1"], "recompute_num_layers is for model.recompute: full"),
    (["--model.recompute", "full", "--model.recompute_method", "sideways"], "recompute_method 'sideways'"),
])
def test_recompute_settings_are_checked(overrides, match):
    from tessera.pretrain.config import load_train_config

    with pytest.raises(ConfigError, match=match):
        load_train_config("configs/demo.yaml", ["--model.preset", "tiny", *overrides])


def test_recompute_maps_to_megatrons_fields():
    from tessera.model.chameleon import recompute_settings
    from tessera.model.config import get_preset
    from tessera.pretrain.config import load_train_config

    def fields(*ov):
        return recompute_settings(load_train_config(None, ["--model.preset", "tiny", *ov]).model, 2)

    assert fields() == {"recompute_granularity": None, "recompute_method": None, "recompute_num_layers": None}
    assert fields("--model.recompute", "selective")["recompute_granularity"] == "selective"
    assert fields("--model.recompute", "full") == {"recompute_granularity": "full", "recompute_method": "uniform",
                                                   "recompute_num_layers": 1}
    assert fields("--model.recompute", "full", "--model.recompute_method", "block")["recompute_num_layers"] == 2
    m = get_preset("tiny")
    m.recompute, m.recompute_num_layers = "full", 3
    with pytest.raises(ConfigError, match="recompute_num_layers 3 exceeds the 2 layers of a pipeline stage"):
        m.validate(1, 1)


def test_gradient_accumulation_fusion_needs_cuda_and_its_kernel(monkeypatch):
    """On only where megatron's layers can run it (CUDA + apex's fused_weight_gradient_mlp_cuda): elsewhere off,
    with no error (megatron's own layers raise if it is on without the kernel)."""
    import torch
    from megatron.core.tensor_parallel import layers

    from tessera.pretrain.scale import gradient_accumulation_fusion_available

    for cuda, kernel, want in ((False, True, False), (True, False, False), (True, True, True)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        monkeypatch.setattr(layers, "_grad_accum_fusion_available", kernel)
        assert gradient_accumulation_fusion_available() is want, (cuda, kernel)
