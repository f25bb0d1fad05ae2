"""Document-masked packed micro-batches under TP=2 and PP=2 (megatron's 1F1B schedule told the THD row's
shape: seq_length = micro_batch x seq, micro_batch_size = 1) give the loss and gradients of one process.
Two gloo processes; every layout builds the same weights (``init_seed``)."""

from __future__ import annotations

import faulthandler
import os
import socket
from functools import partial

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2
MICRO, MBS, SEQ = 2, 2, 16
# documents per row of each micro-batch: a row of one document, rows of several
LENGTHS = [[[5, 11], [16]], [[3, 4, 9], [10, 6]]]
CFG = dict(num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, num_query_groups=2,
           vocab_size=256, seq_length=SEQ, z_loss_weight=1e-2, init_method_std=0.1)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    out = []
    for rows in LENGTHS:
        ids = torch.randint(0, CFG["vocab_size"], (MBS, SEQ + 1), generator=g)
        cu = [0]
        for r, lengths in enumerate(rows):
            cu += [r * SEQ + c for c in torch.tensor(lengths).cumsum(0).tolist()]
        out.append({"tokens": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
                    "loss_mask": (torch.rand(MBS, SEQ, generator=g) > 0.2).float(),
                    "position_ids": torch.tensor([p for rw in rows for n in rw for p in range(n)]).view(MBS, SEQ),
                    "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
                    "max_seqlen": torch.tensor(max(n for rw in rows for n in rw))})
    return out


def _worker(rank, port, tmpdir):
    faulthandler.dump_traceback_later(240, exit=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from tessera.model import (
        ModelConfig,
        build_model,
        document_mask,
        initialize_parallel,
        language_model_loss,
    )

    cfg = ModelConfig(**CFG)
    batches = _batches()
    out = {}

    def loss_func(b, output):
        loss = language_model_loss(output, b["labels"], b["loss_mask"], cfg.z_loss_weight)
        return loss.total, {"lm loss": loss.total.detach().clone()}

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        return document_mask.forward(model, b), partial(loss_func, b)

    initialize_parallel(1, 1)
    ref = build_model(cfg, init_seed=5)
    total = sum(language_model_loss(document_mask.forward(ref, b), b["labels"], b["loss_mask"],
                                    cfg.z_loss_weight).total for b in batches) / MICRO
    total.backward()
    out["ref_loss"] = total.item()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}

    initialize_parallel(tp=2, pp=1)
    model = build_model(cfg, init_seed=5)
    out["tp_loss"] = (sum(language_model_loss(document_mask.forward(model, b), b["labels"], b["loss_mask"],
                                              cfg.z_loss_weight).total for b in batches) / MICRO).item()

    initialize_parallel(tp=1, pp=2)
    model = build_model(cfg, init_seed=5)
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[model], num_microbatches=MICRO,
        seq_length=MBS * SEQ, micro_batch_size=1, forward_only=False,  # the THD row: [b * s, 1, hidden]
    )
    if parallel_state.is_pipeline_last_stage():
        out["pp_loss"] = sum(d["lm loss"].item() for d in losses) / MICRO
    from tessera.model.chameleon import global_param_name

    out["pp_grad_err"] = {global_param_name(model, n): (p.grad - ref_grads[global_param_name(model, n)]).abs().max().item()
                          for n, p in model.named_parameters()}
    torch.save(out, os.path.join(tmpdir, f"rank{rank}.pt"))
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


@pytest.mark.slow  # ~20-60 s: a pair of processes
@pytest.mark.timeout(420)
def test_document_masked_batches_under_tensor_and_pipeline_parallelism(tmp_path):
    mp.start_processes(_worker, args=(_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn")
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for r in res:
        assert r["tp_loss"] == pytest.approx(r["ref_loss"], rel=1e-5)
    assert "pp_loss" in res[1] and res[1]["pp_loss"] == pytest.approx(res[1]["ref_loss"], rel=1e-5)
    errs = {**res[0]["pp_grad_err"], **res[1]["pp_grad_err"]}
    assert "embedding.word_embeddings.weight" in errs and "output_layer.weight" in errs
    assert max(errs.values()) < 1e-5, errs
