"""BPE text tokenizer: exact round trip on arbitrary Unicode, batching, determinism, corpus formats, errors."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tessera.tokenizers.text import TextTokenizer, TextTokenizerError
from tessera.tokenizers.text_train import train_text_tokenizer

WORDS = ["the", "cat", "sat", "on", "a", "mat", "red", "circle", "blue", "square", "12", "2026", "日本語", "😀",
         "naïve", "  ", "tab\tbed", "line"]


def corpus_text(n_lines: int = 400, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) for _ in range(n_lines))


def write_shard(path: Path, docs: list[object], raw: dict[str, bytes] | None = None) -> Path:
    with tarfile.open(path, "w") as tf:
        for i, doc in enumerate(docs):
            data = json.dumps(doc).encode() if not isinstance(doc, bytes) else doc
            info = tarfile.TarInfo(f"{i:06d}.json")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, data in (raw or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    d = tmp_path_factory.mktemp("text_tok")
    (d / "corpus.txt").write_text(corpus_text())
    return train_text_tokenizer([d / "corpus.txt"], d / "bpe", vocab_size=400)


def test_trained_model_shape(tok: TextTokenizer) -> None:
    assert 257 < tok.vocab_size <= 400
    assert tok.sp.id_to_piece(0) == "<unk>"
    assert tok.sp.bos_id() == -1 and tok.sp.eos_id() == -1 and tok.sp.pad_id() == -1
    ids = tok.encode("the cat sat on the mat")
    assert len(ids) < len("the cat sat on the mat")  # learned merges, not bytes
    assert tok.encode("2026") == [tok.sp.piece_to_id(c) for c in "2026"]  # split_digits


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=80))
def test_roundtrip_arbitrary_unicode(tok: TextTokenizer, s: str) -> None:
    ids = tok.encode(s)
    assert all(0 < i < tok.vocab_size for i in ids)  # never <unk> (id 0)
    assert tok.decode(ids) == s


@pytest.mark.parametrize(
    "s",
    ["", " ", "   lead", "trail   ", "a  b   c", "\n", "x\n\n y\r\n", "\t\x00\x01\x7f", "😀🎉👩‍👩‍👧", "中文字符",
     "\u2581", "a\u2581 b\u2581\u2581", "e\u0301 vs é", "\ufeffbom", "ﬁ ligature", "\u200b\u200d", " " * 40],
)
def test_roundtrip_edge_cases(tok: TextTokenizer, s: str) -> None:
    assert tok.decode(tok.encode(s)) == s


def test_batch_equals_single(tok: TextTokenizer) -> None:
    texts = ["hello world", "", "  two  spaces", "with \u2581 meta", "😀 12"]
    batch = tok.encode_batch(texts)
    assert batch == [tok.encode(t) for t in texts]
    assert tok.decode_batch(batch) == texts
    plain = texts[:3]
    assert tok.encode_batch(plain) == [tok.encode(t) for t in plain]


def test_training_is_deterministic(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text(corpus_text(seed=3))
    a = train_text_tokenizer([tmp_path / "c.txt"], tmp_path / "a", 350)
    b = train_text_tokenizer([tmp_path / "c.txt"], tmp_path / "b", 350)
    assert [a.sp.id_to_piece(i) for i in range(a.vocab_size)] == [b.sp.id_to_piece(i) for i in range(b.vocab_size)]
    assert (tmp_path / "a.vocab").read_text() == (tmp_path / "b.vocab").read_text()
    assert not list(tmp_path.glob(".*tmp*"))  # temp files renamed away


def test_load_by_prefix_or_file(tok: TextTokenizer) -> None:
    assert tok.path is not None
    prefix = tok.path.with_suffix("")
    for p in (tok.path, prefix):
        assert TextTokenizer.load(p).encode("a red circle") == tok.encode("a red circle")


def test_save_copies_model(tok: TextTokenizer, tmp_path: Path) -> None:
    path = tok.save(tmp_path / "copy")
    assert path == tmp_path / "copy.model"
    assert TextTokenizer.load(path).encode("a red circle 2026") == tok.encode("a red circle 2026")
    assert tok.save(tmp_path) == tmp_path / "text.model"


def test_train_from_webdataset_shards_skips_corrupt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rng = random.Random(1)
    docs: list[object] = [
        {"segments": [{"text": " ".join(rng.choice(WORDS) for _ in range(10))}, {"image": f"{i:06d}.0.png"},
                      {"text": "a red circle on a blue square"}]}
        for i in range(60)
    ]
    docs.insert(5, b"{not json")
    docs.insert(9, {"no_segments": 1})
    shard = write_shard(tmp_path / "s-000000.tar", docs, raw={"000000.0.png": b"\x89PNG..."})
    tok = train_text_tokenizer([shard], tmp_path / "wds", 320)
    assert "skipped 3 corrupt" in caplog.text  # the bad JSON, the JSON without segments, the orphan image
    assert tok.decode(tok.encode("a red circle on a blue square")) == "a red circle on a blue square"
    assert len(tok.encode("a red circle")) < len("a red circle")


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(TextTokenizerError, match="missing.txt: input file not found"):
        train_text_tokenizer([tmp_path / "missing.txt"], tmp_path / "x", 300)
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(TextTokenizerError, match="empty corpus"):
        train_text_tokenizer([tmp_path / "empty.txt"], tmp_path / "x", 300)
    empty_shard = write_shard(tmp_path / "e.tar", [{"segments": [{"image": "x.png"}]}])
    with pytest.raises(TextTokenizerError, match="empty corpus"):
        train_text_tokenizer([empty_shard], tmp_path / "x", 300)
    with pytest.raises(TextTokenizerError, match="too small"):
        train_text_tokenizer([tmp_path / "empty.txt"], tmp_path / "x", 100)
    (tmp_path / "bad.tar").write_bytes(b"not a tar")
    with pytest.raises(TextTokenizerError, match="bad.tar"):
        train_text_tokenizer([tmp_path / "bad.tar"], tmp_path / "x", 300)
    assert not (tmp_path / "x.model").exists()
    with pytest.raises(TextTokenizerError, match="no sentencepiece model"):
        TextTokenizer.load(tmp_path / "nothing")


def test_encode_decode_errors(tok: TextTokenizer) -> None:
    with pytest.raises(TextTokenizerError, match="surrogate"):
        tok.encode("bad \ud800")
    with pytest.raises(TextTokenizerError, match="outside"):
        tok.decode([tok.vocab_size])
