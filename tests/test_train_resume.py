"""Full-state checkpoints: exact resume after SIGKILL (also mid-save), SIGTERM save on one rank of two,
TP=2 save -> TP=1 load, rotation, metrics trimming, model-config mismatch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tessera.model.checkpoint import CheckpointError, step_dir_name
from tessera.pretrain.checkpointing import (
    check_model_config,
    rotate_checkpoints,
    trim_metrics,
)
from tessera.pretrain.config import load_train_config
from tessera.pretrain.preemption import StopSignal

BASE = ["configs/demo.yaml", "--model.preset", "tiny", "--data.seq_length", "32", "--optim.warmup", "1",
        "--train.eval_interval", "0"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")
COMPARED = ("loss", "grad_norm", "lr", "bad_steps", "z", "ce", "ce_text", "ce_image", "ce_special")


def _cmd(run: Path, nproc: int, *extra: str) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                if nproc > 1 else [sys.executable])
    return [*launcher, "-m", "tessera.pretrain.trainer", *BASE, "--train.run_dir", str(run), *extra]


def _start(cmd: list[str], out, err, env: dict | None = None) -> subprocess.Popen:
    # own process group: a SIGKILLed trainer leaves megatron's save-results Manager process (and its
    # resource tracker) orphaned, holding inherited stdout; the group is killed after the run (_reap)
    return subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=dict(ENV, **(env or {})),
                            start_new_session=True)


def _reap(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _run(run: Path, *extra: str, nproc: int = 1, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = _cmd(run, nproc, *extra)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = _start(cmd, out, err, env)
        try:
            rc = proc.wait(timeout=300)
        finally:
            _reap(proc)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, rc, out.read(), err.read())


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _compared(recs: list[dict]) -> list[dict]:
    return [{k: r[k] for k in ("step", *COMPARED) if k in r} for r in recs]


def _latest(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


@pytest.fixture(scope="module")
def pretok(tiny_pretok):
    """The session's tiny pretokenized corpus (conftest.tiny_pretok)."""
    return tiny_pretok["train"]


def test_sigkill_anywhere_then_resume_is_bitwise_identical(tmp_path, pretok):
    """Real data + dropout (so data position and RNG matter). Killed after step 5 (metrics row 5 logged, last
    checkpoint 4), then killed again inside the save of step 6 (tmp dir written, never renamed), then resumed:
    the metrics file reads as one run and every compared value is == to the uninterrupted run's."""
    args = ("--data.path", str(pretok), "--train.steps", "8", "--train.save_interval", "2",
            "--train.keep_last_n", "2", "--model.hidden_dropout", "0.1", "--model.attention_dropout", "0.1")
    ref = tmp_path / "ref"
    r = _run(ref, *args)
    assert r.returncode == 0, r.stderr[-3000:]

    run = tmp_path / "run"
    r = _run(run, *args, env={"TESSERA_DEBUG_KILL_AT": "step:5"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert [x["step"] for x in _metrics(run)] == [1, 2, 3, 4, 5] and _latest(run) == step_dir_name(4)

    r = _run(run, *args, env={"TESSERA_DEBUG_KILL_AT": "save:6"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / step_dir_name(4)} (step 4)" in r.stdout
    assert [x["step"] for x in _metrics(run)] == [1, 2, 3, 4, 5, 6]  # row 5 of the first kill was dropped
    partial = [p.name for p in (run / "checkpoints").iterdir() if ".tmp-" in p.name]
    assert len(partial) == 1 and partial[0].startswith(step_dir_name(6)) and _latest(run) == step_dir_name(4)

    r = _run(run, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(step 4)" in r.stdout  # the partial step 6 was ignored
    assert _compared(_metrics(run)) == _compared(_metrics(ref))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", step_dir_name(6), step_dir_name(8)]
    assert "ce_text" in _metrics(run)[0]  # real data: per-modality CE logged and compared


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        f = run / "metrics.jsonl"
        if f.is_file() and any(json.loads(x)["step"] >= step for x in f.read_text().splitlines() if x.strip()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before step {step}")
        time.sleep(0.05)
    raise AssertionError(f"no step {step} in {timeout} s")


def test_sigterm_on_one_rank_saves_tp2_and_tp1_resume_matches(tmp_path):
    """SIGTERM to rank 1 only of a TP=2 run: both ranks agree (all-reduce), save at the same step and exit 0.
    That TP=2 checkpoint resumes in one TP=1 process; its next step's loss equals the uninterrupted TP=1 run's
    within 1e-5 (TP changes the reduction order). The mock dataset, no dropout (RNG is reseeded when the
    layout changes)."""
    import psutil

    args = ("--train.steps", "16", "--train.save_interval", "100")
    ref = tmp_path / "ref"
    r = _run(ref, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    ref_loss = {x["step"]: x["loss"] for x in _metrics(ref)}

    run = tmp_path / "tp2"
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        proc = _start(_cmd(run, 2, *args, "--parallel.tp", "2"), out_f, err_f)
        try:
            _wait_for_step(run, 2, proc)
            workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                       if p.environ().get("RANK") == "1"]
            assert len(workers) == 1
            workers[0].send_signal(signal.SIGTERM)
            proc.wait(timeout=240)
        finally:
            _reap(proc)
        out_f.seek(0)
        err_f.seek(0)
        out, err = out_f.read(), err_f.read()
    assert proc.returncode == 0, err[-3000:]
    k = int(_latest(run).split("_")[1])
    assert 2 <= k < 16 and f"SIGTERM: saved {run / 'checkpoints' / step_dir_name(k)} after step {k}" in out
    assert [x["step"] for x in _metrics(run)] == list(range(1, k + 1))

    r = _run(run, *args)  # the same run dir, now one process, TP=1
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"(step {k}), RNG reseeded" in r.stdout
    got = {x["step"]: x["loss"] for x in _metrics(run)}
    assert sorted(got) == list(range(1, 17))
    assert got[k + 1] == pytest.approx(ref_loss[k + 1], abs=1e-5, rel=0)


@pytest.mark.slow
def test_resume_never_and_init_from(tmp_path):
    """resume: never starts over in a run dir that has checkpoints; init_from loads weights only (dropout may
    differ, shapes may not)."""
    args = ("--train.steps", "3", "--train.save_interval", "2")
    src = tmp_path / "src"
    assert _run(src, *args).returncode == 0
    first = _metrics(src)
    r = _run(src, *args, "--train.resume", "never")
    assert r.returncode == 0 and "resumed" not in r.stdout
    assert _compared(_metrics(src)) == _compared(first)  # same run again from step 1, one row per step

    dst = tmp_path / "dst"
    r = _run(dst, *args, "--train.init_from", str(src), "--model.hidden_dropout", "0.1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"initialised weights from {src / 'checkpoints' / step_dir_name(3)}" in r.stdout
    got = _metrics(dst)
    assert [x["step"] for x in got] == [1, 2, 3] and got[0]["loss"] < first[0]["loss"]  # trained weights

    r = _run(tmp_path / "bad", *args, "--train.init_from", str(src), "--model.hidden_size", "128")
    assert r.returncode != 0 and "hidden_size: checkpoint 64 vs run 128" in r.stderr


# ---- unit tests of the pieces --------------------------------------------------------------------
def _fake_ckpt(checkpoints: Path, step: int, complete: bool = True) -> Path:
    d = checkpoints / step_dir_name(step)
    d.mkdir(parents=True)
    if complete:
        (d / "tessera.json").write_text("{}")
    return d


def test_rotation_keeps_last_n_and_latest_and_removes_partial_saves(tmp_path):
    ck = tmp_path / "checkpoints"
    for s in (2, 4, 6, 8):
        _fake_ckpt(ck, s)
    (ck / f"{step_dir_name(10)}.tmp-123").mkdir()
    (ck / f"{step_dir_name(6)}.old-7").mkdir()
    (ck / "latest").write_text(step_dir_name(4) + "\n")  # e.g. latest still names an older one
    removed = rotate_checkpoints(ck, 2)
    assert sorted(p.name for p in removed) == sorted([step_dir_name(2), f"{step_dir_name(10)}.tmp-123",
                                                      f"{step_dir_name(6)}.old-7"])
    assert sorted(p.name for p in ck.iterdir()) == ["latest", step_dir_name(4), step_dir_name(6), step_dir_name(8)]
    assert rotate_checkpoints(ck, 0) == []  # 0 keeps every checkpoint


def test_trim_metrics_drops_rows_past_the_checkpoint_and_a_torn_line(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    assert trim_metrics(f, 3) == 3
    assert [json.loads(x)["step"] for x in f.read_text().splitlines()] == [1, 2, 3]
    assert trim_metrics(f, 3) == 0 and trim_metrics(tmp_path / "absent.jsonl", 0) == 0


def test_model_config_mismatch_names_the_fields(tmp_path):
    cfg = load_train_config("configs/demo.yaml", ["--model.preset", "tiny"])
    from tessera.config import to_dict

    saved = to_dict(cfg)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    check_model_config(tmp_path, cfg.model)  # same: fine
    cfg.model.hidden_size, cfg.model.hidden_dropout = 128, 0.1
    with pytest.raises(CheckpointError, match=r"hidden_size: checkpoint 64 vs run 128") as e:
        check_model_config(tmp_path, cfg.model)
    assert str(tmp_path) in str(e.value) and "hidden_dropout" in str(e.value)
    with pytest.raises(CheckpointError, match="hidden_size") as e:  # init_from: dropout may change, shapes may not
        check_model_config(tmp_path, cfg.model, ignore=frozenset({"hidden_dropout", "attention_dropout"}))
    assert "hidden_dropout" not in str(e.value)


def test_test_hooks_come_from_the_environment_and_stop_signal(tmp_path):
    from tessera.config import ConfigError
    from tessera.pretrain.faults import kill_step, nan_steps

    env = {"TESSERA_DEBUG_KILL_AT": "save:6", "TESSERA_DEBUG_NAN_STEPS": "2,5"}
    assert kill_step("save", env) == 6 and kill_step("step", env) is None and kill_step("step", {}) is None
    assert nan_steps(env) == {2, 5} and nan_steps({}) == frozenset()
    with pytest.raises(ConfigError, match="TESSERA_DEBUG_KILL_AT"):
        kill_step("step", {"TESSERA_DEBUG_KILL_AT": "mid:3"})
    # they are not run-config settings: a config asking for one says where they went
    with pytest.raises(ConfigError, match="train.debug_kill_at is not a config setting any more: tests set "
                                          "TESSERA_DEBUG_KILL_AT"):
        load_train_config("configs/demo.yaml", ["--train.debug_kill_at", "save:6"])
    old = tmp_path / "old.yaml"  # a config saved by an older version, with the hooks empty, still loads
    old.write_text("train: {steps: 3, debug_kill_at: '', debug_nan_steps: []}\n")
    assert load_train_config(old).train.steps == 3

    before = signal.getsignal(signal.SIGTERM)
    stop = StopSignal().install()
    try:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested()  # no process group: the local flag
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is before


def test_fully_parallel_checkpoint_strategies_are_used_and_can_be_turned_off(megatron_1proc, tmp_path, monkeypatch):
    """train.ckpt_fully_parallel_save / _load (on by default) wrap megatron's save / load strategy in its
    FullyParallel*StrategyWrapper over the data-parallel group; off, the default strategies; either way the
    checkpoint loads back (1 process here: the multi-process runs in test_train_scale use the default)."""
    from megatron.core.dist_checkpointing.strategies import fully_parallel

    from tessera.pretrain.checkpointing import load_checkpoint, save_checkpoint
    from tessera.pretrain.config import ResolvedRun
    from tessera.pretrain.optimizer import get_optimizer
    from tessera.pretrain.trainer import _build_model_chunks, get_scheduler

    used = []
    for cls in (fully_parallel.FullyParallelSaveStrategyWrapper, fully_parallel.FullyParallelLoadStrategyWrapper):
        for name in ("save", "load"):
            if hasattr(cls, name):
                original = getattr(cls, name)
                monkeypatch.setattr(cls, name, lambda self, *a, _o=original, _n=cls.__name__, **k: (
                    used.append(_n), _o(self, *a, **k))[1])
    cfg = load_train_config("configs/demo.yaml", ["--model.preset", "tiny"])
    chunks, ddps = _build_model_chunks(cfg, bf16=False)
    opt = get_optimizer(cfg.optim, ddps, bf16=False)
    sched = get_scheduler(cfg, opt)
    for d in ddps:
        d.zero_grad_buffer()
    opt.step()  # the optimizer has state to save (a run saves after its first step at the earliest)
    resolved = ResolvedRun(model=cfg.model, precision="fp32", deterministic=True, world_size=1, data_parallel_size=1,
                           device="cpu", gradient_accumulation_fusion=False, mfu_peak_flops=None, mfu_peak="none")
    for on in (True, False):
        cfg.train.ckpt_fully_parallel_save = cfg.train.ckpt_fully_parallel_load = on
        used.clear()
        path = save_checkpoint(tmp_path / f"run{on}", 1, model=chunks[0], optimizer=opt, scheduler=sched, cfg=cfg,
                               resolved=resolved)
        st = load_checkpoint(path, model=chunks[0], optimizer=opt, scheduler=sched, cfg=cfg, model_cfg=cfg.model)
        assert st.step == 1
        assert used == (["FullyParallelSaveStrategyWrapper", "FullyParallelLoadStrategyWrapper"] if on else []), used
        saved = yaml.safe_load((path / "config.yaml").read_text())
        assert saved["resolved"]["model"] == saved["model"] and "debug_kill_at" not in saved["train"]
