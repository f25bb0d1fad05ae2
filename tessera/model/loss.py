"""The language-model loss training calls: vocab-parallel cross-entropy + z-loss, per-modality CE.

Logits may be vocab-sharded across TP ranks (``parallel_output=True``). The per-token CE and
logsumexp come from one fused pass, ``tessera.kernels.cross_entropy_z`` (Triton on CUDA, its chunked
PyTorch reference on CPU), which all-reduces only [tokens] vectors over the TP group, so the result
is identical to TP=1 and no fp32 copy of the logits is made.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state

from tessera.kernels.cross_entropy import cross_entropy_z

MODALITY_NAMES = {0: "text", 1: "image", 2: "special"}  # tessera.tokenizers.vocab.Modality


@dataclass
class LossOutput:
    """``total`` is what backward runs on: mean CE (image tokens weighted) + z-loss, over loss_mask tokens.
    ``ce`` (unweighted mean CE) and ``z`` (weight * mean logsumexp^2) are reported separately;
    ``per_modality`` maps "text"/"image"/"special" to the mean CE of tokens whose LABEL has that modality.
    The ``*_tokens`` counts let callers average correctly across micro-batches and DP ranks;
    ``total_sum`` is ``total`` before the division by the micro-batch's token count (what megatron's
    per-token loss normalisation sums over the global batch). ``row_ce`` / ``row_tokens`` (``per_row=True``):
    per row of the batch, the summed CE of its loss-mask tokens and their count (per-source statistics of
    a blend: each row comes from one source)."""

    total: torch.Tensor
    ce: torch.Tensor
    z: torch.Tensor
    per_modality: dict[str, torch.Tensor] = field(default_factory=dict)
    num_tokens: torch.Tensor | None = None
    per_modality_tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    row_ce: torch.Tensor | None = None
    row_tokens: torch.Tensor | None = None
    total_sum: torch.Tensor | None = None


def language_model_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    z_loss_weight: float,
    label_modality: torch.Tensor | None = None,
    image_loss_weight: float = 1.0,
    *,
    backend: str = "auto",
    inplace_backward: bool = False,
    per_row: bool = False,
) -> LossOutput:
    """logits [b, s, V/TP] (this TP rank's vocab slice; fp32/bf16/fp16), labels [b, s] global ids,
    loss_mask [b, s] (1 = counts), label_modality [b, s] (``Modality`` of each label;
    ``vocab.modality_table()[labels]``). ``backend`` picks the fused kernel's implementation
    (tessera.kernels); ``inplace_backward=True`` lets its backward overwrite the logits with their
    gradient (saves a logits-sized buffer; only when nothing reads the logits after the loss); ``per_row``
    adds ``row_ce`` / ``row_tokens`` (labels [b, s] rows)."""
    if logits.shape[:-1] != labels.shape or labels.shape != loss_mask.shape:
        raise ValueError(
            f"shape mismatch: logits {tuple(logits.shape)}, labels {tuple(labels.shape)}, loss_mask {tuple(loss_mask.shape)}"
        )
    if image_loss_weight != 1.0 and label_modality is None:
        raise ValueError("image_loss_weight needs label_modality")
    tp_group = None
    if parallel_state.model_parallel_is_initialized() and parallel_state.get_tensor_model_parallel_world_size() > 1:
        tp_group = parallel_state.get_tensor_model_parallel_group()
    # every label counts for the kernel (no ignore_index): loss_mask does the masking
    fused = cross_entropy_z(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), 0.0, ignore_index=torch.iinfo(torch.int64).min,
        tp_group=tp_group, inplace_backward=inplace_backward, backend=backend,
    )
    ce_tok = fused.ce.view(labels.shape)
    mask = loss_mask.to(ce_tok.dtype)
    n = mask.sum()
    denom = n.clamp(min=1.0)
    ce_sum = (ce_tok * mask).sum()
    ce = ce_sum / denom
    if z_loss_weight:
        lse = fused.lse.view(labels.shape)
        z_sum = z_loss_weight * (lse.square() * mask).sum()
        z = z_sum / denom
    else:
        z = z_sum = torch.zeros((), dtype=ce.dtype, device=ce.device)
    weighted_ce, weighted_ce_sum = ce, ce_sum
    per_modality: dict[str, torch.Tensor] = {}
    per_tokens: dict[str, torch.Tensor] = {}
    if label_modality is not None:
        if label_modality.shape != labels.shape:
            raise ValueError(f"label_modality {tuple(label_modality.shape)} != labels {tuple(labels.shape)}")
        for code, name in MODALITY_NAMES.items():
            m = mask * (label_modality == code).to(mask.dtype)
            cnt = m.sum()
            per_tokens[name] = cnt.detach()
            per_modality[name] = ((ce_tok * m).sum() / cnt.clamp(min=1.0)).detach()
        if image_loss_weight != 1.0:
            w = torch.where(label_modality == 1, image_loss_weight, 1.0).to(mask.dtype)
            weighted_ce_sum = (ce_tok * mask * w).sum()
            weighted_ce = weighted_ce_sum / denom
    rows = {}
    if per_row:
        rows = {"row_ce": (ce_tok * mask).detach().sum(-1), "row_tokens": mask.detach().sum(-1)}
    return LossOutput(
        total=weighted_ce + z, ce=ce, z=z, per_modality=per_modality, num_tokens=n.detach(), per_modality_tokens=per_tokens,
        total_sum=weighted_ce_sum + z_sum, **rows,
    )
