"""Freezing parameter groups for fine-tuning (``finetune.freeze``).

A frozen parameter gets ``requires_grad=False`` before megatron's DDP and optimizer are built, so it has
no gradient buffer and no optimizer state (both skip parameters that do not require grad). The groups:

    embedding      embedding.word_embeddings.weight
    output_layer   output_layer.weight
    norms          every norm weight / bias (pre-norms, QK-norms, Swin norms, the final norm; Transformer
                   Engine's fused ``layer_norm_weight``)
    layers:N       every parameter of decoder layers 0..N-1 (global layer numbers, any PP layout)
    image_rows     the image-code rows of the embedding and of the output layer: the tensors stay trainable,
                   their gradient on those rows is zeroed every step (``RowGradMask``), so the rows never
                   move (Adam's moments for them stay zero; weight decay is switched off for the two
                   tensors, which would otherwise shrink the frozen rows)

``image_rows`` keeps what a model knows about drawing while it learns text (or the reverse fine-tune with
``--loss-on image`` data leaves text rows alone only through the loss mask).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

FREEZE_GROUPS = ("embedding", "output_layer", "norms", "layers:N", "image_rows")
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"


class FreezeError(ValueError):
    pass


@dataclass(frozen=True)
class FreezeSpec:
    embedding: bool = False
    output_layer: bool = False
    norms: bool = False
    first_layers: int = 0
    image_rows: bool = False

    @classmethod
    def parse(cls, items: list[str] | tuple[str, ...], where: str = "finetune.freeze") -> FreezeSpec:
        kw: dict = {}
        for item in items:
            item = str(item).strip()
            m = re.fullmatch(r"layers:(\d+)", item)
            if m:
                kw["first_layers"] = int(m.group(1))
            elif item in ("embedding", "output_layer", "norms", "image_rows"):
                kw[item] = True
            else:
                raise FreezeError(f"{where}: unknown group {item!r}; expected any of {', '.join(FREEZE_GROUPS)}")
        return cls(**kw)

    @property
    def any(self) -> bool:
        return self.embedding or self.output_layer or self.norms or self.first_layers > 0 or self.image_rows


def is_norm_parameter(name: str) -> bool:
    """A norm's weight or bias: a module whose name says norm (``input_layernorm``, ``q_layernorm``,
    ``final_layernorm``, ``post_mlp_layernorm``) or TE's fused ``layer_norm_weight`` / ``layer_norm_bias``."""
    parts = name.split(".")
    return any("norm" in p for p in parts[:-1]) or parts[-1].startswith("layer_norm_")


def _layer_number(gname: str) -> int | None:
    m = re.match(r"decoder\.layers\.(\d+)\.", gname)
    return int(m.group(1)) if m else None


@dataclass
class RowGradMask:
    """Zero ``param``'s gradient on its local rows [lo, hi) (megatron DDP's ``main_grad`` when it has one)."""

    param: torch.nn.Parameter
    lo: int
    hi: int
    name: str = ""

    @torch.no_grad()
    def apply(self) -> None:
        grad = getattr(self.param, "main_grad", None)
        if grad is None:
            grad = self.param.grad
        if grad is not None:
            grad[self.lo:self.hi].zero_()


def vocab_rows(param: torch.nn.Parameter, rows: tuple[int, int]) -> tuple[int, int] | None:
    """Global vocabulary rows [a, b) as local rows of a vocab-parallel tensor (split on dim 0 over TP)."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size() if getattr(param, "tensor_model_parallel", False) else 1
    rank = ps.get_tensor_model_parallel_rank() if tp > 1 else 0
    n = param.shape[0]
    start = rank * n
    lo, hi = max(rows[0], start), min(rows[1], start + n)
    return (lo - start, hi - start) if lo < hi else None


def apply_freeze(model: torch.nn.Module, spec: FreezeSpec, image_rows: tuple[int, int] | None = None) -> list[RowGradMask]:
    """Freeze ``spec``'s groups in ``model`` (one GPTModel chunk); return the row masks the trainer applies
    after every backward (``image_rows``: the vocabulary's image-code ids [first, end))."""
    from tessera.model.chameleon import global_param_name

    if spec.image_rows and image_rows is None:
        raise FreezeError("finetune.freeze image_rows needs the run's vocabulary (data.path) to know which rows "
                          "are image codes")
    masks = []
    for name, p in model.named_parameters():
        gname = global_param_name(model, name)
        layer = _layer_number(gname)
        frozen = ((spec.embedding and gname == EMBEDDING) or (spec.output_layer and gname == OUTPUT)
                  or (spec.norms and is_norm_parameter(gname))
                  or (layer is not None and layer < spec.first_layers))
        if frozen:
            p.requires_grad_(False)
        elif spec.image_rows and gname in (EMBEDDING, OUTPUT) and p.requires_grad:
            local = vocab_rows(p, image_rows)
            if local is not None:
                masks.append(RowGradMask(p, *local, name=gname))
            p.tessera_no_weight_decay = True  # decoupled decay would move the frozen rows
    return masks


__all__ = ["FREEZE_GROUPS", "FreezeError", "FreezeSpec", "RowGradMask", "apply_freeze", "is_norm_parameter",
           "vocab_rows"]
