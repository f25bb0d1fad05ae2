"""megatron-core training loop: model, DDP, megatron optimizer + scheduler, forward_backward
schedules, non-finite step skipping, JSONL metrics, model checkpoints.

Data: ``data.path`` (a directory written by ``tessera data pretokenize``) is packed and read through
``tessera.data``'s woven iterator, so every batch is a pure function of (seed, step). Without a path a
deterministic random-token stand-in is used (tests, throughput runs).
Not yet here (see docs/training.md): optimizer/RNG state in checkpoints and resume, eval, TensorBoard.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from tessera.config import save_config
from tessera.pretrain.config import TrainConfig, validate_layout


def _synthetic_batch(cfg: TrainConfig, step: int, micro: int) -> dict[str, torch.Tensor]:
    # keyed by the GLOBAL micro-batch index so any DP size sees the same global batch
    g = torch.Generator().manual_seed(hash((cfg.data.seed, step, micro)) % (2**62))
    b, s = cfg.parallel.micro_batch_size, cfg.data.seq_length
    t = torch.randint(0, cfg.model.vocab_size, (b, s + 1), generator=g)
    return {"tokens": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous(),
            "loss_mask": torch.ones(b, s), "position_ids": torch.arange(s).expand(b, s).contiguous()}


def _open_data(cfg: TrainConfig, dp_rank: int, dp_size: int):
    """The woven batch iterator over ``data.path`` and its vocabulary."""
    from tessera.data.batches import PackedSource, PackingConfig, WovenBatchIterator
    from tessera.data.weave import WeaveSchedule

    source = PackedSource(cfg.data.path, PackingConfig(seq_length=cfg.data.seq_length, shuffle_seed=cfg.data.seed),
                          name="train")
    it = WovenBatchIterator({"train": source}, WeaveSchedule.constant({"train": 1.0}),
                            global_batch=cfg.parallel.global_batch_size, micro_batch=cfg.parallel.micro_batch_size,
                            dp_rank=dp_rank, dp_size=dp_size, seed=cfg.data.seed)
    return it, it.vocab


def _save(model, cfg: TrainConfig, run: Path, vocab, step: int) -> None:
    from tessera.config import to_dict
    from tessera.model.checkpoint import save_model_checkpoint, step_dir_name, write_latest

    name = step_dir_name(step)
    save_model_checkpoint(model, cfg.model, run / "checkpoints" / name, vocab=vocab, extra_config=to_dict(cfg),
                          step=step)
    if torch.distributed.get_rank() == 0:
        write_latest(run / "checkpoints", name)  # updated last: `latest` never names a partial checkpoint


def train(cfg: TrainConfig) -> list[float]:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from tessera.model.chameleon import build_model
    from tessera.model.loss import language_model_loss
    from tessera.model.parallel import init_distributed, initialize_parallel

    init_distributed()
    world = torch.distributed.get_world_size()
    data_it, vocab = None, None
    if cfg.data.path:
        # the embedding must cover the data's vocabulary: take its padded size (divisible by 128 x TP)
        from tessera.tokenizers.vocab import Vocabulary

        vocab = Vocabulary.load(cfg.data.path)
        cfg.model.vocab_size = vocab.padded_size
    dp = validate_layout(cfg, world)
    initialize_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vp, cfg.train.seed)
    if cfg.data.path:
        data_it, vocab = _open_data(cfg, ps.get_data_parallel_rank(), dp)
        modality = vocab.modality_table()
    torch.use_deterministic_algorithms(True)
    model = build_model(cfg.model)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=cfg.optim.lr, min_lr=cfg.optim.min_lr, weight_decay=cfg.optim.weight_decay,
                        adam_beta1=cfg.optim.beta1, adam_beta2=cfg.optim.beta2, adam_eps=cfg.optim.eps,
                        clip_grad=cfg.optim.clip_grad, bf16=False, fp16=False), [ddp])
    gbs = cfg.parallel.global_batch_size
    sched = OptimizerParamScheduler(
        opt, init_lr=0.0, max_lr=cfg.optim.lr, min_lr=cfg.optim.min_lr, lr_warmup_steps=cfg.optim.warmup * gbs,
        lr_decay_steps=cfg.train.steps * gbs, lr_decay_style=cfg.optim.decay_style,
        start_wd=cfg.optim.weight_decay, end_wd=cfg.optim.weight_decay, wd_incr_steps=cfg.train.steps * gbs,
        wd_incr_style="constant")
    n_micro = gbs // (cfg.parallel.micro_batch_size * dp)
    run = Path(cfg.train.run_dir)
    is_logger = torch.distributed.get_rank() == 0
    if is_logger:
        save_config(cfg, run / "config.yaml")
    fb = get_forward_backward_func()
    losses, bad = [], 0
    for step in range(1, cfg.train.steps + 1):
        if data_it is not None:
            batches = iter([next(data_it) for _ in range(n_micro)])
        else:
            batches = iter([_synthetic_batch(cfg, step, ps.get_data_parallel_rank() * n_micro + i)
                            for i in range(n_micro)])

        nan = float("nan") if step in cfg.train.debug_nan_steps else 1.0

        def forward_step(it, m, nan=nan):
            b = next(it)
            out = m(b["tokens"], b["position_ids"], None)

            def loss_fn(logits):
                label_modality = modality[b["labels"]] if data_it is not None else None
                lo = language_model_loss(logits, b["labels"], b["loss_mask"], cfg.model.z_loss_weight,
                                         label_modality=label_modality,
                                         image_loss_weight=cfg.train.image_loss_weight)
                total = lo.total * nan
                # clone: the schedule divides the returned loss by num_microbatches in place
                stats = {"loss": total.detach().clone(), "z": lo.z.detach().clone()}
                for k, v in lo.per_modality.items():
                    stats[f"ce_{k}"] = v.detach().clone()
                return total, stats
            return out, loss_fn

        ddp.zero_grad_buffer()
        opt.zero_grad()
        out = fb(forward_step_func=forward_step, data_iterator=batches, model=[ddp], num_microbatches=n_micro,
                 seq_length=cfg.data.seq_length, micro_batch_size=cfg.parallel.micro_batch_size, forward_only=False)
        # one contributor per DP replica: the last pipeline stage's TP rank 0; sum over DP then average
        counts = out and ps.get_tensor_model_parallel_rank() == 0
        local = torch.tensor([sum(float(o["loss"]) for o in out) / n_micro if counts else 0.0])
        torch.distributed.all_reduce(local)
        loss = float(local) / dp
        finite = torch.tensor([float(all(torch.isfinite(p.main_grad).all() for p in ddp.parameters()))])
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if not math.isfinite(loss) or finite.item() < 1:
            bad += 1
            if bad >= cfg.train.max_bad_steps:
                raise RuntimeError(f"{bad} consecutive non-finite steps at step {step}; stopping")
            grad_norm = float("nan")
        else:
            bad = 0
            _, grad_norm, _ = opt.step()
            sched.step(increment=gbs)
        losses.append(loss)
        if is_logger:
            rec = {"step": step, "loss": loss, "grad_norm": grad_norm, "lr": opt.param_groups[0]["lr"],
                   "bad_steps": bad}
            # per-modality CE and z-loss as seen on this rank's micro-batches (text / image curves in the demo)
            for key in sorted({k for o in (out or []) for k in o if k != "loss"}):
                vals = [float(o[key]) for o in out if key in o and math.isfinite(float(o[key]))]
                if vals:
                    rec[key] = sum(vals) / len(vals)
            with open(run / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"step {step} loss {loss:.4f} grad_norm {grad_norm:.3f}", flush=True)
        if step % cfg.train.save_interval == 0 or step == cfg.train.steps:
            _save(model, cfg, run, vocab, step)
    return losses


if __name__ == "__main__":
    import sys

    from tessera.pretrain.config import load_train_config
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    train(load_train_config(sys.argv[1] if len(sys.argv) > 1 else None, sys.argv[2:]))
