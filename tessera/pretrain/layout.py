"""The run's layout: how one training job is split over its GPUs and what each GPU keeps.

``ParallelLayout`` is the one object ``tessera train`` and ``tessera bench plan`` / ``tessera bench memory``
read the same settings from: the parallel degrees (TP x PP (x VP) x CP x DP), the batch (micro-batch,
global batch, sequence length) and the memory settings (distributed optimizer, sequence parallelism,
activation recomputation, precision). The trainer builds it from its run config and world size
(``from_train_config``, which runs the trainer's own checks); the plan builds it from the same config, or
from command-line flags for a preset (``for_gpus``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tessera.config import ConfigError

PRECISIONS = ("fp32", "bf16")
RECOMPUTE_MODES = ("none", "selective", "full")


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    vp: int | None = None  # virtual pipeline stages per rank (interleaved 1F1B); None = off
    cp: int = 1  # context parallelism (the trainer supports only 1)
    micro_batch: int = 1
    global_batch: int | None = None  # sequences per step; None: micro_batch x dp x pp (fills the pipeline)
    seq_length: int | None = None  # None: the model's
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    recompute: str = "none"  # none | selective | full (megatron's granularities)
    recompute_method: str = "uniform"  # full only: uniform | block
    recompute_num_layers: int | None = None  # full only; None: megatron-LM's default for the method
    precision: str = "bf16"  # fp32 | bf16: parameter and activation dtype (gradients and optimizer: fp32)

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp", "cp", "micro_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"layout: {name} must be >= 1, got {getattr(self, name)}")
        if self.vp is not None and self.vp < 1:
            raise ConfigError(f"layout: vp must be >= 1, got {self.vp}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"layout: precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.recompute not in RECOMPUTE_MODES:
            raise ConfigError(f"layout: recompute must be one of {RECOMPUTE_MODES}, got {self.recompute!r}")

    # ---- derived --------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def virtual_stages(self) -> int:
        return self.vp or 1

    @property
    def resolved_global_batch(self) -> int:
        return self.global_batch or self.micro_batch * self.dp * self.pp

    @property
    def microbatches(self) -> int:
        """Micro-batches each data-parallel replica runs per step."""
        return self.resolved_global_batch // (self.micro_batch * self.dp)

    @property
    def param_bytes(self) -> int:
        """Bytes of one model parameter (and one activation element)."""
        return 2 if self.precision == "bf16" else 4

    def seq(self, model: Any) -> int:
        return self.seq_length or model.seq_length

    def layers_per_stage(self, model: Any) -> int:
        return model.num_layers // (self.pp * self.virtual_stages)

    def recompute_group(self, model: Any) -> int:
        """Full recomputation: layers per checkpointed group (uniform) or checkpointed layers per stage
        (block), megatron-LM's defaults when ``recompute_num_layers`` is unset (tessera.model.chameleon)."""
        if self.recompute_num_layers is not None:
            return self.recompute_num_layers
        return 1 if self.recompute_method == "uniform" else self.layers_per_stage(model)

    def validate(self, model: Any) -> None:
        """Raise ``ConfigError`` when ``model`` (a ``ModelConfig`` or anything with its shape fields) cannot
        run under this layout."""
        heads = model.num_attention_heads
        groups = getattr(model, "num_query_groups", None) or heads
        if heads % self.tp or groups % self.tp:
            raise ConfigError(f"heads {heads} / query groups {groups} are not divisible by tp={self.tp}")
        if model.ffn_hidden_size % self.tp:
            raise ConfigError(f"ffn_hidden_size {model.ffn_hidden_size} is not divisible by tp={self.tp}")
        stages = self.pp * self.virtual_stages
        if model.num_layers % stages:
            raise ConfigError(f"num_layers {model.num_layers} is not divisible by pp*vp = {stages}")
        if self.vp is not None and self.vp > 1 and self.pp == 1:
            raise ConfigError("virtual pipeline stages need pp > 1")
        if self.sequence_parallel and self.tp < 2:
            raise ConfigError(f"sequence parallelism needs tp > 1 (got tp={self.tp})")
        if self.sequence_parallel and self.seq(model) % self.tp:
            raise ConfigError(f"sequence parallelism: seq_length {self.seq(model)} is not divisible by tp={self.tp}")
        gb = self.resolved_global_batch
        if gb % (self.micro_batch * self.dp):
            raise ConfigError(f"global batch {gb} is not divisible by micro_batch*dp = {self.micro_batch * self.dp}")
        if self.recompute == "full":
            n, per_stage = self.recompute_group(model), self.layers_per_stage(model)
            if n > per_stage or (self.recompute_method == "uniform" and per_stage % n):
                raise ConfigError(f"recompute_num_layers {n} does not fit the {per_stage} layers of a pipeline stage "
                                  f"(recompute_method {self.recompute_method})")

    # ---- constructors ---------------------------------------------------------------------------
    @staticmethod
    def for_gpus(gpus: int, tp: int = 1, pp: int = 1, cp: int = 1, **fields: Any) -> ParallelLayout:
        """The layout of a job on ``gpus`` GPUs: DP = gpus / (tp x pp x cp)."""
        mp = tp * pp * cp
        if gpus < 1 or gpus % mp:
            raise ConfigError(f"--gpus {gpus} is not divisible by tp*pp = {mp}")
        return ParallelLayout(tp=tp, pp=pp, cp=cp, dp=gpus // mp, **fields)

    @staticmethod
    def from_train_config(cfg: Any, world_size: int, model: Any = None, precision: str | None = None) -> ParallelLayout:
        """The layout a ``TrainConfig`` runs under on ``world_size`` processes, after the trainer's own checks
        (``validate_layout``, ``validate_scale``: one-line errors naming the config keys). ``model``: the
        model the run builds (default ``cfg.model``); ``precision``: the resolved one (fp32 | bf16; default:
        the config's, with ``auto`` meaning a GPU run, bf16)."""
        from tessera.pretrain.config import validate_layout
        from tessera.pretrain.scale import validate_scale

        m = model or cfg.model
        dp = validate_layout(cfg, world_size, m)
        validate_scale(cfg, world_size)
        p = cfg.parallel
        if precision is None:
            precision = "bf16" if cfg.precision == "auto" else cfg.precision
        layout = ParallelLayout(
            tp=p.tp, pp=p.pp, dp=dp, vp=p.vp, cp=p.context_parallel, micro_batch=p.micro_batch_size,
            global_batch=p.global_batch_size, seq_length=cfg.data.seq_length,
            sequence_parallel=p.sequence_parallel, distributed_optimizer=p.distributed_optimizer,
            recompute=m.recompute, recompute_method=m.recompute_method,
            recompute_num_layers=m.recompute_num_layers, precision=precision)
        layout.validate(m)
        return layout
