"""TrainConfig loading (preset + overrides) and the parallel-layout checks."""

import pytest

from tessera.config import ConfigError
from tessera.pretrain.config import load_train_config, validate_layout


def test_shipped_configs_load_and_validate():
    demo = load_train_config("configs/demo.yaml")
    assert demo.model.num_layers > 0 and validate_layout(demo, 1) == 1
    c7 = load_train_config("configs/chameleon-7b.yaml")
    assert c7.model.seq_length == 4096 and c7.model.z_loss_weight == 1e-5 and c7.model.qk_norm
    assert validate_layout(c7, 16) == 8  # two 8-GPU nodes, TP=2
    c34 = load_train_config("configs/chameleon-34b.yaml")
    assert c34.model.swin_norm and validate_layout(c34, 32) == 2
    from tessera.pretrain.scale import validate_scale

    for cfg, world in ((c7, 16), (c34, 32)):  # what their TP > 1 layouts need: megatron's scale features
        validate_scale(cfg, world)
        p = cfg.parallel
        assert p.tp > 1 and p.sequence_parallel and p.distributed_optimizer
        # no recomputation: fused attention keeps no s x s activations for selective to drop (docs/scaling.md)
        assert p.overlap_grad_reduce and p.overlap_param_gather and cfg.model.recompute == "none"


def test_overrides_apply_on_top_of_preset():
    cfg = load_train_config("configs/demo.yaml", ["--model.num_layers", "4", "--parallel.tp", "2"])
    assert cfg.model.num_layers == 4 and cfg.parallel.tp == 2


@pytest.mark.parametrize(
    "overrides,world,match",
    [
        (["--parallel.tp", "2", "--parallel.pp", "2"], 6, "world size 6"),
        (["--parallel.global_batch_size", "7"], 2, "global_batch_size 7"),
        (["--parallel.tp", "8"], 8, "num_attention_heads 4"),
        (["--model.num_layers", "3", "--parallel.pp", "2"], 2, "num_layers 3"),
        (["--parallel.vp", "2"], 1, "needs parallel.pp"),
        (["--train.steps", "5", "--optim.warmup", "5"], 1, "optim.warmup 5 must be smaller than train.steps 5"),
    ],
)
def test_bad_layouts_name_the_field(overrides, world, match):
    cfg = load_train_config(None, ["--model.num_attention_heads", "4", "--model.num_layers", "4", *overrides])
    with pytest.raises(ConfigError, match=match):
        validate_layout(cfg, world)


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="nope"):
        load_train_config(None, ["--train.nope", "1"])


def test_deterministic_setting_resolves_per_device_and_sets_megatron_lms_environment():
    import torch

    from tessera.pretrain.determinism import apply_determinism, resolve_deterministic

    assert load_train_config("configs/demo.yaml").train.deterministic == "auto"
    assert load_train_config(None, ["--train.deterministic", "false"]).train.deterministic is False
    assert resolve_deterministic("auto", cuda=False) is True and resolve_deterministic("auto", cuda=True) is False
    assert resolve_deterministic(True, cuda=True) is True and resolve_deterministic(False, cuda=False) is False
    with pytest.raises(ConfigError, match="train: deterministic: cannot read 'sometimes'"):
        load_train_config(None, ["--train.deterministic", "sometimes"])

    was = torch.are_deterministic_algorithms_enabled()
    try:
        env = {"NCCL_ALGO": "Tree"}
        assert apply_determinism(True, cuda=True, environ=env) == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8",
                                                                 "NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0"}
        assert env["NCCL_ALGO"] == "Tree" and torch.are_deterministic_algorithms_enabled()  # the user's choice kept
        env = {}
        apply_determinism(True, cuda=True, environ=env)
        assert env["NCCL_ALGO"] == "Ring"
        with pytest.raises(ConfigError, match="NCCL_ALGO=NVLS is not deterministic"):
            apply_determinism(True, cuda=True, environ={"NCCL_ALGO": "NVLS"})
        env = {}
        assert apply_determinism(False, cuda=True, environ=env) == {} and env == {}
        assert not torch.are_deterministic_algorithms_enabled()
        assert apply_determinism(True, cuda=False, environ=env) == {} and env == {}  # the CPU needs no variables
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(was)


def test_a_job_that_asked_for_gpus_stops_when_torch_sees_none():
    from tessera.pretrain.device import NoGPUError, gpu_request, require_requested_gpus

    assert gpu_request({}) is None
    assert gpu_request({"CUDA_VISIBLE_DEVICES": "", "SLURM_GPUS_ON_NODE": "0", "SLURM_JOB_GPUS": ""}) is None
    assert gpu_request({"CUDA_VISIBLE_DEVICES": "-1", "SLURM_GPUS_PER_NODE": "a100:0"}) is None
    assert gpu_request({"CUDA_VISIBLE_DEVICES": "0"}) == "CUDA_VISIBLE_DEVICES=0"  # device 0, not a count
    assert gpu_request({"SLURM_GPUS_PER_NODE": "h100:8"}) == "SLURM_GPUS_PER_NODE=h100:8"
    assert gpu_request({"CUDA_VISIBLE_DEVICES": "0,1"}) == "CUDA_VISIBLE_DEVICES=0,1"
    assert gpu_request({"SLURM_GPUS_ON_NODE": "8"}) == "SLURM_GPUS_ON_NODE=8"
    assert gpu_request({"SLURM_JOB_GPUS": "0,1,2,3"}) == "SLURM_JOB_GPUS=0,1,2,3"
    assert gpu_request({"SLURM_STEP_GPUS": "2"}) == "SLURM_STEP_GPUS=2"
    assert gpu_request({}, backend="nccl") == "parallel.backend nccl"
    require_requested_gpus({"CUDA_VISIBLE_DEVICES": "0"}, cuda_available=True)  # sees one: fine
    require_requested_gpus({"WORLD_SIZE": "2", "RANK": "1"}, cuda_available=False)  # a gloo CPU job: fine
    with pytest.raises(NoGPUError, match=r"asked for GPUs \(SLURM_STEP_GPUS=2\) but torch sees none"):
        require_requested_gpus({"SLURM_STEP_GPUS": "2"}, cuda_available=False)
    assert load_train_config(None, ["--parallel.backend", "nccl"]).parallel.backend == "nccl"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine where torch sees no GPU")
def test_trainer_refuses_a_gpu_job_without_gpus_in_one_line(tmp_path):
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "tessera.pretrain.trainer", "configs/demo.yaml", "--model.preset", "tiny",
           "--train.run_dir", str(tmp_path / "run")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ, CUDA_VISIBLE_DEVICES="0"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith(
        "tessera train: error: this job asked for GPUs (CUDA_VISIBLE_DEVICES=0) but torch sees none")
    assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()
