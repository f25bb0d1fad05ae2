"""A NaN injected into the loss (TESSERA_DEBUG_NAN_STEPS, tessera.pretrain.faults) is skipped and counted;
max_bad_steps stops the run."""

import json
import subprocess
import sys


def _run(tmp_path, nan_steps, *extra):
    cmd = [sys.executable, "-m", "tessera.pretrain.trainer", "configs/demo.yaml", "--model.preset", "tiny",
           "--train.steps", "4", "--optim.warmup", "1", "--data.seq_length", "32",
           "--train.run_dir", str(tmp_path), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={"OMP_NUM_THREADS": "1",
                          "PATH": "/usr/bin:/bin", "TESSERA_DEBUG_NAN_STEPS": nan_steps})


def test_nan_step_is_skipped_and_counted(tmp_path):
    r = _run(tmp_path, "2")
    assert r.returncode == 0, r.stderr[-2000:]
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs] == [1, 2, 3, 4]
    assert recs[1]["bad_steps"] == 1 and recs[1]["loss"] != recs[1]["loss"]  # NaN
    assert all(x["bad_steps"] == 0 and x["loss"] == x["loss"] for x in (recs[0], recs[2], recs[3]))


def test_consecutive_bad_steps_stop(tmp_path):
    r = _run(tmp_path, "2,3", "--train.max_bad_steps", "2")
    assert r.returncode != 0 and "2 consecutive non-finite steps at step 3" in r.stderr
