"""One training step's device side: batches moved once to the model's device, megatron's forward-step function.

Batches are built on the host (the blended iterator, the mock dataset). ``BatchMover`` copies each
micro-batch to the device ONCE, before megatron's schedule runs (every virtual-pipeline chunk then
reads the same device tensors): pinned memory and ``non_blocking`` copies when the device is CUDA, so
the copies overlap compute and never wait for the GPU. Only what this rank's pipeline stages read is
moved (first stage: tokens, positions; last stage: labels, loss mask and each label's modality, looked
up on the device from a device copy of the vocabulary's modality table, and with a blend of several sources
each row's source), as megatron-LM's ``get_batch``. Document-masked batches (``data.document_mask``) carry
their boundaries as megatron's THD ``PackedSeqParams``, built on the host before the step
(``attach_packed_seq_params``: the host copy of ``cu_seqlens`` is what the local attention slices with, so no
stage reads the device for it); every stage gets them, ``cu_seqlens`` copied to the device like the rest.

``ForwardStep`` is the ``forward_step_func`` megatron's schedules call: model forward
(``tessera.model.document_mask.forward``: the plain call, or one THD row per document-masked micro-batch),
then the language-model loss on this micro-batch (fused cross-entropy + z-loss, per-modality sums, per-source
sums for a blend, and on monitor steps the output-logit norm), every value on the device. Under bf16 the logits stay bf16 into
the loss (megatron's ``Float16Module(..., fp32_output=False)``: no fp32 copy of [b, s, V/TP]; the fused
cross-entropy computes in fp32 internally) and the loss's backward writes the logits' gradient over the
logits (``inplace_backward``): nothing reads them after the loss function, which is where the
logit-norm monitor reads them.

``reduce_step`` ends the step's device work: statistics, gradient norm and the stop flag go through one
all-reduce and ONE read to the host (tessera.pretrain.optimizer then clips and steps with that norm).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from tessera.model import document_mask
from tessera.model.loss import language_model_loss
from tessera.pretrain.device import to_device
from tessera.pretrain.metrics import STEP_SUM_KEYS, source_sums, step_means, step_stats, step_sums

Batch = dict[str, torch.Tensor]

# what megatron's first / last pipeline stage reads from a batch (middle stages read nothing)
INPUT_KEYS = ("tokens", "position_ids")
LABEL_KEYS = ("labels", "loss_mask")


def attach_packed_seq_params(batch: Batch) -> Batch:
    """Host side, before the step's device region: a document-masked batch gets its boundaries as megatron's
    THD ``PackedSeqParams`` with their host copy (reading ``cu_seqlens`` / ``max_seqlen`` here, where they are
    host tensors); other batches are returned as they are."""
    if "cu_seqlens" in batch and "packed_seq_params" not in batch:
        batch["packed_seq_params"] = document_mask.packed_seq_params(batch["cu_seqlens"], batch["max_seqlen"])
    return batch


def schedule_shape(seq_length: int, micro_batch: int, packed: bool) -> dict[str, int]:
    """The activation shape megatron's pipeline schedules exchange, as their keywords: [s, b, h] per micro-batch,
    or for document-masked batches the one THD row ``[b * s, 1, h]`` (``tessera.model.document_mask``)."""
    if packed:
        return {"seq_length": seq_length * micro_batch, "micro_batch_size": 1}
    return {"seq_length": seq_length, "micro_batch_size": micro_batch}


class BatchMover:
    """``mover(host_batch) -> device_batch`` with the keys this rank's stages read.

    ``inputs`` / ``labels``: whether this rank holds a first / last pipeline stage (any virtual chunk).
    ``modality``: the vocabulary's id -> Modality table (host), copied to the device once; the device
    batch then carries ``label_modality`` (None: no per-modality losses, e.g. the mock dataset).
    ``sources``: the last stage also gets each row's ``source`` (per-source statistics of a blend).
    Document-masked batches: every stage gets ``packed_seq_params`` (``cu_seqlens`` on the device, the host
    copy kept; built here when ``attach_packed_seq_params`` has not run)."""

    def __init__(self, device: torch.device | str, inputs: bool = True, labels: bool = True,
                 modality: torch.Tensor | None = None, sources: bool = False) -> None:
        self.device = torch.device(device)
        self.keys = (INPUT_KEYS if inputs else ()) + (LABEL_KEYS if labels else ()) + \
            (("source",) if sources and labels else ())
        self.modality = to_device(modality, self.device) if modality is not None and labels else None

    def __call__(self, batch: Batch) -> Batch:
        out = {k: to_device(batch[k], self.device) for k in self.keys}
        if self.modality is not None:
            out["label_modality"] = self.modality[out["labels"]]
        params = attach_packed_seq_params(batch).get("packed_seq_params")
        if params is not None:
            cu = to_device(params.cu_seqlens_q, self.device)
            out["packed_seq_params"] = dataclasses.replace(params, cu_seqlens_q=cu, cu_seqlens_kv=cu)
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
    ``n_sources``: > 0 adds per-source CE and token sums (each row's ``source``; a blend of that many).
    ``loss_scale``: multiplies the loss (tests inject a NaN through it; 1.0 otherwise).
    ``inplace_backward``: the loss's backward overwrites the logits with their gradient.
    ``per_token_loss``: megatron's per-token normalisation (``calculate_per_token_loss``, which the model
    config must set too): the loss function returns (sum over the micro-batch's loss-mask tokens, their
    count, stats) as Megatron-LM's ``loss_func`` does; the schedule sums the counts of every micro-batch and
    ``finalize_model_grads`` divides the gradients by the global batch's count (over DP too). Without it,
    each micro-batch's token mean is averaged over micro-batches and replicas."""

    def __init__(self, *, z_loss_weight: float, image_loss_weight: float = 1.0, monitor: bool = False,
                 loss_scale: float = 1.0, model_kwargs: dict | None = None, inplace_backward: bool = True,
                 n_sources: int = 0, per_token_loss: bool = False) -> None:
        self.z_loss_weight = z_loss_weight
        self.n_sources = n_sources
        self.image_loss_weight = image_loss_weight
        self.monitor = monitor
        self.loss_scale = loss_scale
        self.model_kwargs = model_kwargs or {}
        self.inplace_backward = inplace_backward
        self.per_token_loss = per_token_loss

    def __call__(self, data_iterator: Iterator[Batch], model: torch.nn.Module):
        b = next(data_iterator)
        out = document_mask.forward(model, b, **self.model_kwargs)
        return out, partial(self.loss, b)

    def loss(self, b: Batch, logits: torch.Tensor):
        lo = language_model_loss(logits, b["labels"], b["loss_mask"], self.z_loss_weight,
                                 label_modality=b.get("label_modality"), image_loss_weight=self.image_loss_weight,
                                 inplace_backward=self.inplace_backward, per_row=self.n_sources > 0)
        total = lo.total if self.loss_scale == 1.0 else lo.total * self.loss_scale
        # clone: the schedule divides the returned loss by num_microbatches in place
        stats = {"loss": total.detach().clone(),
                 **step_stats(lo, logits if self.monitor else None, b["loss_mask"],
                              source=b.get("source"), n_sources=self.n_sources)}
        if self.per_token_loss:
            total_sum = lo.total_sum if self.loss_scale == 1.0 else lo.total_sum * self.loss_scale
            # an int count, as megatron's schedule accumulates it into an int tensor
            return total_sum, lo.num_tokens.to(torch.int), stats
        return total, stats


@dataclass
class StepOutcome:
    """What the step's one host read returns (every rank gets the same values)."""

    stats: dict[str, float]  # step_means: loss, z, ce, ce_<modality>, logit_norm (monitor steps)
    grad_norm: float  # global L2 norm of the main gradients (before clipping)
    stop: bool  # some rank received SIGTERM: save and stop at this boundary
    max_attn_logit: float | None = None  # monitor steps, when some rank recorded one
    source_sums: list[float] = field(default_factory=list)  # metrics.SOURCE_SUM_KEYS per source (a blend)

    @property
    def finite(self) -> bool:
        return math.isfinite(self.stats.get("loss", 0.0)) and math.isfinite(self.grad_norm)


def reduce_step(out: list[dict] | None, grad_sumsq: torch.Tensor, *, stop: bool, device: torch.device,
                attn_max: torch.Tensor | None = None, monitor: bool = False, n_sources: int = 0) -> StepOutcome:
    """Collective (every rank): the step's statistics (with ``n_sources``: also the per-source sums), squared
    gradient norm and stop flag in ONE all-reduce (SUM over the world), the attention-logit maximum in a
    second one (MAX) on monitor steps, then ONE read of both to the host: the only blocking device-to-host
    transfer of a training step."""
    sums = step_sums(out, device)
    if n_sources:
        sums = torch.cat([sums, source_sums(out, n_sources, device)])
    flags = torch.stack([grad_sumsq.to(device, torch.float64).reshape(()),
                         torch.full((), 1.0 if stop else 0.0, dtype=torch.float64, device=device)])
    packed = torch.cat([sums, flags])
    torch.distributed.all_reduce(packed)
    if monitor:
        mx = (attn_max.to(device, torch.float64).reshape(1) if attn_max is not None
              else torch.full((1,), -math.inf, dtype=torch.float64, device=device))
        torch.distributed.all_reduce(mx, op=torch.distributed.ReduceOp.MAX)
        packed = torch.cat([packed, mx])
    host = packed.tolist()  # the one host sync
    n, m = len(STEP_SUM_KEYS), sums.numel()
    per_source, host = host[n:m], host[:n] + host[m:]  # the per-source sums sit between the stats and the flags
    attn = host[n + 2] if monitor and host[n + 2] != -math.inf else None  # -inf: no rank recorded one
    return StepOutcome(stats=step_means(dict(zip(STEP_SUM_KEYS, host[:n], strict=True))),
                       grad_norm=host[n] ** 0.5, stop=host[n + 1] > 0, max_attn_logit=attn, source_sums=per_source)
