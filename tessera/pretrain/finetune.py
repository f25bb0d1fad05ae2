"""The ``finetune:`` section in the trainer: frozen parameter groups or LoRA adapters on the model chunks,
applied after the model is built and before megatron's DDP and optimizer are (so frozen and base
parameters get neither gradient buffers nor optimizer state), and the per-step gradient row masks.

LoRA needs ``train.init_from``: the base checkpoint. Rank 0 takes its ``BaseReference`` (path, SHA-256 of
its files, step) at start and every rank gets it; adapter checkpoints record it, and a resume refuses a
base whose files changed (tessera.pretrain.checkpointing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tessera.config import ConfigError
from tessera.model.freeze import FreezeError, FreezeSpec, RowGradMask, apply_freeze
from tessera.pretrain.config import TrainConfig
from tessera.utils import rank


def lora_spec(cfg: TrainConfig):
    """The run's ``LoRASpec`` (None when ``finetune.lora.rank`` is 0); ConfigError for bad settings."""
    from tessera.model.lora import LoRAError, LoRASpec

    lo = cfg.finetune.lora
    if lo.rank == 0:
        return None
    try:
        return LoRASpec(lo.rank, lo.alpha, lo.dropout, tuple(lo.targets))
    except LoRAError as exc:
        raise ConfigError(f"finetune.lora: {exc}") from exc


def validate_finetune(cfg: TrainConfig) -> None:
    """Refuse finetune settings that cannot work, naming the keys."""
    ft = cfg.finetune
    if ft.lora.rank < 0:
        raise ConfigError(f"finetune.lora.rank must be >= 0 (0 = no LoRA), got {ft.lora.rank}")
    try:
        freeze = FreezeSpec.parse(ft.freeze)
    except FreezeError as exc:
        raise ConfigError(str(exc)) from exc
    spec = lora_spec(cfg)
    if spec is not None and not cfg.train.init_from:
        raise ConfigError("finetune.lora needs train.init_from: the base checkpoint the adapters adapt")
    if spec is not None and freeze.any:
        raise ConfigError("finetune.freeze with finetune.lora: LoRA already freezes every base parameter; "
                          "choose one")
    if freeze.first_layers > cfg.model.num_layers:
        raise ConfigError(f"finetune.freeze layers:{freeze.first_layers}: the model has {cfg.model.num_layers} "
                          "layers")


@dataclass
class Finetune:
    """What the trainer does for the ``finetune:`` section (nothing for a plain run)."""

    lora: Any = None  # LoRASpec | None
    freeze: FreezeSpec = field(default_factory=FreezeSpec)
    base: Any = None  # BaseReference of train.init_from (LoRA runs)
    masks: list[RowGradMask] = field(default_factory=list)

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Finetune:
        validate_finetune(cfg)
        return cls(lora=lora_spec(cfg), freeze=FreezeSpec.parse(cfg.finetune.freeze))

    @property
    def active(self) -> bool:
        return self.lora is not None or self.freeze.any

    def prepare(self, chunks: list, vocab: Any, seed: int, device: torch.device | str = "cpu") -> None:
        """Collective: apply LoRA / freezing to this rank's chunks (before DDP) and check that every rank has
        something to train."""
        from tessera.model.lora import apply_lora

        if not self.active:
            return
        rows = (vocab.image_offset, vocab.image_offset + vocab.num_image_codes) if vocab is not None else None
        for c in chunks:
            if self.lora is not None:
                apply_lora(c, self.lora, seed)
            else:
                try:
                    self.masks += apply_freeze(c, self.freeze, rows)
                except FreezeError as exc:
                    raise ConfigError(str(exc)) from exc
        trainable = sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
        flag = torch.tensor([1.0 if trainable == 0 else 0.0], device=device)
        torch.distributed.all_reduce(flag)  # start-up, not a training step: a host read here is fine
        if flag.item() > 0:
            raise ConfigError("finetune: some pipeline stage has no trainable parameter left (every parameter of "
                              "its layers frozen, or no LoRA target on it); freeze less or add LoRA targets")

    def resolve_base(self, init_from: str) -> None:
        """Collective, LoRA runs: the base reference of ``train.init_from`` (rank 0 hashes it, all get it)."""
        if self.lora is not None:
            self.base = _broadcast_base(init_from)

    def mask_gradients(self) -> None:
        """After the backward (and megatron's gradient reduction): zero the frozen rows' gradients."""
        for m in self.masks:
            m.apply()

    def describe(self, chunks: list, device: torch.device | str = "cpu") -> str:
        """Collective: one line for the log, what is trained and how many parameters (exact, whole model)."""
        trainable, total = count_parameters(chunks, device)
        what = (f"LoRA rank {self.lora.rank} alpha {self.lora.alpha:g} on {', '.join(self.lora.targets)}"
                if self.lora is not None else f"freeze {_freeze_text(self.freeze)}")
        return (f"fine-tuning: {what}; trainable parameters {trainable:,} of {total:,} "
                f"({100.0 * trainable / max(total, 1):.3g}%)")


def _freeze_text(f: FreezeSpec) -> str:
    parts = [n for n in ("embedding", "output_layer", "norms", "image_rows") if getattr(f, n)]
    if f.first_layers:
        parts.append(f"layers:{f.first_layers}")
    return ", ".join(parts)


def count_parameters(chunks: list, device: torch.device | str = "cpu") -> tuple[int, int]:
    """Collective: (trainable, total) parameters of the whole model across TP x PP (each tensor counted once:
    data-parallel rank 0 only, and TP-replicated tensors only on TP rank 0)."""
    from megatron.core import parallel_state as ps

    trainable = total = 0
    if ps.get_data_parallel_rank() == 0:
        tp0 = ps.get_tensor_model_parallel_rank() == 0
        for c in chunks:
            for p in c.parameters():
                if getattr(p, "tensor_model_parallel", False) or tp0:
                    total += p.numel()
                    trainable += p.numel() if p.requires_grad else 0
    t = torch.tensor([float(trainable), float(total)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return int(t[0].item()), int(t[1].item())


def _broadcast_base(init_from: str):
    """Rank 0 hashes the base checkpoint; every rank gets the same reference."""
    from tessera.model.checkpoint import BaseReference, CheckpointError

    box: list = [None]
    if rank() == 0:
        try:
            box[0] = BaseReference.of(init_from)
        except CheckpointError as exc:  # every rank raises it, none waits for a broadcast that never comes
            box[0] = str(exc)
    torch.distributed.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        raise CheckpointError(f"train.init_from: {box[0]}")
    return box[0]
