"""launch/torchrun.sh and launch/slurm.sbatch: --dry-run prints the environment taken from the run config
(tessera.pretrain.launch) and the exact command; torchrun honours the shutdown timeout they export."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tessera.config import ConfigError
from tessera.pretrain.launch import (
    launch_env,
    overlaps_communication,
    shutdown_timeout,
    torchrun_reads_shutdown_timeout,
)

ROOT = Path(__file__).resolve().parents[1]
SITE_VARS = ("NCCL_SOCKET_IFNAME", "NCCL_IB_GID_INDEX", "NCCL_IB_HCA", "NCCL_NET_GDR_LEVEL", "NCCL_DEBUG")


def _env(extra=None):
    # the scripts run `$PYTHON -m tessera.pretrain.launch` with this tree's tessera; no site NCCL settings
    env = {k: v for k, v in os.environ.items() if k not in SITE_VARS and not k.startswith("SLURM_")}
    env.update(PYTHON=sys.executable, PYTHONPATH=str(ROOT), **(extra or {}))
    return env


def _run(args, env=None, check=True):
    return subprocess.run(["bash", *args], capture_output=True, text=True, check=check, env=_env(env), cwd=ROOT)


def test_torchrun_dry_run():
    out = _run(["launch/torchrun.sh", "--dry-run", "--nproc", "4", "--", "--config", "configs/demo.yaml",
                "--train.steps", "5"]).stdout
    assert out.splitlines() == [
        "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=180",  # 2 x the default train.expected_step_seconds (90)
        "torchrun --standalone --nnodes 1 --nproc_per_node 4 -m tessera.pretrain "
        "--config configs/demo.yaml --train.steps 5",
    ]


def test_torchrun_dry_run_takes_step_time_and_overlap_from_the_config():
    out = _run(["launch/torchrun.sh", "--dry-run", "--nproc", "8", "--", "--config", "configs/demo.yaml",
                "--train.expected_step_seconds", "400.5", "--parallel.tp", "2"]).stdout
    assert out.splitlines()[:2] == ["export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=801", "export CUDA_DEVICE_MAX_CONNECTIONS=1"]


def test_slurm_dry_run_sets_no_site_specific_nccl_variables():
    env = {"SLURM_NNODES": "4", "GPUS_PER_NODE": "8", "MASTER_ADDR": "node001", "SLURM_CPUS_PER_TASK": "96"}
    out = _run(["launch/slurm.sbatch", "--dry-run", "--config", "configs/chameleon-7b.yaml"], env).stdout.splitlines()
    assert out == [
        "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=180",
        "export CUDA_DEVICE_MAX_CONNECTIONS=1",  # chameleon-7b.yaml: TP=2
        "export NCCL_DEBUG=WARN",
        "srun --kill-on-bad-exit=1 --cpus-per-task 96 torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d "
        "--rdzv_endpoint node001:29500 --rdzv_id local -m tessera.pretrain --config configs/chameleon-7b.yaml",
    ]
    header = (ROOT / "launch" / "slurm.sbatch").read_text()
    assert "#SBATCH --cpus-per-task=" in header
    assert "NCCL_SOCKET_IFNAME" not in "".join(
        line for line in header.splitlines() if not line.lstrip().startswith("#"))


def test_slurm_dry_run_reads_a_site_file_and_keeps_users_nccl_settings(tmp_path):
    site = tmp_path / "site.env"
    site.write_text("export NCCL_SOCKET_IFNAME=ib0\nexport NCCL_IB_HCA=mlx5_0,mlx5_1\n")
    env = {"TESSERA_SITE_ENV": str(site), "NCCL_DEBUG": "INFO", "MASTER_ADDR": "n1"}
    out = _run(["launch/slurm.sbatch", "--dry-run", "--config", "configs/demo.yaml"], env).stdout.splitlines()
    assert out[1:4] == ["export NCCL_DEBUG=INFO", "export NCCL_IB_HCA=mlx5_0,mlx5_1", "export NCCL_SOCKET_IFNAME=ib0"]
    assert "--cpus-per-task 64" in out[-1]  # the #SBATCH default when Slurm did not say


def test_slurm_warns_when_the_shutdown_timeout_outlasts_the_preemption_warning():
    proc = _run(["launch/slurm.sbatch", "--dry-run", "--config", "configs/demo.yaml",
                 "--train.expected_step_seconds", "150"])
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=300" in proc.stdout
    assert "not shorter than the preemption warning (300 s)" in proc.stderr


@pytest.mark.parametrize("script", [["launch/torchrun.sh", "--dry-run", "--"], ["launch/slurm.sbatch", "--dry-run"]])
def test_a_bad_config_stops_the_launch_with_one_line(script):
    proc = _run([*script, "--config", "configs/demo.yaml", "--train.expected_step_seconds", "0"], check=False)
    assert proc.returncode != 0 and "torchrun" not in proc.stdout
    assert proc.stderr.strip().splitlines() == [
        "tessera.pretrain.launch: train.expected_step_seconds must be a positive number of seconds, got 0.0"]


def test_shutdown_timeout_is_twice_the_step_and_never_below_torchruns_default():
    assert shutdown_timeout(90) == 180 and shutdown_timeout(100.2) == 201 and shutdown_timeout(1) == 30
    for bad in (0, -5, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="train.expected_step_seconds"):
            shutdown_timeout(bad)


@pytest.mark.parametrize("key", ["tp", "context_parallel", "sequence_parallel", "overlap_grad_reduce",
                                 "overlap_param_gather"])
def test_single_cuda_connection_whenever_communication_overlaps(key):
    assert not overlaps_communication(SimpleNamespace(tp=1))  # keys this config does not have count as off
    on = SimpleNamespace(**{"tp": 1, key: 2 if key in ("tp", "context_parallel") else True})
    assert overlaps_communication(on)
    cfg = SimpleNamespace(parallel=on, train=SimpleNamespace(expected_step_seconds=10.0))
    assert launch_env(cfg) == {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "30", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}


def test_torchrun_honours_the_exported_shutdown_timeout(tmp_path):
    """The mechanism the scripts rely on, in the installed torch: torchrun, SIGTERM'd, forwards SIGTERM and
    SIGKILLs a worker still busy after TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (its default would be 30)."""
    assert torchrun_reads_shutdown_timeout() is True
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(f"""
        import pathlib, signal, time
        def saving(*_):  # a save that takes 20 s
            time.sleep(20)
            pathlib.Path({str(tmp_path / "saved")!r}).touch()
            raise SystemExit(0)
        signal.signal(signal.SIGTERM, saving)
        pathlib.Path({str(tmp_path / "ready")!r}).touch()
        time.sleep(120)
    """))
    env = _env({"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "2"})
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                              str(worker)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "ready").exists():
            assert agent.poll() is None and time.monotonic() < deadline, agent.stdout.read() if agent.poll() else "timeout"
            time.sleep(0.1)
        start = time.monotonic()
        agent.send_signal(signal.SIGTERM)
        out, _ = agent.communicate(timeout=60)
        waited = time.monotonic() - start
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
    assert not (tmp_path / "saved").exists()
    assert 1.5 < waited < 15, (waited, out[-2000:])
