"""megatron's scale features, wired as Megatron-LM's training loop wires them (megatron/training/training.py,
arguments.py): the distributed optimizer, overlapped gradient reduce and parameter gather, sequence
parallelism, gradient-accumulation fusion, and the checks that refuse a combination megatron cannot run.

* ``validate_scale``: the run config's scale settings against the layout (clear errors naming the keys).
* ``ddp_config``: megatron's ``DistributedDataParallelConfig`` (fp32 gradient reduction; megatron-LM's
  bucket size rule: ``max(40M, 1M x DP)`` parameters with ``overlap_grad_reduce``, one bucket without).
* ``transformer_overrides``: TransformerConfig fields the run decides (``sequence_parallel``,
  ``gradient_accumulation_fusion`` where its kernel exists, megatron's ``deterministic_mode``, and
  ``calculate_per_token_loss``: the loss is normalised by the loss-mask tokens of the whole global batch).
* ``wire_schedule``: the model-config hooks megatron-LM's ``train()`` sets before the schedule runs
  (``finalize_model_grads``, the loss scale, and with overlap the ``no_sync`` / ``start_grad_sync`` /
  ``start_param_sync`` functions the pipeline schedules call).
* ``finalize_model_grads``: megatron's, with the per-token division done on the device (megatron's own
  tests ``num_tokens > 0`` on the host, a second host sync in every step).
* ``ParamGather``: with the distributed optimizer and ``overlap_param_gather`` the updated parameters are
  all-gathered lazily by forward pre-hooks during the next forward. As megatron-LM does, the hooks are off
  for the first step (a broken load or init fails on its own rank instead of spreading through the first
  all-gather), and are switched off, with a synchronous gather, around checkpoint saves and evaluation,
  whose forward or state dict must see the updated parameters.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch

from tessera.config import ConfigError
from tessera.pretrain.config import TrainConfig


def validate_scale(cfg: TrainConfig, world_size: int) -> None:
    """Raise ``ConfigError`` naming the keys when the scale settings do not fit together or the layout."""
    p = cfg.parallel
    if p.context_parallel != 1:
        raise ConfigError(f"parallel.context_parallel {p.context_parallel}: only 1 is supported (megatron's local "
                          "DotProductAttention and Tessera's SDPA attention have no context parallelism)")
    if p.sequence_parallel and p.tp < 2:
        raise ConfigError("parallel.sequence_parallel needs tensor parallelism: set parallel.tp > 1 "
                          f"(got tp={p.tp})")
    if p.sequence_parallel and cfg.data.seq_length % p.tp:
        raise ConfigError(f"parallel.sequence_parallel: data.seq_length {cfg.data.seq_length} is not divisible "
                          f"by parallel.tp {p.tp}")
    if p.overlap_param_gather and not p.distributed_optimizer:
        raise ConfigError("parallel.overlap_param_gather needs parallel.distributed_optimizer: true (the parameter "
                          "all-gather it overlaps is the distributed optimizer's)")
    if p.overlap_param_gather and not p.overlap_grad_reduce:
        raise ConfigError("parallel.overlap_param_gather needs parallel.overlap_grad_reduce: true (as megatron-LM)")
    if p.ddp_bucket_size is not None and p.ddp_bucket_size < 1:
        raise ConfigError(f"parallel.ddp_bucket_size must be >= 1 parameters, got {p.ddp_bucket_size}")


def gradient_accumulation_fusion_available() -> bool:
    """megatron's fused weight-gradient accumulation needs CUDA and apex's ``fused_weight_gradient_mlp_cuda``
    (megatron's local output layer uses it even when the layers are Transformer Engine's); off elsewhere."""
    if not torch.cuda.is_available():
        return False
    from megatron.core.tensor_parallel import layers

    return bool(getattr(layers, "_grad_accum_fusion_available", False))


def transformer_overrides(cfg: TrainConfig, deterministic: bool, cuda: bool) -> dict[str, Any]:
    """TransformerConfig fields the run decides (passed to ``build_model``)."""
    return {"sequence_parallel": cfg.parallel.sequence_parallel,
            "gradient_accumulation_fusion": gradient_accumulation_fusion_available(),
            "deterministic_mode": deterministic and cuda,
            # megatron's per-token loss: every loss-mask token of the global batch weighs the same, however
            # the tokens fall across micro-batches and data-parallel replicas (fine-tuning masks make the
            # counts differ); the trainer's ForwardStep returns (sum, count) to match
            "calculate_per_token_loss": True}


def ddp_config(cfg: TrainConfig, dp: int):
    """megatron's DistributedDataParallelConfig for the run (gradients reduced in fp32; megatron's NaN check
    of the gradients stays off: it raises, the trainer skips and counts a non-finite step instead)."""
    from megatron.core.distributed import DistributedDataParallelConfig

    p = cfg.parallel
    bucket = p.ddp_bucket_size if p.ddp_bucket_size is not None else max(40_000_000, 1_000_000 * dp)
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=p.distributed_optimizer,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        # megatron-LM aligns the param all-gathers across pipeline stages only under the interleaved schedule
        align_param_gather=p.overlap_param_gather and p.vp is not None,
        bucket_size=bucket if p.overlap_grad_reduce else None,  # None: one bucket (no overlap to gain)
    )


def finalize_model_grads(model: list, num_tokens: torch.Tensor | None = None, **kwargs) -> None:
    """megatron's ``finalize_model_grads`` (data-parallel reduction, sequence-parallel norms, embeddings),
    then, with ``calculate_per_token_loss``, the division of every gradient by the global batch's loss-mask
    token count: broadcast from the last pipeline stage, summed over data-parallel ranks and applied as a
    device tensor (clamped at 1: a batch without targets has zero gradients anyway). megatron's version
    branches on ``num_tokens > 0``, which reads the count to the host."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads as megatron_finalize

    megatron_finalize(model, None, **kwargs)
    if num_tokens is None:
        return
    pp_group = ps.get_pipeline_model_parallel_group()
    last = ps.get_pipeline_model_parallel_last_rank()
    torch.distributed.broadcast(num_tokens, src=last, group=pp_group)
    torch.distributed.all_reduce(num_tokens, group=ps.get_data_parallel_group(with_context_parallel=True))
    scale = 1.0 / num_tokens.clamp(min=1).to(torch.float32)
    for chunk in model:
        chunk.scale_gradients(scale)


def wire_schedule(chunks: list, ddps: list, opt, cfg: TrainConfig | None = None) -> None:
    """What megatron-LM's ``train()`` sets on the model config before the schedule runs."""
    p = cfg.parallel if cfg is not None else None

    def per_chunk(fns: list):
        return fns[0] if len(fns) == 1 else fns

    for c in chunks:
        # without finalize_model_grads the DDP buffers are never reduced across data-parallel replicas
        c.config.finalize_model_grads_func = finalize_model_grads
        c.config.grad_scale_func = opt.scale_loss
        if p is not None and p.overlap_grad_reduce:
            c.config.no_sync_func = per_chunk([d.no_sync for d in ddps])
            c.config.grad_sync_func = per_chunk([d.start_grad_sync for d in ddps])  # megatron-LM's align_grad_reduce
        if p is not None and p.overlap_param_gather and p.vp is not None:  # align_param_gather
            c.config.param_sync_func = per_chunk([d.start_param_sync for d in ddps])


class ParamGather:
    """The forward pre-hooks of the overlapped parameter all-gather (distributed optimizer +
    ``overlap_param_gather``), switched as megatron-LM switches them; a no-op otherwise."""

    def __init__(self, cfg: TrainConfig, chunks: list, ddps: list) -> None:
        self.active = cfg.parallel.distributed_optimizer and cfg.parallel.overlap_param_gather
        self.chunks, self.ddps = chunks, ddps
        self.enabled = self.active
        self._param_sync_funcs = [c.config.param_sync_func for c in chunks]

    def start(self) -> None:
        """Before the first step: hooks off, no param_sync_func, no gather (the parameters are in place)."""
        if self.active:
            for d in self.ddps:
                d.disable_forward_pre_hook(param_sync=False)
            for c in self.chunks:
                c.config.param_sync_func = None
            self.enabled = False

    def after_step(self, updated: bool) -> None:
        """After a step that updated the parameters, the next forward gathers them through the hooks."""
        if self.active and updated and not self.enabled:
            for d in self.ddps:
                d.enable_forward_pre_hook()
            for c, f in zip(self.chunks, self._param_sync_funcs, strict=True):
                c.config.param_sync_func = f
            self.enabled = True

    @contextmanager
    def synced(self):
        """Around a checkpoint save or an evaluation: the updated parameters gathered now (synchronously) and
        the hooks off; back on afterwards."""
        if not (self.active and self.enabled):
            yield
            return
        for d in self.ddps:
            d.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            for d in self.ddps:
                d.enable_forward_pre_hook()

    def close(self) -> None:
        if self.active and self.enabled:
            for d in self.ddps:
                d.disable_forward_pre_hook(param_sync=True)
            self.enabled = False
