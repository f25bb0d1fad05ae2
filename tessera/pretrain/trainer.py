"""megatron-core training loop, as Megatron-LM's ``pretrain`` / ``train`` wire it: model, DDP (optionally the
distributed optimizer, overlapped gradient reduce and parameter gather, sequence parallelism, activation
recomputation: tessera.pretrain.scale), megatron's optimizer and scheduler, the forward_backward
schedules, non-finite step skipping, JSONL metrics, full-state checkpoints.

Checkpoints (``tessera.pretrain.checkpointing``): model + optimizer + scheduler + data position + RNG +
step every ``train.save_interval`` steps, at the end and on SIGTERM (then exit 0); the newest
``train.keep_last_n`` are kept. On start a run resumes from ``RUN/checkpoints/latest`` (``train.resume:
auto``) exactly where it stopped, under any TP/PP/DP layout; ``train.init_from`` loads weights only.

Data (``tessera.data.config.DataConfig``): ``data.sources`` (or the one-source ``data.path``), directories
written by ``tessera data pretokenize``, are packed and blended by ``tessera.data``'s iterator with the
configured weights and schedule, so every batch is a pure function of (seed, step); with several sources
each step also reports per-source token counts and CE (folded into the step's one reduction).
``data.document_mask`` runs each micro-batch as one THD row (``tessera.model.document_mask``), attention and
RoPE restarting at every document. Without sources a deterministic random-token mock dataset is used (tests,
throughput runs; tessera.pretrain.mock).
Reporting (metrics.jsonl, TensorBoard, progress line with tokens/s and MFU), logit-drift monitors and
held-out evaluation: ``tessera.pretrain.metrics`` / ``monitors`` / ``evaluate``.

The run config is never changed: what the run decides from it, the data and the machine (the model's
vocabulary and dtype, precision, data-parallel size, ...) is a ``ResolvedRun``, saved beside it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from tessera.config import to_dict
from tessera.model.config import ModelConfig
from tessera.pretrain import faults
from tessera.pretrain.checkpointing import resume, save_checkpoint
from tessera.pretrain.config import ResolvedRun, TrainConfig
from tessera.pretrain.determinism import apply_determinism, resolve_deterministic
from tessera.pretrain.device import require_requested_gpus, training_device
from tessera.pretrain.evaluate import Evaluator
from tessera.pretrain.finetune import Finetune
from tessera.pretrain.layout import ParallelLayout
from tessera.pretrain.metrics import TrainLogger, peak_flops_per_device, source_record
from tessera.pretrain.mock import train_mock_batch
from tessera.pretrain.monitors import AttentionLogitProbe
from tessera.pretrain.optimizer import apply_update, get_optimizer, grad_sumsq
from tessera.pretrain.preemption import Preempted, StopSignal
from tessera.pretrain.scale import (
    ParamGather,
    ddp_config,
    transformer_overrides,
    wire_schedule,
)
from tessera.pretrain.step import (
    BatchMover,
    ForwardStep,
    attach_packed_seq_params,
    model_kwargs,
    reduce_step,
    schedule_shape,
    stage_roles,
)
from tessera.syncs import HostSyncCounter, NullCounter, counting_enabled
from tessera.utils import atomic_write_text, rank, world_size


def _open_data(cfg: TrainConfig, dp_rank: int, dp_size: int):
    """The blended batch iterator over the run's sources and their (one) vocabulary."""
    it = cfg.data.iterator(cfg.parallel.global_batch_size, cfg.parallel.micro_batch_size, dp_rank, dp_size)
    return it, it.vocab


def resolve_precision(precision: str, cuda: bool | None = None) -> str:
    """``precision: auto|fp32|bf16`` -> "fp32" or "bf16" (auto: bf16 with CUDA, fp32 on the CPU)."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision: expected auto, fp32 or bf16, got {precision!r}")
    if precision == "auto":
        return "bf16" if (torch.cuda.is_available() if cuda is None else cuda) else "fp32"
    return precision


def _build_model_chunks(cfg: TrainConfig, bf16: bool, model_cfg: ModelConfig | None = None, ddp_cfg=None,
                        prepare=None, **config_overrides) -> tuple[list, list]:
    """This rank's GPTModel chunks (one, or ``parallel.vp`` virtual stages) and their DDP wrappers.

    ``model_cfg``: the model to build (default ``cfg.model``); ``ddp_cfg``: megatron's DDP config (default:
    fp32 gradient reduction, nothing else); ``config_overrides``: TransformerConfig fields the run decides.
    Weights come from ``init_layout_invariant`` (seeded by ``train.seed``), so any TP x PP x VP layout
    starts from the 1-process model. bf16: megatron's Float16Module (bf16 compute; the step asks it for
    bf16 logits, tessera.pretrain.step) inside DDP, which reduces gradients in fp32. ``prepare(chunks)`` runs
    between building and wrapping (fine-tuning: LoRA / freezing, so DDP and the optimizer see only what
    trains).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    from tessera.model.chameleon import build_model

    vp = ps.get_virtual_pipeline_model_parallel_world_size()
    chunks = [build_model(model_cfg or cfg.model, vp_stage=v, init_seed=cfg.train.seed, **config_overrides)
              for v in (range(vp) if vp else [None])]
    if prepare is not None:
        prepare(chunks)
    ddp_cfg = ddp_cfg or DistributedDataParallelConfig(grad_reduce_in_fp32=True)
    ddps = [DistributedDataParallel(c.config, ddp_cfg, Float16Module(c.config, c) if bf16 else c,
                                    disable_bucketing=i > 0)  # as megatron-LM: only chunk 0 buckets
            for i, c in enumerate(chunks)]
    return chunks, ddps


def get_scheduler(cfg: TrainConfig, opt):
    """megatron's OptimizerParamScheduler, counted in samples as megatron-LM counts it."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    gbs = cfg.parallel.global_batch_size
    return OptimizerParamScheduler(
        opt, init_lr=0.0, max_lr=cfg.optim.lr, min_lr=cfg.optim.min_lr, lr_warmup_steps=cfg.optim.warmup * gbs,
        lr_decay_steps=cfg.train.steps * gbs, lr_decay_style=cfg.optim.decay_style,
        start_wd=cfg.optim.weight_decay, end_wd=cfg.optim.weight_decay, wd_incr_steps=cfg.train.steps * gbs,
        wd_incr_style="constant")


def train(cfg: TrainConfig) -> list[float]:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from tessera.model.parallel import init_distributed, initialize_parallel

    # a job that asked for GPUs (CUDA_VISIBLE_DEVICES, Slurm's GPU variables, parallel.backend nccl) and sees none
    require_requested_gpus(backend=cfg.parallel.backend)
    finetune = Finetune.from_config(cfg)  # refuses bad finetune settings before any process group exists
    cuda = torch.cuda.is_available()
    deterministic = resolve_deterministic(cfg.train.deterministic, cuda)
    apply_determinism(deterministic, cuda)  # before NCCL and cuBLAS start: they read its environment variables
    init_distributed("nccl" if cfg.parallel.backend == "nccl" else None)
    world = world_size()
    vocab = None
    sources = cfg.data.train_sources()
    if sources:
        vocab = cfg.data.vocabulary()
    bf16 = resolve_precision(cfg.precision) == "bf16"
    # the model the run builds: the embedding covers the data's vocabulary (padded, divisible by 128 x TP),
    # precision decides the parameter dtype
    model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab.padded_size if vocab else cfg.model.vocab_size,
                                    params_dtype="bfloat16" if bf16 else "float32")
    # the layout tessera bench plan / memory read from the same config (checks: validate_layout, validate_scale)
    layout = ParallelLayout.from_train_config(cfg, world, model_cfg, precision="bf16" if bf16 else "fp32")
    dp = layout.dp
    initialize_parallel(layout.tp, layout.pp, layout.vp, cfg.train.seed)
    data_it = None
    if sources:
        data_it, vocab = _open_data(cfg, ps.get_data_parallel_rank(), dp)
    # a blend of several sources reports per-source statistics (0: none)
    n_sources = len(data_it.source_names) if data_it is not None and len(data_it.source_names) > 1 else 0
    packed = cfg.data.document_mask
    # document-masked runs: TE's fused THD RoPE where it exists (megatron's unfused one reads cu_seqlens on the host)
    overrides = {**transformer_overrides(cfg, deterministic, cuda), "packed_sequences": packed}
    device = training_device()

    def prepare(cs: list) -> None:  # LoRA / freezing between building the chunks and wrapping them in DDP
        finetune.prepare(cs, vocab, cfg.train.seed, device)

    chunks, ddps = _build_model_chunks(cfg, bf16, model_cfg, ddp_config(cfg, dp), prepare=prepare, **overrides)
    model = chunks if len(chunks) > 1 else chunks[0]  # checkpoints take a GPTModel or the list of virtual chunks
    ft_line = finetune.describe(chunks, device) if finetune.active else ""
    finetune.resolve_base(cfg.train.init_from)  # LoRA: the base the adapter checkpoints refer to
    # bf16: fp32 main params + Adam state live in the optimizer, the model holds bf16 copies
    opt = get_optimizer(cfg.optim, ddps, bf16, distributed=cfg.parallel.distributed_optimizer,
                        overlap_param_gather=cfg.parallel.overlap_param_gather)
    wire_schedule(chunks, ddps, opt, cfg)
    param_gather = ParamGather(cfg, chunks, ddps)
    sched = get_scheduler(cfg, opt)
    gbs = layout.resolved_global_batch
    n_micro = layout.microbatches
    peak, peak_basis = peak_flops_per_device(cfg.train.peak_flops, "bf16" if bf16 else "fp32", device)
    resolved = ResolvedRun(model=model_cfg, precision="bf16" if bf16 else "fp32", deterministic=deterministic,
                           world_size=world, data_parallel_size=dp, device=str(device),
                           gradient_accumulation_fusion=overrides["gradient_accumulation_fusion"],
                           mfu_peak_flops=peak, mfu_peak=peak_basis,
                           rope_fusion=bool(chunks[0].config.apply_rope_fusion))
    run = Path(cfg.train.run_dir)
    is_logger = rank() == 0
    if is_logger:
        _save_run_config(run / "config.yaml", cfg, resolved)
    fb = get_forward_backward_func()
    # full-state checkpoints, auto-resume: tessera/pretrain/checkpointing.py; SIGTERM: preemption.py
    start = resume(cfg, run, model=model, optimizer=opt, scheduler=sched, model_cfg=model_cfg, data_iterator=data_it,
                   base=finetune.base)
    stop = StopSignal().install()
    # reporting (metrics.jsonl, TensorBoard, progress line), logit monitors, held-out eval: metrics/monitors/evaluate.py
    logger = TrainLogger(cfg, run, world, enabled=is_logger, first_step=start.step, model=model_cfg, peak_flops=peak)
    if is_logger:
        print(f"MFU peak per device: {peak_basis}", flush=True)
        if ft_line:
            print(ft_line, flush=True)
    probe = AttentionLogitProbe(ddps)
    modality = vocab.modality_table() if vocab is not None else None
    evaluator = Evaluator(cfg, ddps, n_micro, ps.get_data_parallel_rank(), dp, modality, device=device,
                          model_kwargs=model_kwargs(bf16), vocab=vocab)
    if is_logger and evaluator.note:
        print(evaluator.note, flush=True)
    # each micro-batch is copied to the device once; this rank's stages decide what is copied
    mover = BatchMover(device, *stage_roles(chunks), modality=modality, sources=n_sources > 0)
    shape = schedule_shape(cfg.data.seq_length, cfg.parallel.micro_batch_size, packed)
    nan_steps = faults.nan_steps()  # tests only (TESSERA_DEBUG_NAN_STEPS)
    losses, bad = [], start.bad_steps
    count_syncs = counting_enabled()
    param_gather.start()
    for step in range(start.step + 1, cfg.train.steps + 1):
        logger.start_step()
        monitor = logger.is_monitor_step(step)  # output-logit norm and max attention logit at their interval
        # host side: this step's micro-batches (data loading stays outside the device region)
        if data_it is not None:
            weights = data_it.schedule.weights_dict(data_it.step) if n_sources else None
            host = [attach_packed_seq_params(next(data_it)) for _ in range(n_micro)]
        else:
            host = [train_mock_batch(cfg, step, ps.get_data_parallel_rank() * n_micro + i) for i in range(n_micro)]
        with HostSyncCounter(device) if count_syncs else NullCounter() as syncs:
            micro = mover.all(host)
            # virtual pipeline: each chunk reads the same micro-batches through its own iterator
            batches = [iter(micro) for _ in ddps] if len(ddps) > 1 else iter(micro)
            forward_step = ForwardStep(z_loss_weight=model_cfg.z_loss_weight,
                                       image_loss_weight=cfg.train.image_loss_weight, monitor=monitor,
                                       loss_scale=float("nan") if step in nan_steps else 1.0,
                                       model_kwargs=model_kwargs(bf16), n_sources=n_sources,
                                       per_token_loss=overrides["calculate_per_token_loss"])
            probe.arm(monitor)
            for d in ddps:
                d.zero_grad_buffer()
            opt.zero_grad()
            out = fb(forward_step_func=forward_step, data_iterator=batches, model=ddps, num_microbatches=n_micro,
                     forward_only=False, **shape)
            finetune.mask_gradients()  # frozen rows (finetune.freeze image_rows) keep a zero gradient
            opt.prepare_grads()  # main grads ready (bf16: copied to fp32); no inf check without a loss scaler
            # loss statistics, gradient norm, stop flag (and the attention-logit max): one all-reduce, one read
            res = reduce_step(out, grad_sumsq(opt, device), stop=stop.pending, device=device,
                              attn_max=probe.value() if monitor else None, monitor=monitor, n_sources=n_sources)
            if res.finite:
                bad = 0
                apply_update(opt, res.grad_norm)  # clip + step exactly as opt.step() (tessera.pretrain.optimizer)
                sched.step(increment=gbs)
            else:
                bad += 1
        param_gather.after_step(res.finite)
        if bad >= cfg.train.max_bad_steps:
            raise RuntimeError(f"{bad} consecutive non-finite steps at step {step}; stopping")
        loss = res.stats["loss"]
        losses.append(loss)
        timing = logger.end_step()
        rec = {"step": step, "loss": loss, "grad_norm": res.grad_norm if res.finite else float("nan"),
               "lr": opt.param_groups[0]["lr"], "bad_steps": bad, **res.stats, **timing}
        if n_sources:
            rec.update(source_record(data_it.source_names, res.source_sums, cfg.data.seq_length, weights))
        if res.max_attn_logit is not None:
            rec["max_attn_logit"] = res.max_attn_logit
        if syncs.count is not None:
            rec["host_syncs"] = syncs.count
        if device.type == "cuda" and logger.is_log_step(step):
            rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if step == cfg.train.steps or (cfg.train.eval_interval > 0 and step % cfg.train.eval_interval == 0):
            with param_gather.synced():  # the forward must see the updated parameters
                rec.update(evaluator.run())  # every rank; forward only; training RNG and data position untouched
        logger.log(rec)
        faults.maybe_kill_after_step(step)
        if step % cfg.train.save_interval == 0 or step == cfg.train.steps or res.stop:
            with param_gather.synced():  # the saved weights are the updated ones
                save_checkpoint(run, step, model=model, optimizer=opt, scheduler=sched, cfg=cfg, resolved=resolved,
                                vocab=vocab, data_iterator=data_it, bad_steps=bad, base=finetune.base)
        if res.stop:  # every rank read the same flag: all saved this step, all stop
            stop.restore()
            raise Preempted(run, step)
    param_gather.close()
    stop.restore()
    probe.close()
    logger.close()
    return losses


def _save_run_config(path: Path, cfg: TrainConfig, resolved: ResolvedRun) -> None:
    """RUN/config.yaml: the run config as asked, and beside it (``resolved:``) what the run resolved."""
    import yaml

    atomic_write_text(path, yaml.safe_dump({**to_dict(cfg), "resolved": to_dict(resolved)}, sort_keys=False))


if __name__ == "__main__":
    import sys

    from tessera.pretrain.cli import run

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(run(sys.argv[1] if len(sys.argv) > 1 else None, sys.argv[2:]))
