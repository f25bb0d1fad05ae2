"""TP=2 and PP=2 (through megatron's pipeline schedule) give the loss and gradients of the 1-process
model with the same weights. Two gloo processes; weights move between layouts via dist_checkpointing
(which also exercises the per-head QK-norm's TP sharding)."""

from __future__ import annotations

import faulthandler
import os
import re
import socket
from functools import partial

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2
MICRO, MBS, SEQ = 2, 2, 16


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(cfg, seed=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (MICRO * MBS, SEQ + 1), generator=g)
    mask = (torch.rand(MICRO * MBS, SEQ, generator=g) > 0.2).float()
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), mask


def _randomize_norms(model, seed=3):
    """QK-norm / RMSNorm weights away from 1/0 so a misplaced or missing norm changes the result."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g) if name.endswith("weight")
                        else 0.1 * torch.randn(p.shape, generator=g))


def _global_name(model, name):
    m = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
    if not m:
        return name
    layer = model.decoder.layers[int(m.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}.{m.group(2)}"


def _tp_slice(full, param, name, tp, rank):
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if name.endswith("linear_fc1.weight"):  # SwiGLU [gate; up]: each rank holds [gate_r; up_r]
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)
    return full.chunk(tp, dim=dim)[rank]


def _worker(rank, port, tmpdir, cfg_kwargs, phases=("tp", "pp")):
    # A hang (e.g. a mismatched collective) fails the test with stacks instead of blocking the suite.
    faulthandler.dump_traceback_later(240, exit=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from tessera.model import ModelConfig, build_model, initialize_parallel, language_model_loss

    cfg = ModelConfig(**cfg_kwargs)
    ids, labels, mask = _batch(cfg)
    pos = torch.arange(SEQ).unsqueeze(0).expand(MBS, -1)
    out = {}

    def mb(i):
        s = slice(i * MBS, (i + 1) * MBS)
        return ids[s], labels[s], mask[s]

    # -- reference: TP=1, PP=1 (both ranks are identical data-parallel replicas) ----------------
    initialize_parallel(1, 1)
    ref = build_model(cfg)
    _randomize_norms(ref)
    total = 0.0
    for i in range(MICRO):
        x, y, m = mb(i)
        total = total + language_model_loss(ref(x, pos, None), y, m, cfg.z_loss_weight).total / MICRO
    total.backward()
    out["ref_loss"] = total.item()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    out["tp_grad_scale"] = max(g.abs().max().item() for g in ref_grads.values())
    ckpt = os.path.join(tmpdir, "ref")
    if rank == 0:
        os.makedirs(ckpt)
    torch.distributed.barrier()
    dist_checkpointing.save({"model": ref.sharded_state_dict()}, ckpt)

    def loss_func(y, m, output):
        loss = language_model_loss(output, y, m, cfg.z_loss_weight)
        return loss.total, {"lm loss": loss.total.detach().clone()}  # the schedule divides loss.total in place

    def forward_step(data_iterator, model):
        x, y, m = next(data_iterator)
        return model(x, pos, None), partial(loss_func, y, m)

    if "vp" in phases:  # PP=2 x 2 virtual stages through the interleaved schedule
        initialize_parallel(tp=1, pp=2, vp=2)
        chunks = [build_model(cfg, vp_stage=v) for v in range(2)]
        # one load for all chunks: dist_checkpointing checks that the ranks together cover every tensor
        state = dist_checkpointing.load({"model": {f"chunk{v}": c.sharded_state_dict() for v, c in enumerate(chunks)}}, ckpt)
        for v, c in enumerate(chunks):
            c.load_state_dict(state["model"][f"chunk{v}"])
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=[iter([mb(i) for i in range(MICRO)]) for _ in chunks],
            model=chunks, num_microbatches=MICRO, seq_length=SEQ, micro_batch_size=MBS, forward_only=False,
        )
        if parallel_state.is_pipeline_last_stage():
            out["vp_loss"] = sum(d["lm loss"].item() for d in losses) / MICRO
        out["vp_grad_err"] = {
            _global_name(c, n): (p.grad - ref_grads[_global_name(c, n)]).abs().max().item()
            for c in chunks for n, p in c.named_parameters()
        }
    if "tp" not in phases:
        torch.save(out, os.path.join(tmpdir, f"rank{rank}.pt"))
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()
        return

    # -- TP=2 ---------------------------------------------------------------------------------
    initialize_parallel(tp=2, pp=1)
    model = build_model(cfg)
    model.load_state_dict(dist_checkpointing.load({"model": model.sharded_state_dict()}, ckpt)["model"])
    total = 0.0
    for i in range(MICRO):
        x, y, m = mb(i)
        total = total + language_model_loss(model(x, pos, None), y, m, cfg.z_loss_weight).total / MICRO
    total.backward()
    out["tp_loss"] = total.item()
    out["tp_grad_err"] = {
        n: (p.grad - _tp_slice(ref_grads[n], p, n, 2, rank)).abs().max().item() for n, p in model.named_parameters()
    }

    # -- PP=2 through megatron's 1F1B schedule ---------------------------------------------------
    initialize_parallel(tp=1, pp=2)
    model = build_model(cfg)
    model.load_state_dict(dist_checkpointing.load({"model": model.sharded_state_dict()}, ckpt)["model"])

    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([mb(i) for i in range(MICRO)]), model=[model],
        num_microbatches=MICRO, seq_length=SEQ, micro_batch_size=MBS, forward_only=False,
    )
    if parallel_state.is_pipeline_last_stage():
        out["pp_loss"] = sum(d["lm loss"].item() for d in losses) / MICRO
    out["pp_grad_err"] = {
        _global_name(model, n): (p.grad - ref_grads[_global_name(model, n)]).abs().max().item()
        for n, p in model.named_parameters()
    }
    torch.save(out, os.path.join(tmpdir, f"rank{rank}.pt"))
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def _run(tmp_path, phases=("tp", "pp"), **cfg_kwargs):
    mp.start_processes(_worker, args=(_port(), str(tmp_path), cfg_kwargs, phases), nprocs=WORLD, join=True,
                       start_method="spawn")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


TINY = dict(num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, num_query_groups=2,
            vocab_size=256, seq_length=SEQ, z_loss_weight=1e-2)


pytestmark = pytest.mark.timeout(420)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("parallel"), **TINY)


def _check_grads(errs, scale, what):
    assert errs, f"{what}: no gradients compared"
    bad = {n: e for n, e in errs.items() if e > 1e-5 * max(scale, 1.0)}
    assert not bad, f"{what}: gradients differ from TP=1/PP=1: {bad}"


def test_tensor_parallel_2_matches_single_process(results):
    for r in results:
        assert r["tp_loss"] == pytest.approx(r["ref_loss"], rel=1e-5, abs=1e-6)
        _check_grads(r["tp_grad_err"], r["tp_grad_scale"], f"TP=2 rank {results.index(r)}")
    assert len(results[0]["tp_grad_err"]) == len(results[1]["tp_grad_err"])


def test_pipeline_parallel_2_matches_single_process(results):
    assert "pp_loss" in results[1] and "pp_loss" not in results[0]
    assert results[1]["pp_loss"] == pytest.approx(results[1]["ref_loss"], rel=1e-5, abs=1e-6)
    names = set(results[0]["pp_grad_err"]) | set(results[1]["pp_grad_err"])
    assert "embedding.word_embeddings.weight" in results[0]["pp_grad_err"]
    assert "output_layer.weight" in results[1]["pp_grad_err"]
    assert any(n.startswith("decoder.layers.1.") for n in results[1]["pp_grad_err"]), names
    for i, r in enumerate(results):
        _check_grads(r["pp_grad_err"], r["tp_grad_scale"], f"PP=2 stage {i}")


@pytest.mark.slow  # ~20-40 s: a second pair of processes
def test_swin_norm_tensor_and_pipeline_parallel(tmp_path):
    """Chameleon-34B's norm placement survives TP=2 / PP=2 too (its norms are replicated, not split)."""
    res = _run(tmp_path, **{**TINY, "swin_norm": True})
    for r in res:
        assert r["tp_loss"] == pytest.approx(r["ref_loss"], rel=1e-5, abs=1e-6)
        _check_grads(r["tp_grad_err"], r["tp_grad_scale"], "swin TP=2")
        _check_grads(r["pp_grad_err"], r["tp_grad_scale"], "swin PP=2")
    assert res[1]["pp_loss"] == pytest.approx(res[1]["ref_loss"], rel=1e-5, abs=1e-6)


@pytest.mark.slow  # ~20-40 s: a second pair of processes
def test_virtual_pipeline_interleaved_schedule(tmp_path):
    """PP=2 with 2 virtual stages per rank (4 layers: rank 0 holds layers 0 and 2) through megatron's
    interleaved 1F1B schedule."""
    res = _run(tmp_path, phases=("vp",), **{**TINY, "num_layers": 4})
    assert "vp_loss" in res[1] and "vp_loss" not in res[0]
    assert res[1]["vp_loss"] == pytest.approx(res[1]["ref_loss"], rel=1e-5, abs=1e-6)
    assert {n.split(".")[2] for n in res[0]["vp_grad_err"] if n.startswith("decoder.layers.")} == {"0", "2"}
    for i, r in enumerate(res):
        _check_grads(r["vp_grad_err"], r["tp_grad_scale"], f"VP stage {i}")
