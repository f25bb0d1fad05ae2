"""Typed run config for `tessera train` and the parallel-layout checks done before any process group exists."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tessera.config import ConfigError, apply_overrides, from_dict, parse_overrides, read_yaml_mapping
from tessera.data.config import DataConfig, normalize_data_section, rename_weave_override
from tessera.model.config import ModelConfig, get_preset


@dataclass
class ParallelConfig:
    """The layout and megatron's scale features (docs/training.md, "Scale settings")."""

    tp: int = 1
    pp: int = 1
    vp: int | None = None  # virtual pipeline stages per rank (interleaved 1F1B); None = off
    micro_batch_size: int = 1
    global_batch_size: int = 8
    # auto: NCCL when torch sees CUDA, gloo otherwise; nccl: a GPU job (stops at once if torch sees no GPU)
    backend: Literal["auto", "nccl"] = "auto"
    # megatron's DistributedOptimizer: fp32 main params + Adam state sharded over the data-parallel ranks
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False  # DDP reduces gradient buckets while the backward runs
    overlap_param_gather: bool = False  # distributed optimizer: all-gather params during the next forward
    ddp_bucket_size: int | None = None  # parameters per gradient bucket; None: megatron-LM's max(40M, 1M x DP)
    sequence_parallel: bool = False  # split norms / dropout activations along the sequence over TP (TP > 1)
    context_parallel: int = 1  # megatron's local attention has no context parallelism: only 1


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup: int = 10
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-5
    clip_grad: float = 1.0


@dataclass
class TrainSection:
    steps: int = 100
    log_interval: int = 1
    # the logit monitors (output-logit norm, max attention logit): step 1, every monitor_interval, the last
    monitor_interval: int = 10
    eval_interval: int = 50
    eval_steps: int = 2
    save_interval: int = 50
    keep_last_n: int = 3  # step checkpoints kept in RUN/checkpoints (0 = all)
    resume: Literal["auto", "never"] = "auto"  # auto: continue from RUN/checkpoints/latest when it exists
    init_from: str = ""  # checkpoint / run dir whose model weights start a run that has nothing to resume
    max_bad_steps: int = 5
    # auto: on for the CPU, off on CUDA; what "on" sets and costs: tessera/pretrain/determinism.py, docs/training.md
    deterministic: Literal["auto"] | bool = "auto"
    image_loss_weight: float = 1.0
    seed: int = 1234
    run_dir: str = "runs/demo"
    # per device, for MFU; None = the GPU's datasheet dense peak for the run's precision (bf16, TF32 or FP32:
    # tessera.model.flops), and no MFU on the CPU or on a GPU missing from that table
    peak_flops: float | None = None
    # megatron-LM's --ckpt-fully-parallel-save / -load: each data-parallel replica writes / reads its share
    ckpt_fully_parallel_save: bool = True
    ckpt_fully_parallel_load: bool = True
    # seconds one optimizer step plus one checkpoint save take on the target machine: a SIGTERM'd job
    # needs that long to stop cleanly, so the launchers give torchrun's shutdown twice this
    # (tessera/pretrain/launch.py). The default fits configs/chameleon-7b.yaml on one 8-GPU node.
    expected_step_seconds: float = 90.0


@dataclass
class LoRAConfig:
    """LoRA adapters on megatron's parallel linears (tessera.model.lora); ``rank`` 0 = off."""

    rank: int = 0
    alpha: float = 16.0  # the low-rank term is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input
    # any of linear_qkv, linear_proj, linear_fc1, linear_fc2, output_layer (tessera.model.lora.TARGETS)
    targets: list[str] = field(default_factory=lambda: ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])


@dataclass
class FinetuneConfig:
    """Fine-tuning from ``train.init_from`` (docs/finetuning.md): frozen parameter groups or LoRA."""

    # any of embedding, output_layer, norms, layers:N (the first N layers), image_rows (tessera.model.freeze)
    freeze: list[str] = field(default_factory=list)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU


@dataclass
class ResolvedRun:
    """What the trainer decided at start-up from the request, the data and the machine. Saved as the
    ``resolved:`` section of RUN/config.yaml and of every checkpoint's config.yaml, beside the request
    (which the run never changes); ``load_train_config`` ignores it, so a saved config runs again as asked."""

    model: ModelConfig  # the model built: vocab_size from data.path's vocabulary, params_dtype from precision
    precision: str  # fp32 | bf16
    deterministic: bool
    world_size: int
    data_parallel_size: int
    device: str
    gradient_accumulation_fusion: bool
    mfu_peak_flops: float | None  # per device; None: no MFU reported
    mfu_peak: str  # where that peak comes from
    rope_fusion: bool = False  # TE's fused RoPE (document-masked runs where Transformer Engine has it)


# test hooks that once lived in the run config (tessera/pretrain/faults.py reads them from the environment)
_MOVED_TO_ENV = {"debug_kill_at": "TESSERA_DEBUG_KILL_AT", "debug_nan_steps": "TESSERA_DEBUG_NAN_STEPS"}


def _resolve_model(raw: Any, source: str) -> dict:
    """`model: {preset: NAME, key: value...}` -> full ModelConfig dict (preset + overrides)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: model: expected a mapping, got {raw!r}")
    raw = dict(raw)
    preset = raw.pop("preset", None)
    base = dataclasses.asdict(get_preset(preset)) if preset else {}
    base.update(raw)
    return base


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read YAML, apply `--section.key value` overrides (`--model.preset NAME` allowed), type-check."""
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        data = read_yaml_mapping(path)
    data.pop("resolved", None)  # a saved run config: what that run resolved is not a request
    train = data["train"] if isinstance(data.get("train"), dict) else {}
    for key, env in _MOVED_TO_ENV.items():
        asked = train.pop(key, None)  # an empty value (a config saved by an older version) asked for nothing
        if asked or any(o.split("=")[0] == f"--train.{key}" for o in overrides or []):
            raise ConfigError(f"{source}: train.{key} is not a config setting any more: tests set {env}")
    ov = {rename_weave_override(k): v for k, v in parse_overrides(overrides or []).items()}
    model_raw = dict(data.get("model") or {})
    if "model.preset" in ov:
        model_raw = {"preset": ov.pop("model.preset")}
    data["model"] = _resolve_model(model_raw, source)
    if "data" in data:
        data["data"] = normalize_data_section(data["data"], source)
    data = apply_overrides(data, TrainConfig, ov)
    cfg = from_dict(TrainConfig, data, source)
    try:
        cfg.data.validate()
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    return cfg


def validate_layout(cfg: TrainConfig, world_size: int, model: ModelConfig | None = None) -> int:
    """Check TP/PP/VP/batch against the model (default ``cfg.model``; the trainer passes the model it builds)
    and the world size; return the data-parallel size."""
    p, m = cfg.parallel, model or cfg.model
    mp = p.tp * p.pp
    if p.tp < 1 or p.pp < 1:
        raise ConfigError(f"parallel.tp and parallel.pp must be >= 1 (got tp={p.tp}, pp={p.pp})")
    if world_size % mp:
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tp x parallel.pp = {mp}")
    dp = world_size // mp
    if m.num_attention_heads % p.tp:
        raise ConfigError(f"model.num_attention_heads {m.num_attention_heads} is not divisible by parallel.tp {p.tp}")
    groups = m.num_query_groups or m.num_attention_heads
    if groups % p.tp:
        raise ConfigError(f"model.num_query_groups {groups} is not divisible by parallel.tp {p.tp}")
    if m.ffn_hidden_size % p.tp:
        raise ConfigError(f"model.ffn_hidden_size {m.ffn_hidden_size} is not divisible by parallel.tp {p.tp}")
    if m.vocab_size % (128 * p.tp) and m.vocab_size % p.tp:
        raise ConfigError(f"model.vocab_size {m.vocab_size} is not divisible by parallel.tp {p.tp}")
    stages = p.pp * (p.vp or 1)
    if m.num_layers % stages:
        raise ConfigError(f"model.num_layers {m.num_layers} is not divisible by pp x vp = {stages}")
    if p.vp is not None and p.pp < 2:
        raise ConfigError("parallel.vp (virtual pipeline stages) needs parallel.pp >= 2")
    if p.global_batch_size % (p.micro_batch_size * dp):
        raise ConfigError(
            f"parallel.global_batch_size {p.global_batch_size} is not divisible by "
            f"micro_batch_size x data-parallel size = {p.micro_batch_size} x {dp}"
        )
    if cfg.data.seq_length > m.seq_length:
        raise ConfigError(f"data.seq_length {cfg.data.seq_length} exceeds model.seq_length {m.seq_length}")
    if cfg.data.document_mask and not cfg.data.train_sources():
        raise ConfigError("data.document_mask needs data.path or data.sources: the mock dataset has no documents")
    for key in ("reset_position_ids", "reset_attention_mask", "create_attention_mask"):
        if getattr(cfg.data, key):
            # megatron's RoPE follows the row position outside THD batches and the trainer passes no mask
            raise ConfigError(f"data.{key}: the trainer cannot use it (no attention mask reaches the model, RoPE "
                              "ignores position ids); data.document_mask: true masks and restarts at documents")
    if cfg.optim.warmup >= cfg.train.steps:
        # megatron's scheduler asserts warmup < decay steps; say which config keys to change instead
        raise ConfigError(f"optim.warmup {cfg.optim.warmup} must be smaller than train.steps {cfg.train.steps}")
    return dp
