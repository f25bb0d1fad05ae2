"""A 2-process TP=2 run of the tiny model gives the 1-process losses (fp32 tolerance).

DP=2 matches at step 1 but diverges after the first update, and PP=2 initialises differently: both open
(docs/training.md), so they are not asserted here yet."""

import json
import os
import subprocess
import sys

import pytest

ARGS = ["configs/demo.yaml", "--model.preset", "tiny", "--train.steps", "3", "--optim.warmup", "1",
        "--data.seq_length", "32"]


def _losses(tmp_path, name, nproc, *extra):
    run = tmp_path / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "tessera.pretrain.trainer", *ARGS, "--train.run_dir", str(run), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_tp2_matches_one_process(tmp_path):
    ref = _losses(tmp_path, "ref", 1)
    got = _losses(tmp_path, "par", 2, "--parallel.tp", "2")
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-5)
