"""Pretokenization: counts add up to stats.json, images are <boi> + codes + <eoi>, corrupt samples
leave the good documents byte-equal, killed runs never look complete and restart cleanly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_data_raw import EXPECTED, write_corrupt_corpus
from test_data_standins import ByteTokenizer, PatchColourTokenizer

from tessera.data import pretokenize as pt
from tessera.data.pretokenize import PretokenizeError, PretokenizeOptions, is_complete, pretokenize
from tessera.data.raw import iter_documents
from tessera.data.synth import write_synth
from tessera.tokenizers.vocab import ImageSegment, TextSegment, Vocabulary


def _read(out) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(out / "data"))
    assert len(ds.document_indices) - 1 == len(ds)  # one sequence per document
    return [np.asarray(ds[i]).astype(np.int64) for i in range(len(ds))]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    return write_synth(d, 60, image_size=32, seed=1, shard_size=20, progress=False), d


def test_counts_add_up_and_images_are_well_formed(corpus, tmp_path):
    manifest, _ = corpus
    text, image = ByteTokenizer(), PatchColourTokenizer(32, 4)
    stats = pretokenize(manifest["train_pattern"], tmp_path / "tok", text, image, progress=False)
    vocab = Vocabulary.load(tmp_path / "tok")
    assert vocab == Vocabulary(256, 512, 16)
    on_disk = json.loads((tmp_path / "tok" / "stats.json").read_text())
    assert on_disk == stats
    seqs = _read(tmp_path / "tok")
    flat = np.concatenate(seqs)
    assert stats["documents"] == len(seqs) == 60
    assert stats["tokens"] == flat.size
    assert stats["text_tokens"] == int(((flat >= vocab.text_offset) & (flat < vocab.image_offset)).sum())
    assert stats["image_tokens"] == int((flat >= vocab.image_offset).sum())
    assert stats["special_tokens"] == int((flat < vocab.text_offset).sum())
    assert stats["image_tokens"] == 16 * stats["images"]
    assert sum(stats["sources"].values()) == 60 and sum(stats["skipped"].values()) == 0
    docs = list(iter_documents(manifest["train_pattern"]))
    for ids, doc in zip(seqs, docs, strict=True):
        assert ids[0] == vocab.bos_id and ids[-1] == vocab.eos_id
        assert (ids == vocab.boi_id).sum() == (ids == vocab.eoi_id).sum() == len(doc.images)
        for b in np.nonzero(ids == vocab.boi_id)[0]:  # boi + exactly tokens_per_image codes + eoi
            span = ids[b + 1 : b + 1 + 16]
            assert ((span >= vocab.image_offset) & (span < vocab.size)).all() and ids[b + 17] == vocab.eoi_id
        # lossless: decoding gives back the document's text and the image codes
        segs = vocab.decode_document(ids.tolist(), text.decode)
        want = [TextSegment(s) if isinstance(s, str) else ImageSegment.from_tensor(image.encode([s])[0])
                for s in doc.segments]
        assert segs == want


def test_workers_do_not_change_the_output(corpus, tmp_path):
    manifest, _ = corpus
    a = pretokenize(manifest["train_pattern"], tmp_path / "a", ByteTokenizer(), PatchColourTokenizer(), progress=False)
    b = pretokenize(manifest["train_pattern"], tmp_path / "b", ByteTokenizer(), PatchColourTokenizer(), workers=2,
                    progress=False)
    for f in ("data.bin", "data.idx", "vocab.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    a.pop("seconds"), b.pop("seconds")
    assert a == b


def test_corrupt_samples_skipped_good_ones_byte_equal(tmp_path):
    goods, paths = write_corrupt_corpus(tmp_path)
    opts = PretokenizeOptions(max_images=4, batch_docs=5)
    st = pretokenize([str(p) for p in paths], tmp_path / "mixed", ByteTokenizer(), PatchColourTokenizer(), options=opts,
                     progress=False)
    assert st["skipped"] == EXPECTED and st["skipped_total"] == sum(EXPECTED.values())
    # the same good documents alone
    from tessera.data.document import document_to_tar_members, write_tar

    write_tar(tmp_path / "clean.tar", [m for d in goods for m in document_to_tar_members(d)])
    pretokenize(str(tmp_path / "clean.tar"), tmp_path / "clean", ByteTokenizer(), PatchColourTokenizer(), progress=False)
    mixed, clean = _read(tmp_path / "mixed"), _read(tmp_path / "clean")
    assert len(mixed) == len(clean) == len(goods)
    for m, c in zip(mixed, clean, strict=True):
        assert m.tobytes() == c.tobytes()
    # a token limit skips (and counts) the long documents only
    longest = max(len(c) for c in clean)
    st2 = pretokenize(str(tmp_path / "clean.tar"), tmp_path / "short", ByteTokenizer(), PatchColourTokenizer(),
                      options=PretokenizeOptions(max_doc_tokens=longest - 1), progress=False)
    assert st2["skipped"]["too_long"] == sum(len(c) == longest for c in clean)
    assert st2["documents"] == len(goods) - st2["skipped"]["too_long"]


def test_killed_run_never_looks_complete_and_restart_finishes(corpus, tmp_path, monkeypatch):
    manifest, _ = corpus
    out = tmp_path / "tok"
    real = pt.pretokenize_shard
    calls = []

    def dies_on_second_shard(url, part, *a, **k):
        calls.append(url)
        if len(calls) == 2:
            # die mid-shard: leave a half-written temp part behind, like a kill would
            open(part + ".tmp.bin", "wb").write(b"\0" * 100)
            raise KeyboardInterrupt("killed")
        return real(url, part, *a, **k)

    monkeypatch.setattr(pt, "pretokenize_shard", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        pretokenize(manifest["train_pattern"], out, ByteTokenizer(), PatchColourTokenizer(), progress=False)
    assert not out.exists() and not is_complete(out)
    partial = tmp_path / "tok.partial"
    assert (partial / "parts" / "shard-000000.json").is_file()
    assert not (partial / "parts" / "shard-000001.json").exists()
    with pytest.raises(PretokenizeError, match="no stats.json"):
        pt.load_stats(partial)

    # the restart reuses the finished shard and redoes the rest
    calls.clear()
    monkeypatch.setattr(pt, "pretokenize_shard", lambda url, part, *a, **k: (calls.append(url), real(url, part, *a, **k))[1])
    stats = pretokenize(manifest["train_pattern"], out, ByteTokenizer(), PatchColourTokenizer(), progress=False)
    assert len(calls) == 2 and is_complete(out) and not partial.exists()
    ref = pretokenize(manifest["train_pattern"], tmp_path / "ref", ByteTokenizer(), PatchColourTokenizer(), progress=False)
    assert (out / "data.bin").read_bytes() == (tmp_path / "ref" / "data.bin").read_bytes()
    assert (out / "data.idx").read_bytes() == (tmp_path / "ref" / "data.idx").read_bytes()
    stats.pop("seconds"), ref.pop("seconds")
    assert stats == ref

    # a complete output is never clobbered by accident; --overwrite replaces it whole
    with pytest.raises(PretokenizeError, match="already holds a complete dataset"):
        pretokenize(manifest["train_pattern"], out, ByteTokenizer(), PatchColourTokenizer(), progress=False)
    pretokenize(manifest["train_pattern"], out, ByteTokenizer(), PatchColourTokenizer(), overwrite=True, progress=False)
    assert is_complete(out)


def test_partial_from_a_different_run_is_discarded(corpus, tmp_path):
    manifest, _ = corpus
    stale = tmp_path / "tok.partial" / "parts"
    stale.mkdir(parents=True)
    (tmp_path / "tok.partial" / "fingerprint").write_text("other")
    (stale / "shard-000000.json").write_text("{}")  # would poison the merge if reused
    st = pretokenize(manifest["train_pattern"], tmp_path / "tok", ByteTokenizer(), PatchColourTokenizer(), progress=False)
    assert st["documents"] == 60


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(PretokenizeError, match="do not exist"):
        pretokenize(str(tmp_path / "nope-{000..001}.tar"), tmp_path / "o", ByteTokenizer(), PatchColourTokenizer())


def test_make_vocab_size_divisible_by_pads_the_vocabulary_not_the_ids(corpus, tmp_path):
    manifest, _ = corpus
    text, image = ByteTokenizer(), PatchColourTokenizer(32, 4)  # 8 + 256 + 512 = 776 ids
    pretokenize(manifest["train_pattern"], tmp_path / "d", text, image, progress=False)
    pretokenize(manifest["train_pattern"], tmp_path / "p", text, image, progress=False,
                options=PretokenizeOptions(make_vocab_size_divisible_by=128))
    default, small = Vocabulary.load(tmp_path / "d"), Vocabulary.load(tmp_path / "p")
    assert (default.padded_size, small.padded_size) == (1024, 896)
    assert small.size == default.size and small.check_tensor_parallel(1) is None
    with pytest.raises(ValueError, match="not divisible by 128 x TP = 256"):
        small.check_tensor_parallel(2)  # 896 = 7 x 128 serves TP 1 only
    # the ids are the same documents, only the embedding's padding rows differ
    for f in ("data.bin", "data.idx"):
        assert (tmp_path / "d" / f).read_bytes() == (tmp_path / "p" / f).read_bytes()
    with pytest.raises(PretokenizeError, match="--make-vocab-size-divisible-by 100: expected a positive multiple of 128"):
        PretokenizeOptions(make_vocab_size_divisible_by=100)
