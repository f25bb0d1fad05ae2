"""launch/torchrun.sh and launch/slurm.sbatch print the exact command with --dry-run."""

import os
import subprocess


def _run(args, env=None):
    e = dict(os.environ, **(env or {}))
    return subprocess.run(["bash", *args], capture_output=True, text=True, check=True, env=e).stdout


def test_torchrun_dry_run():
    out = _run(["launch/torchrun.sh", "--dry-run", "--nproc", "4", "--", "--config", "configs/demo.yaml", "--train.steps", "5"])
    assert out.strip() == (
        "torchrun --standalone --nnodes 1 --nproc_per_node 4 -m tessera.pretrain "
        "--config configs/demo.yaml --train.steps 5"
    )


def test_slurm_dry_run_uses_env_overrides():
    env = {"SLURM_NNODES": "4", "GPUS_PER_NODE": "8", "NCCL_IB_HCA": "mlx5_0,mlx5_1", "MASTER_ADDR": "node001",
           "SLURM_JOB_NODELIST": ""}
    out = _run(["launch/slurm.sbatch", "--dry-run", "--config", "configs/chameleon-7b.yaml"], env).splitlines()
    assert "NCCL_IB_HCA=mlx5_0,mlx5_1" in out[0] and "NCCL_DEBUG=WARN" in out[0]
    assert out[1] == (
        "srun --kill-on-bad-exit=1 torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d "
        "--rdzv_endpoint node001:29500 --rdzv_id local -m tessera.pretrain --config configs/chameleon-7b.yaml"
    )
