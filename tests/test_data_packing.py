"""Packing with document boundaries and loss masks: the batch fields against independent oracles, the
THD flattening of a micro-batch, and the loss of a document-masked packed micro-batch against the
documents run one by one through the same model (fp32, GQA, micro-batch 2)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_data_chat import write_chat_jsonl
from test_data_standins import ByteTokenizer, PatchColourTokenizer, pretokenized_synth

from tessera.data.batches import BatchError, BlendedBatchIterator, PackedSource, PackingConfig, window_parts
from tessera.data.blend import BlendSchedule
from tessera.data.pretokenize import PretokenizeOptions, pretokenize

SEQ = 64


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing")
    out = pretokenized_synth(root, (("plain", 1, 40),))
    path, _ = write_chat_jsonl(root, 36, seed=5)
    for loss_on in ("assistant", "image"):
        pretokenize([str(path)], root / f"chat_{loss_on}", ByteTokenizer(), PatchColourTokenizer(),
                    options=PretokenizeOptions(loss_on=loss_on), progress=False)
        out[f"chat_{loss_on}"] = root / f"chat_{loss_on}"
    return out


def _source(path, document_mask=False, num_samples=200, **kw):
    return PackedSource(path, PackingConfig(seq_length=SEQ, document_mask=document_mask, **kw), num_samples)


def _iterator(path, micro, document_mask=True, global_batch=8):
    src = _source(path, document_mask)
    return BlendedBatchIterator({"s": src}, BlendSchedule.constant({"s": 1.0}), global_batch, micro)


def test_window_parts_cut_megatrons_windows(data):
    src = _source(data["plain"])
    for i in range(len(src)):
        text, _ = src.dataset._query_document_sample_shuffle_indices(i)
        parts = window_parts(src.dataset, src.indexed, i)
        ours = np.concatenate([src.indexed.get(d, offset=o, length=n) for d, o, n in parts])
        assert np.array_equal(ours, text), i


def test_document_boundaries_positions_and_crossing_labels(data):
    plain, packed = _source(data["plain"]), _source(data["plain"], document_mask=True)
    eos = plain.vocab.eos_id
    multi = 0
    for i in range(len(plain)):
        a, b = plain[i], packed[i]
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["labels"], b["labels"])
        tok = b["tokens"]
        # every Tessera document ends with <eos>: a new one starts after each (oracle independent of the index)
        starts = [0] + [j + 1 for j in torch.nonzero(tok == eos).flatten().tolist() if j + 1 < SEQ]
        assert b["cu_seqlens"].tolist() == starts + [SEQ] and b["cu_seqlens"].dtype == torch.int32
        lengths = np.diff(starts + [SEQ])
        assert int(b["max_seqlen"]) == lengths.max()
        assert b["position_ids"].tolist() == [p for n in lengths for p in range(n)]
        # the label after <eos> is the next document's <bos>: not a target; every other label is
        assert torch.equal(b["loss_mask"], (tok != eos).float())
        multi += len(starts) > 1
    assert multi > len(plain) // 4  # rows do hold several documents


def test_loss_mask_dataset_is_applied_to_the_labels(data):
    src = _source(data["chat_image"])
    vocab = src.vocab
    n_targets = 0
    for i in range(len(src)):
        s = src[i]
        # --loss-on image: a label is a target exactly when it is an image code
        assert torch.equal(s["loss_mask"], (s["labels"] >= vocab.image_offset).float()), i
        n_targets += int(s["loss_mask"].sum())
    assert n_targets > 0
    # with document masking on top, the two masks multiply (crossing labels are <bos>, never codes)
    d = _source(data["chat_image"], document_mask=True)
    assert all(torch.equal(d[i]["loss_mask"], src[i]["loss_mask"]) for i in range(len(src)))


def test_micro_batch_is_flattened_to_one_thd_row(data):
    it = _iterator(data["chat_assistant"], micro=2)
    single = _source(data["chat_assistant"], document_mask=True)
    for _ in range(it.micro_per_step * 2):
        step, micro = it.step, it.micro
        src, idx = it._plan_now()
        b = next(it)
        lo = micro * 2
        rows = [single[idx[j]] for j in range(lo, lo + 2)]
        want = [0] + [c + r * SEQ for r, row in enumerate(rows) for c in row["cu_seqlens"][1:].tolist()]
        assert b["cu_seqlens"].tolist() == want and b["cu_seqlens"].dtype == torch.int32
        assert int(b["max_seqlen"]) == max(int(r["max_seqlen"]) for r in rows)
        for k in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(b[k], torch.stack([r[k] for r in rows])), (step, k)


def test_document_mask_off_gives_megatrons_samples_unchanged(data, megatron_1proc):
    from tessera.model import build_model, document_mask
    from tessera.model.config import get_preset

    src = _source(data["plain"], num_samples=None)
    for i in range(len(src)):
        ours, theirs = src[i], src.dataset[i]
        assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    it = _iterator(data["plain"], micro=2, document_mask=False)
    b = next(it)
    assert "cu_seqlens" not in b
    cfg = get_preset("tiny")
    cfg.vocab_size = src.vocab.padded_size
    model = build_model(cfg, init_seed=1)
    with torch.no_grad():
        assert torch.equal(document_mask.forward(model, b), model(b["tokens"], b["position_ids"], None))


def test_a_loss_mask_of_other_documents_is_refused(data, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    bad = tmp_path / "bad"
    shutil.copytree(data["chat_assistant"], bad, ignore=shutil.ignore_patterns("cache", "loss_mask.*"))
    masks = IndexedDataset(str(data["chat_assistant"] / "loss_mask"))
    builder = IndexedDatasetBuilder(str(bad / "loss_mask.bin"), dtype=np.uint8)
    for i in range(len(masks)):  # the same documents, the last one a token short
        m = np.asarray(masks[i])[: -1 if i == len(masks) - 1 else None]
        builder.add_document(m, [m.size])
    builder.finalize(str(bad / "loss_mask.idx"))
    with pytest.raises(BatchError, match="loss_mask: its documents and lengths differ"):
        _source(bad)


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="none")


def test_packed_loss_equals_the_documents_one_by_one(data, megatron_1proc):
    """fp32, GQA (tiny preset: 4 heads, 2 K/V groups), a micro-batch of 2 rows of several documents each:
    the masked loss sum and every parameter's gradient of the document-masked packed micro-batch equal those
    of its documents run one at a time (each with positions from 0, no other document in sight)."""
    from tessera.model import build_model, document_mask
    from tessera.model.config import get_preset

    cfg = get_preset("tiny")
    cfg.seq_length = SEQ
    cfg.init_method_std = 0.1  # attention far from uniform: masking and positions change the numbers
    it = _iterator(data["chat_assistant"], micro=2)
    cfg.vocab_size = it.vocab.padded_size
    model = build_model(cfg, init_seed=7)
    b = next(it)
    while b["loss_mask"].sum() == 0 or len(b["cu_seqlens"]) < 6:
        b = next(it)
    bounds = b["cu_seqlens"].tolist()
    assert len(bounds) - 1 > 2  # more documents than rows

    model.zero_grad()
    logits = document_mask.forward(model, b)
    assert logits.shape == (2, SEQ, cfg.vocab_size)
    packed = (_token_losses(logits, b["labels"]) * b["loss_mask"].reshape(-1)).sum()
    packed.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    flat = {k: b[k].reshape(-1) for k in ("tokens", "labels", "loss_mask")}
    ref = torch.zeros(())
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        out = model(flat["tokens"][lo:hi].view(1, -1), torch.arange(hi - lo).view(1, -1), None)
        ref = ref + (_token_losses(out, flat["labels"][lo:hi]) * flat["loss_mask"][lo:hi]).sum()
    ref.backward()
    torch.testing.assert_close(packed, ref, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)

    # the control: the same rows without document masking are a different computation
    with torch.no_grad():
        plain = _token_losses(model(b["tokens"], torch.arange(SEQ).expand(2, SEQ), None), b["labels"])
        masked = _token_losses(logits, b["labels"])
    later = torch.ones(2 * SEQ, dtype=torch.bool)
    later[: bounds[1]] = False  # the first document sees nothing else in either case
    later[SEQ : bounds[bounds.index(SEQ) + 1]] = False
    assert (plain - masked)[later].abs().min() > 1e-4 and (plain - masked)[~later].abs().max() < 1e-4



def test_document_masked_stream_resumes_exactly(data):
    it = _iterator(data["chat_assistant"], micro=2)
    for _ in range(3):
        next(it)
    state = it.state_dict()
    want = [next(it) for _ in range(5)]
    again = _iterator(data["chat_assistant"], micro=2)
    again.load_state_dict(state)
    for a, b in zip(want, (next(again) for _ in range(5)), strict=True):
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
