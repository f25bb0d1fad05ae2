"""Packed samples, blend schedules and the blended, DP-sliced, resumable batch iterator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_data_standins import pretokenized_synth

from tessera.bench.data import benchmark_batches
from tessera.data.batches import BatchError, BlendedBatchIterator, PackedSource, PackingConfig
from tessera.data.blend import (
    BlendError,
    BlendKnot,
    BlendSchedule,
    composition,
    consumed_before,
    plan,
)
from tessera.data.report import blend_balance, source_balance
from tessera.tokenizers.vocab import Modality

SEQ = 64


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    return pretokenized_synth(tmp_path_factory.mktemp("blend"), (("web", 1, 40), ("synth", 2, 60)))


def _sources(datasets, packing=None, num_samples=4000):
    packing = packing or PackingConfig(seq_length=SEQ)
    return {n: PackedSource(p, packing, num_samples, name=n) for n, p in datasets.items()}


SCHEDULE = BlendSchedule(
    ["web", "synth"],
    [BlendKnot(0, {"web": 1.0}), BlendKnot(5, {"web": 1.0}), BlendKnot(25, {"web": 0.2, "synth": 0.8})],
)


# ---- schedules ---------------------------------------------------------------------------------
def test_schedule_ramps_are_smooth_and_hit_the_knots():
    for ramp, bound in (("linear", 1 / 20), ("cosine", math.pi / 2 / 20)):
        s = BlendSchedule(["a", "b"], [BlendKnot(100, {"a": 3.0, "b": 1.0}), BlendKnot(120, {"b": 1.0})], ramp)
        assert s.weights(0).tolist() == [0.75, 0.25] == s.weights(100).tolist()
        assert s.weights(120).tolist() == [0.0, 1.0] == s.weights(10_000).tolist()
        w = np.stack([s.weights(t) for t in range(90, 131)])
        assert np.allclose(w.sum(1), 1.0)
        assert np.abs(np.diff(w, axis=0)).max() <= 0.75 * bound + 1e-12  # never a jump
    assert BlendSchedule.from_dict(s.to_dict()).weights_dict(110) == s.weights_dict(110)


@pytest.mark.parametrize(
    "knots,match",
    [
        ([], "at least one knot"),
        ([BlendKnot(0, {"a": 1}), BlendKnot(0, {"b": 1})], "strictly increase"),
        ([BlendKnot(0, {"c": 1})], "unknown source"),
        ([BlendKnot(0, {"a": 0, "b": 0})], "not all zero"),
        ([BlendKnot(0, {"a": -1, "b": 2})], ">= 0"),
    ],
)
def test_schedule_validation(knots, match):
    with pytest.raises(BlendError, match=match):
        BlendSchedule(["a", "b"], knots)


def test_plan_is_a_pure_function_of_seed_and_step():
    a = [plan(SCHEDULE, 7, t, 32) for t in (20, 3, 20)]
    assert np.array_equal(a[0], a[2]) and np.array_equal(plan(SCHEDULE, 7, 3, 32), a[1])
    assert not np.array_equal(plan(SCHEDULE, 8, 20, 32), a[0])
    assert (plan(SCHEDULE, 7, 2, 32) == 0).all()  # weight 0 -> never drawn
    # slot j's draw does not depend on the batch size (counter-based)
    assert np.array_equal(plan(SCHEDULE, 7, 20, 64)[:32], a[0])


def test_composition_matches_weights_within_binomial_noise():
    steps, gb = range(0, 400), 64
    counts = composition(SCHEDULE, 11, steps, gb)
    p = np.stack([SCHEDULE.weights(t) for t in steps])
    expect = (p * gb).sum(0)
    sd = np.sqrt((gb * p * (1 - p)).sum(0))
    assert counts.sum() == gb * len(steps)
    assert np.all(np.abs(counts.sum(0) - expect) <= 4.5 * sd), (counts.sum(0), expect, sd)
    # and inside the ramp alone
    ramp = range(5, 25)
    c = composition(SCHEDULE, 11, ramp, 512)[:, 1].sum()
    pr = np.array([SCHEDULE.weights(t)[1] for t in ramp])
    assert abs(c - (512 * pr).sum()) <= 4.5 * math.sqrt((512 * pr * (1 - pr)).sum())


# ---- packed samples ----------------------------------------------------------------------------
def test_packed_samples_are_windows_of_the_document_stream(datasets):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    src = PackedSource(datasets["web"], PackingConfig(seq_length=SEQ))
    docs = IndexedDataset(str(datasets["web"] / "data"))
    ds = src.dataset
    stream = np.concatenate([np.asarray(docs[int(d)]) for d in ds.document_index]).astype(np.int64)
    assert len(src) == (stream.size - 1) // SEQ
    for i in range(len(src)):
        s = src[i]
        j = int(ds.shuffle_index[i])
        window = stream[j * SEQ : j * SEQ + SEQ + 1]
        assert torch.equal(s["tokens"], torch.from_numpy(window[:-1]))
        assert torch.equal(s["labels"], torch.from_numpy(window[1:]))
        assert torch.equal(s["position_ids"], torch.arange(SEQ))
        assert (s["loss_mask"] == 1).all()
    assert torch.equal(src[len(src)]["tokens"], src[0]["tokens"])  # wraps around


def test_document_boundaries_reset_positions_attention_and_loss(datasets):
    pk = PackingConfig(seq_length=SEQ, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True,
                       create_attention_mask=True)
    src = PackedSource(datasets["web"], pk)
    eos = src.vocab.eos_id
    seen_boundary = False
    for i in range(min(len(src), 20)):
        s = src[i]
        tok, pos, mask, att = s["tokens"], s["position_ids"], s["loss_mask"], s["attention_mask"][0]
        ends = torch.nonzero(tok == eos).flatten().tolist()
        starts = [0] + [e + 1 for e in ends if e + 1 < SEQ]
        for a, b in zip(starts, starts[1:] + [SEQ], strict=True):
            assert torch.equal(pos[a:b], torch.arange(b - a))
            # a token attends (False = not masked) exactly to its own document's earlier tokens
            for q in (a, b - 1):
                visible = torch.nonzero(~att[q]).flatten()
                assert visible.tolist() == list(range(a, q + 1))
        assert (mask[tok == eos] == 0).all() and (mask[tok != eos] == 1).all()
        seen_boundary |= bool(ends)
    assert seen_boundary


# ---- the blended iterator -----------------------------------------------------------------------
def _run(it, n_micro):
    return [next(it) for _ in range(n_micro)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_resume_equals_uninterrupted(datasets):
    srcs = _sources(datasets)
    kw = dict(global_batch=16, micro_batch=4, dp_rank=1, dp_size=2, seed=3)
    full = _run(BlendedBatchIterator(srcs, SCHEDULE, **kw), 2 * 30)  # 30 steps, 2 micro-batches each
    # interrupted mid-step, state saved, fresh iterator restored
    it = BlendedBatchIterator(srcs, SCHEDULE, **kw)
    head = _run(it, 2 * 17 + 1)
    state = it.state_dict()
    assert state == {"version": 1, "seed": 3, "step": 17, "micro": 1, "global_batch": 16,
                     "consumed": state["consumed"]} and sum(state["consumed"].values()) == 17 * 16
    it2 = BlendedBatchIterator(_sources(datasets), SCHEDULE, **kw)
    it2.load_state_dict(state)
    _same(head + _run(it2, 60 - len(head)), full)
    # or from (seed, step) alone
    _same(_run(BlendedBatchIterator(srcs, SCHEDULE, start_step=12, **kw), 2 * 18), full[24:])
    assert consumed_before(SCHEDULE, 3, 17, 16).tolist() == list(state["consumed"].values())
    with pytest.raises(BatchError, match="seed"):
        BlendedBatchIterator(srcs, SCHEDULE, **{**kw, "seed": 4}).load_state_dict(state)


def test_data_parallel_ranks_partition_the_global_batch(datasets):
    srcs = _sources(datasets)
    one = BlendedBatchIterator(srcs, SCHEDULE, 16, 2, 0, 1, seed=5)
    ranks = [BlendedBatchIterator(srcs, SCHEDULE, 16, 2, r, 4, seed=5) for r in range(4)]
    for _ in range(12):
        whole = one.next_step()
        parts = [b for r in ranks for b in r.next_step()]
        for k in ("tokens", "labels", "loss_mask", "position_ids", "source"):
            assert torch.equal(torch.cat([b[k] for b in whole]), torch.cat([b[k] for b in parts])), k
    # every global sample index of a source is used once, in order
    src, idx = one.step_plan(0, np.zeros(2, dtype=np.int64))
    assert sorted(idx[src == 0].tolist()) == list(range(int((src == 0).sum())))


def test_iterator_rejects_bad_settings(datasets):
    srcs = _sources(datasets)
    with pytest.raises(BatchError, match="divisible"):
        BlendedBatchIterator(srcs, SCHEDULE, 10, 4, 0, 1)
    with pytest.raises(BatchError, match="not given"):
        BlendedBatchIterator({"web": srcs["web"]}, SCHEDULE, 8, 4)


def test_blend_modality_report_counts_exactly(datasets):
    srcs = _sources(datasets)
    it = BlendedBatchIterator(srcs, SCHEDULE, 8, 4, seed=1)
    rep = blend_balance(it, 10)
    assert rep["blend"]["tokens"] == 10 * 8 * SEQ
    assert sum(r["tokens"] for r in rep["per_source"].values()) == rep["blend"]["tokens"]
    # recount by hand from the same stream
    table = srcs["web"].vocab.modality_table()
    again = BlendedBatchIterator(srcs, SCHEDULE, 8, 4, seed=1)
    toks = torch.cat([b["tokens"] for _ in range(10) for b in again.next_step()]).reshape(-1)
    img = int((table[toks] == int(Modality.IMAGE)).sum())
    assert rep["blend"]["image"] == pytest.approx(img / toks.numel())
    b = source_balance(datasets["web"])
    assert b["text"] + b["image"] + b["special"] == pytest.approx(1.0) and b["image"] > 0.05


def test_benchmark_batches_runs(datasets):
    r = benchmark_batches({n: str(p) for n, p in datasets.items()}, seq_length=SEQ, global_batch=16, micro_batch=4,
                          steps=5, warmup_steps=1)
    assert r["tokens"] == 5 * 16 * SEQ and r["tokens_per_s_per_core"] > 1e4


@pytest.mark.parametrize("reset", [False, True])
def test_attention_mask_equals_megatrons(datasets, reset):
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    from tessera.data.batches import _attention_mask

    src = PackedSource(datasets["web"], PackingConfig(seq_length=SEQ, reset_attention_mask=reset,
                                                      create_attention_mask=True))
    eos = src.vocab.eos_id
    for i in range(min(len(src), 10)):
        tok = src[i]["tokens"]
        want, _, _ = _get_ltor_masks_and_position_ids(tok, eos, False, reset, False, True)
        assert torch.equal(src[i]["attention_mask"], want)
    edge = torch.tensor([eos, 5, eos, eos, 7, 8])
    want, _, _ = _get_ltor_masks_and_position_ids(edge, eos, False, reset, False, True)
    assert torch.equal(_attention_mask(edge, eos, reset), want)


def test_iterator_writes_the_same_masks_into_its_batch_buffer(datasets):
    pk = PackingConfig(seq_length=SEQ, reset_attention_mask=True, create_attention_mask=True)
    srcs = _sources(datasets, pk)
    it = BlendedBatchIterator(srcs, SCHEDULE, 8, 4, seed=2, start_step=10)
    src, idx = it.step_plan(10, it.consumed)
    b = next(it)
    for k in range(4):
        assert torch.equal(b["attention_mask"][k], srcs[SCHEDULE.sources[src[k]]][idx[k]]["attention_mask"])
