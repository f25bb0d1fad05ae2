"""The training loss counts only loss-mask tokens, over the whole global batch (megatron's per-token loss):
a step's gradient under DP=2 with two micro-batches per replica, whose masks select very different numbers of
tokens, equals the gradient of (sum of the masked-in tokens' loss over the global batch) / (their count)
computed in one process. The per-micro-batch mean that averaging micro-batch losses gives is measurably
different on the same batches (the test would see a wrong normalisation)."""

from __future__ import annotations

import faulthandler
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

SEQ, MBS = 16, 2
# selected tokens per micro-batch of the global batch (rank 0 takes 0-1, rank 1 takes 2-3)
COUNTS = (SEQ * MBS, 3, 20, 1)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _micro_batches(vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(11)
    out = []
    for n in COUNTS:
        ids = torch.randint(0, vocab, (MBS, SEQ + 1), generator=g)
        mask = torch.zeros(MBS * SEQ)
        mask[torch.randperm(MBS * SEQ, generator=g)[:n]] = 1.0
        out.append({"tokens": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
                    "loss_mask": mask.view(MBS, SEQ), "position_ids": torch.arange(SEQ).expand(MBS, -1).contiguous()})
    return out


def _worker(rank: int, port: int, tmpdir: str) -> None:
    faulthandler.dump_traceback_later(240, exit=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from tessera.model import build_model, initialize_parallel, language_model_loss
    from tessera.model.config import get_preset
    from tessera.pretrain.config import TrainConfig
    from tessera.pretrain.optimizer import get_optimizer
    from tessera.pretrain.scale import ddp_config, transformer_overrides, wire_schedule
    from tessera.pretrain.step import ForwardStep
    from tessera.pretrain.trainer import _build_model_chunks

    cfg = TrainConfig(model=get_preset("tiny"))
    cfg.parallel.micro_batch_size, cfg.parallel.global_batch_size = MBS, MBS * len(COUNTS)
    cfg.data.seq_length, cfg.train.seed = SEQ, 3
    z = cfg.model.z_loss_weight = 1e-2  # the z-loss is normalised the same way
    initialize_parallel(1, 1, seed=3)  # world 2: DP=2
    batches = _micro_batches(cfg.model.vocab_size)

    # reference, in this process: sum over the global batch of the masked tokens' loss / their count
    ref = build_model(cfg.model, init_seed=3)
    los = [language_model_loss(ref(b["tokens"], b["position_ids"], None), b["labels"], b["loss_mask"], z)
           for b in batches]
    (sum(lo.total_sum for lo in los) / sum(lo.num_tokens for lo in los)).backward()
    want = {n: p.grad.clone() for n, p in ref.named_parameters()}
    ref.zero_grad()
    (sum(lo.total for lo in [language_model_loss(ref(b["tokens"], b["position_ids"], None), b["labels"],
                                                 b["loss_mask"], z) for b in batches]) / len(batches)).backward()
    per_micro_mean = {n: p.grad.clone() for n, p in ref.named_parameters()}

    # the trainer's path: megatron DDP (DP=2), the schedule with per-token loss, finalize_model_grads
    overrides = transformer_overrides(cfg, deterministic=True, cuda=False)
    chunks, ddps = _build_model_chunks(cfg, False, cfg.model, ddp_config(cfg, 2), **overrides)
    opt = get_optimizer(cfg.optim, ddps, False)
    wire_schedule(chunks, ddps, opt, cfg)
    mine = batches[2 * rank: 2 * rank + 2]
    for d in ddps:
        d.zero_grad_buffer()
    get_forward_backward_func()(
        forward_step_func=ForwardStep(z_loss_weight=z, per_token_loss=True), data_iterator=iter(mine),
        model=ddps, num_microbatches=2, seq_length=SEQ, micro_batch_size=MBS, forward_only=False)
    got = {n: p.main_grad.clone() for n, p in chunks[0].named_parameters()}
    scale = max(g.abs().max().item() for g in want.values())
    torch.save({"err": {n: (got[n] - want[n]).abs().max().item() for n in want},
                "mean_err": max((per_micro_mean[n] - want[n]).abs().max().item() for n in want),
                "scale": scale}, os.path.join(tmpdir, f"rank{rank}.pt"))
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


@pytest.mark.timeout(300)
def test_per_token_loss_over_the_global_batch_under_dp2(tmp_path):
    mp.start_processes(_worker, args=(_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt")
        bad = {n: e for n, e in res["err"].items() if e > 1e-5 * res["scale"]}
        assert not bad, f"rank {r}: gradients differ from sum / count over the global batch: {bad}"
        # averaging micro-batch means weighs the 1-token micro-batch like the 32-token one: far off
        assert res["mean_err"] > 100 * 1e-5 * res["scale"]
