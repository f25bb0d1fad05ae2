"""The trainer's data: a blend of two sources trains in the configured proportions (also through a schedule
that changes them), reports per-source tokens and CE, resumes exactly; held-out sets are evaluated one by
one; ``data.document_mask`` trains on THD rows whose loss equals the documents run one by one, the same
under TP=2 (and PP=2, slow), with one host read per step where a fused THD RoPE exists, and a probe that
takes the attention max document by document.

Runs: tiny preset, fp32, a tiny pretokenized corpus (conftest.tiny_pretok: ``train`` and ``heldout``)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

BASE = ["configs/demo.yaml", "--model.preset", "tiny", "--optim.warmup", "1", "--data.seq_length", "32",
        "--train.eval_interval", "0"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")

pytestmark = pytest.mark.timeout(600)


def _train(run, *extra, nproc=1, env=None, ok=True):
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    cmd = [sys.executable, *launcher, "-m", "tessera.pretrain.trainer", *BASE, "--train.run_dir", str(run), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(ENV, **(env or {})))
    if ok:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _metrics(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# ---- a blend of two sources ------------------------------------------------------------------------
STEPS, GBS, SWITCH = 40, 16, 20  # the blend switches after 20 steps: 320 slots in each stage


def _blend_args(pretok) -> list[str]:
    sources = f"[{{name: a, path: {pretok['train']}}}, {{name: b, path: {pretok['heldout']}}}]"
    knots = f"[{{step: 0, weights: {{a: 0.8, b: 0.2}}}}, {{step: {SWITCH}, weights: {{a: 0.2, b: 0.8}}}}]"
    return ["--data.sources", sources, "--data.blend.ramp", "step", "--data.blend.knots", knots,
            "--train.steps", str(STEPS),
            "--parallel.global_batch_size", str(GBS), "--parallel.micro_batch_size", "8", "--data.seq_length", "16",
            "--train.save_interval", "25", "--train.monitor_interval", "0"]


@pytest.fixture(scope="module")
def blend_run(tiny_pretok, tmp_path_factory):
    run = tmp_path_factory.mktemp("blend") / "run"
    _train(run, *_blend_args(tiny_pretok), env={"TESSERA_COUNT_SYNCS": "1"})
    return run, _metrics(run)


def test_a_blend_trains_in_the_configured_proportions(blend_run):
    """The rows each source gave (counted on the device from every batch's ``source`` field and summed over the
    step's reduction) follow the configured weights within binomial noise, in both stages of the schedule, and
    equal the blend's plan (a pure function of seed and step) exactly."""
    from tessera.data.blend import BlendKnot, BlendSchedule, composition

    _, recs = blend_run
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    rows = np.array([[r["tokens/a"] // 16, r["tokens/b"] // 16] for r in recs])
    assert (rows.sum(1) == GBS).all()
    for stage, (lo, hi), p_a in ((1, (0, SWITCH), 0.8), (2, (SWITCH, STEPS), 0.2)):
        n = (hi - lo) * GBS
        got = rows[lo:hi, 0].sum()
        assert abs(got - n * p_a) <= 4.5 * math.sqrt(n * p_a * (1 - p_a)), (stage, got, n * p_a)
        assert all(r["weight/a"] == pytest.approx(p_a) for r in recs[lo:hi])
    # the trainer's step t reads the blend's step t - 1 (steps done before it)
    sched = BlendSchedule(["a", "b"], [BlendKnot(0, {"a": 0.8, "b": 0.2}), BlendKnot(SWITCH, {"a": 0.2, "b": 0.8})],
                          "step")
    assert np.array_equal(rows, composition(sched, 1234, range(STEPS), GBS))


def test_a_blend_reports_per_source_tokens_and_ce_in_the_one_host_read(blend_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, recs = blend_run
    for r in recs:
        assert r["host_syncs"] == 1  # the per-source sums ride in the step's one reduction
        assert r["target_tokens/a"] + r["target_tokens/b"] <= r["tokens/a"] + r["tokens/b"] == GBS * 16
        # the per-source CE sums make up the step's CE (token-weighted)
        parts = [(r[f"ce/{s}"], r[f"target_tokens/{s}"]) for s in "ab" if f"ce/{s}" in r]
        assert sum(c * n for c, n in parts) / sum(n for _, n in parts) == pytest.approx(r["ce"], rel=1e-6)  # fp32 sums
    ea = EventAccumulator(str(run / "tensorboard"))
    ea.Reload()
    assert {"sources/tokens/a", "sources/ce/b", "sources/weight/a", "sources/target_tokens/b"} <= set(ea.Tags()["scalars"])


def test_a_blend_under_dp2_reports_the_one_process_figures(blend_run, tiny_pretok, tmp_path):
    """Two data-parallel replicas each count their half of the rows: the reduction adds them up."""
    _, ref = blend_run
    _train(tmp_path / "dp2", *_blend_args(tiny_pretok), "--train.steps", "3", nproc=2)
    got = _metrics(tmp_path / "dp2")
    for key in ("tokens/a", "tokens/b", "target_tokens/a", "target_tokens/b"):
        assert [r[key] for r in got] == [r[key] for r in ref[:3]], key
    for key in ("loss", "ce/a", "ce/b"):  # step 1: the initial weights (later steps follow a 3-step lr schedule)
        assert got[0][key] == pytest.approx(ref[0][key], rel=1e-5), key


def test_a_blend_resumes_exactly(blend_run, tiny_pretok, tmp_path):
    """Killed after step 31 (last checkpoint: step 25, inside the second stage), then resumed: every step's
    numbers, per-source ones included, equal the uninterrupted run's."""
    _, ref = blend_run
    run = tmp_path / "run"
    r = _train(run, *_blend_args(tiny_pretok), env={"TESSERA_DEBUG_KILL_AT": "step:31"}, ok=False)
    assert r.returncode != 0
    _train(run, *_blend_args(tiny_pretok))
    got = _metrics(run)
    keys = [k for k in ref[0] if k.split("/")[0] in ("loss", "grad_norm", "ce", "tokens", "target_tokens", "weight")]
    assert len(keys) >= 9
    assert [{k: x.get(k) for k in keys} for x in got] == [{k: x.get(k) for k in keys} for x in ref]


def test_held_out_sets_are_evaluated_one_by_one(megatron_1proc, tiny_pretok):
    """Two held-out sets: each one's figures are those of an evaluator given only that set, and the overall
    loss is their token-weighted mean."""
    from tessera.config import from_dict
    from tessera.model.chameleon import build_model
    from tessera.model.config import get_preset
    from tessera.pretrain.config import TrainConfig
    from tessera.pretrain.evaluate import Evaluator
    from tessera.tokenizers.vocab import Vocabulary

    vocab = Vocabulary.load(tiny_pretok["train"])
    model = build_model(dataclasses.replace(get_preset("tiny"), vocab_size=vocab.padded_size), init_seed=4)

    def evaluate(**data):
        cfg = from_dict(TrainConfig, {"data": {"path": str(tiny_pretok["train"]), "seq_length": 32, **data},
                                      "parallel": {"global_batch_size": 4, "micro_batch_size": 2},
                                      "train": {"eval_steps": 2}})
        return Evaluator(cfg, [model], 2, 0, 1, vocab.modality_table(), device="cpu").run()

    both = evaluate(eval_sources=[{"path": str(tiny_pretok["heldout"]), "name": "h"},
                                  {"path": str(tiny_pretok["train"]), "name": "t"}])
    for name, path in (("h", tiny_pretok["heldout"]), ("t", tiny_pretok["train"])):
        alone = evaluate(eval_path=str(path))
        assert both[f"eval_loss/{name}"] == alone["eval_loss"] and both[f"eval_tokens/{name}"] == alone["eval_tokens"]
    n = both["eval_tokens/h"] + both["eval_tokens/t"]
    assert both["eval_tokens"] == n
    mean = (both["eval_loss/h"] * both["eval_tokens/h"] + both["eval_loss/t"] * both["eval_tokens/t"]) / n
    assert both["eval_loss"] == pytest.approx(mean, rel=1e-12)


def test_training_refuses_what_it_cannot_use():
    from tessera.config import ConfigError
    from tessera.model.config import get_preset
    from tessera.pretrain.config import load_train_config, validate_layout

    cfg = load_train_config("configs/demo.yaml", ["--model.preset", "tiny", "--data.reset_attention_mask", "true",
                                                  "--data.seq_length", "32"])
    with pytest.raises(ConfigError, match=r"^data.reset_attention_mask: the trainer cannot use it .*data.document_mask: true"):
        validate_layout(cfg, 1, get_preset("tiny"))
    cfg = load_train_config("configs/demo.yaml", ["--model.preset", "tiny", "--data.document_mask", "true",
                                                  "--data.seq_length", "32"])
    with pytest.raises(ConfigError, match=r"^data.document_mask needs data.path or data.sources"):
        validate_layout(cfg, 1, get_preset("tiny"))
    with pytest.raises(ConfigError, match=r"configs/demo.yaml: data.sources\[1\].name: 'x' is also"):
        load_train_config("configs/demo.yaml", ["--data.sources", "[{path: a/x}, {path: b/x}]"])


# ---- document-masked packing ---------------------------------------------------------------------
DOC = ["--data.document_mask", "true", "--train.steps", "3", "--parallel.global_batch_size", "4",
       "--parallel.micro_batch_size", "2", "--optim.lr", "3e-3", "--train.monitor_interval", "1"]


@pytest.fixture(scope="module")
def doc_run(tiny_pretok, tmp_path_factory):
    run = tmp_path_factory.mktemp("doc") / "run"
    _train(run, "--data.path", str(tiny_pretok["train"]), "--data.eval_path", str(tiny_pretok["heldout"]),
           "--train.eval_steps", "1", *DOC)
    return _metrics(run)


def test_document_masked_training_equals_the_documents_one_by_one(doc_run, tiny_pretok, megatron_1proc):
    """Step 1's CE (the weights as initialised) equals the token-mean CE of every document of the step's
    micro-batches run through the model on its own, positions from 0: the trainer packs, masks attention
    and RoPE at the boundaries and masks the labels that cross into the next document."""
    from tessera.data.config import DataConfig
    from tessera.model.chameleon import build_model
    from tessera.model.config import get_preset

    data = DataConfig(path=str(tiny_pretok["train"]), seq_length=32, document_mask=True)
    it = data.iterator(4, 2)
    model = build_model(dataclasses.replace(get_preset("tiny"), vocab_size=it.vocab.padded_size), init_seed=1234)
    ce_sum, n, docs = 0.0, 0.0, 0
    with torch.no_grad():
        for b in it.next_step():
            tokens, labels, mask = (b[k].reshape(-1) for k in ("tokens", "labels", "loss_mask"))
            bounds = b["cu_seqlens"].tolist()
            for a, e in zip(bounds, bounds[1:], strict=False):
                logits = model(tokens[a:e][None], torch.arange(e - a)[None], None)[0].double()
                ce = torch.nn.functional.cross_entropy(logits, labels[a:e], reduction="none")
                ce_sum += float((ce * mask[a:e]).sum())
                n += float(mask[a:e].sum())
                docs += 1
    assert docs > 2 * 2  # rows hold several documents
    assert doc_run[0]["ce"] == pytest.approx(ce_sum / n, rel=1e-5)
    assert doc_run[-1]["loss"] < doc_run[0]["loss"]  # and it trains
    assert all("max_attn_logit" in r for r in doc_run) and "eval_loss" in doc_run[-1]


def _same(got, ref, keys=("loss", "grad_norm", "ce", "max_attn_logit", "eval_loss")):
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for key in keys:
        assert [key in r for r in got] == [key in r for r in ref], key
        a, b = [r[key] for r in got if key in r], [r[key] for r in ref if key in r]
        assert a and a == pytest.approx(b, rel=1e-5, abs=1e-6), key


def test_document_masked_training_under_tp2_equals_one_process(doc_run, tiny_pretok, tmp_path):
    r = tmp_path / "tp2"
    _train(r, "--data.path", str(tiny_pretok["train"]), "--data.eval_path", str(tiny_pretok["heldout"]),
           "--train.eval_steps", "1", *DOC, "--parallel.tp", "2", nproc=2)
    _same(_metrics(r), doc_run)


def test_document_masked_training_under_pp2_equals_one_process(doc_run, tiny_pretok, tmp_path):
    """The 1F1B schedule exchanges the THD row [b * s, 1, h]; the last stage takes b, s from the labels."""
    r = tmp_path / "pp2"
    _train(r, "--data.path", str(tiny_pretok["train"]), "--data.eval_path", str(tiny_pretok["heldout"]),
           "--train.eval_steps", "1", *DOC, "--parallel.pp", "2", nproc=2)
    _same(_metrics(r), doc_run)


def _fused_rope_thd_standin(t, cu_seqlens, freqs, cp_size=1, cp_rank=0):
    """What Transformer Engine's fused THD RoPE computes, from device tensors only: each token rotated by its
    position in its own document (no host read of cu_seqlens)."""
    from megatron.core.models.common.embeddings import rope_utils

    idx = torch.arange(t.shape[0], device=t.device)
    cu = cu_seqlens.long()
    pos = idx - cu[torch.searchsorted(cu[1:], idx, right=True)]
    return rope_utils._apply_rotary_pos_emb_bshd(t.unsqueeze(1), freqs[pos]).squeeze(1)


def test_document_masked_step_reads_the_host_once_where_rope_is_fused(megatron_1proc, tiny_pretok, monkeypatch):
    """A document-masked training step (batches moved, forward + backward through megatron's schedule, the
    attention probe armed, the reduction): with a fused THD RoPE (a stand-in for Transformer Engine's, which
    the model turns on for packed sequences where it exists) the only host read is the step's one; with
    megatron's unfused THD RoPE there are more (it reads cu_seqlens on the host), and the numbers agree."""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from tessera.data.config import DataConfig
    from tessera.model import chameleon
    from tessera.model.config import get_preset
    from tessera.pretrain.monitors import AttentionLogitProbe
    from tessera.pretrain.step import (
        BatchMover,
        ForwardStep,
        attach_packed_seq_params,
        reduce_step,
        schedule_shape,
    )
    from tessera.syncs import HostSyncCounter

    it = DataConfig(path=str(tiny_pretok["train"]), seq_length=32, document_mask=True).iterator(4, 2)
    host = [attach_packed_seq_params(b) for b in it.next_step()]  # host side, before the step
    cfg = dataclasses.replace(get_preset("tiny"), vocab_size=it.vocab.padded_size)
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb_thd", _fused_rope_thd_standin)

    def step(fused: bool):
        monkeypatch.setattr(chameleon, "rope_fusion_available", lambda: fused)
        model = chameleon.build_model(cfg, init_seed=3, packed_sequences=True)
        assert model.config.apply_rope_fusion is fused
        probe = AttentionLogitProbe([model])
        probe.arm(True)
        with HostSyncCounter("cpu") as syncs:
            micro = BatchMover("cpu", modality=it.vocab.modality_table()).all(host)
            out = get_forward_backward_func()(
                forward_step_func=ForwardStep(z_loss_weight=1e-4, monitor=True), data_iterator=iter(micro),
                model=[model], num_microbatches=2, forward_only=False, **schedule_shape(32, 2, packed=True))
            grads = sum(p.grad.square().sum() for p in model.parameters() if p.grad is not None)
            res = reduce_step(out, grads, stop=False, device=torch.device("cpu"), attn_max=probe.value(), monitor=True)
        probe.close()
        return res, syncs.count

    fused, n_fused = step(True)
    unfused, n_unfused = step(False)
    assert n_fused == 1
    assert n_unfused > 1
    assert fused.stats == unfused.stats and fused.grad_norm == unfused.grad_norm
    assert fused.max_attn_logit == unfused.max_attn_logit is not None


def test_rope_fusion_is_off_without_cuda_and_transformer_engine(monkeypatch):
    from megatron.core.models.common.embeddings import rope_utils

    from tessera.model import chameleon

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not chameleon.rope_fusion_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb_thd", None)
    assert not chameleon.rope_fusion_available()
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb_thd", _fused_rope_thd_standin)
    assert chameleon.rope_fusion_available()


def test_attention_probe_takes_the_max_document_by_document(megatron_1proc):
    """On a THD row the probe's max is over (i, j) pairs of the same document only: equal to the max of
    block-diagonal causal scores of the q and k core attention received."""
    from tessera.model import document_mask
    from tessera.model.chameleon import build_model
    from tessera.model.config import get_preset
    from tessera.pretrain.monitors import AttentionLogitProbe

    cfg = get_preset("tiny")
    model = build_model(cfg, init_seed=6)
    seen = []
    hooks = [layer.self_attention.core_attention.register_forward_pre_hook(
        lambda mod, args: seen.append((args[0].detach(), args[1].detach()))) for layer in model.decoder.layers]
    cu = torch.tensor([0, 5, 16, 19, 32], dtype=torch.int32)
    batch = {"tokens": torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2)),
             "position_ids": torch.zeros(2, 16, dtype=torch.long), "cu_seqlens": cu, "max_seqlen": torch.tensor(13)}
    probe = AttentionLogitProbe([model])
    probe.arm(True)
    with torch.no_grad():
        document_mask.forward(model, batch)
    got = float(probe.value())
    probe.close()
    for h in hooks:
        h.remove()
    doc = torch.repeat_interleave(torch.arange(4), cu.diff())
    allowed = (doc[:, None] == doc[None, :]) & torch.ones(32, 32, dtype=torch.bool).tril()
    want = -math.inf
    for q, k in seen:  # [t, heads, d], [t, groups, d]
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        s = torch.einsum("ihd,jhd->hij", q.double(), k.double()) / math.sqrt(cfg.head_dim)
        want = max(want, float(s.masked_fill(~allowed, -math.inf).max()))
    assert q.dim() == 3 and got == pytest.approx(want, rel=1e-5)
