"""One training step's device side: batches moved once to the model's device, megatron's forward-step function.

Batches are built on the host (the woven iterator, the mock dataset). ``BatchMover`` copies each
micro-batch to the device ONCE, before megatron's schedule runs (every virtual-pipeline chunk then
reads the same device tensors): pinned memory and ``non_blocking`` copies when the device is CUDA, so
the copies overlap compute and never wait for the GPU. Only what this rank's pipeline stages read is
moved (first stage: tokens, positions; last stage: labels, loss mask and each label's modality, looked
up on the device from a device copy of the vocabulary's modality table), as megatron-LM's ``get_batch``.

``ForwardStep`` is the ``forward_step_func`` megatron's schedules call: model forward, then the
language-model loss on this micro-batch (fused cross-entropy + z-loss, per-modality sums, and on
monitor steps the output-logit norm), every value on the device. Under bf16 the logits stay bf16 into
the loss (megatron's ``Float16Module(..., fp32_output=False)``: no fp32 copy of [b, s, V/TP]; the fused
cross-entropy computes in fp32 internally) and the loss's backward writes the logits' gradient over the
logits (``inplace_backward``): nothing reads them after the loss function, which is where the
logit-norm monitor reads them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import partial
from typing import Any

import torch

from tessera.model.loss import language_model_loss
from tessera.pretrain.device import to_device
from tessera.pretrain.metrics import step_stats

Batch = dict[str, torch.Tensor]

# what megatron's first / last pipeline stage reads from a batch (middle stages read nothing)
INPUT_KEYS = ("tokens", "position_ids")
LABEL_KEYS = ("labels", "loss_mask")


class BatchMover:
    """``mover(host_batch) -> device_batch`` with the keys this rank's stages read.

    ``inputs`` / ``labels``: whether this rank holds a first / last pipeline stage (any virtual chunk).
    ``modality``: the vocabulary's id -> Modality table (host), copied to the device once; the device
    batch then carries ``label_modality`` (None: no per-modality losses, e.g. the mock dataset)."""

    def __init__(self, device: torch.device | str, inputs: bool = True, labels: bool = True,
                 modality: torch.Tensor | None = None) -> None:
        self.device = torch.device(device)
        self.keys = (INPUT_KEYS if inputs else ()) + (LABEL_KEYS if labels else ())
        self.modality = to_device(modality, self.device) if modality is not None and labels else None

    def __call__(self, batch: Batch) -> Batch:
        out = {k: to_device(batch[k], self.device) for k in self.keys}
        if self.modality is not None:
            out["label_modality"] = self.modality[out["labels"]]
        return out

    def all(self, batches: Iterable[Batch]) -> list[Batch]:
        return [self(b) for b in batches]


def stage_roles(chunks: list[Any]) -> tuple[bool, bool]:
    """(holds a first stage, holds a last stage) over this rank's model chunks (GPTModel ``pre_process`` /
    ``post_process``)."""
    return any(c.pre_process for c in chunks), any(c.post_process for c in chunks)


def model_kwargs(bf16: bool) -> dict:
    """Keywords for the model call: under bf16, megatron's ``Float16Module`` returns the last stage's logits in
    bf16 instead of an fp32 copy (``fp32_output``)."""
    return {"fp32_output": False} if bf16 else {}


class ForwardStep:
    """megatron's ``forward_step_func(data_iterator, model) -> (output, loss_func)`` for training.

    ``model_kwargs``: extra keywords for the model call (``model_kwargs(bf16)``).
    ``monitor``: add the output-logit norm to the stats (a TP collective on the last stage).
    ``loss_scale``: multiplies the loss (tests inject a NaN through it; 1.0 otherwise).
    ``inplace_backward``: the loss's backward overwrites the logits with their gradient."""

    def __init__(self, *, z_loss_weight: float, image_loss_weight: float = 1.0, monitor: bool = False,
                 loss_scale: float = 1.0, model_kwargs: dict | None = None, inplace_backward: bool = True) -> None:
        self.z_loss_weight = z_loss_weight
        self.image_loss_weight = image_loss_weight
        self.monitor = monitor
        self.loss_scale = loss_scale
        self.model_kwargs = model_kwargs or {}
        self.inplace_backward = inplace_backward

    def __call__(self, data_iterator: Iterator[Batch], model: torch.nn.Module):
        b = next(data_iterator)
        out = model(b.get("tokens"), b.get("position_ids"), None, **self.model_kwargs)
        return out, partial(self.loss, b)

    def loss(self, b: Batch, logits: torch.Tensor):
        lo = language_model_loss(logits, b["labels"], b["loss_mask"], self.z_loss_weight,
                                 label_modality=b.get("label_modality"), image_loss_weight=self.image_loss_weight,
                                 inplace_backward=self.inplace_backward)
        total = lo.total if self.loss_scale == 1.0 else lo.total * self.loss_scale
        # clone: the schedule divides the returned loss by num_microbatches in place
        stats = {"loss": total.detach().clone(),
                 **step_stats(lo, logits if self.monitor else None, b["loss_mask"])}
        return total, stats
