"""Interleaved documents through the unified vocabulary with a real trained BPE model (hypothesis)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tessera.tokenizers.text import TextTokenizer
from tessera.tokenizers.text_train import train_text_tokenizer
from tessera.tokenizers.vocab import ImageSegment, Modality, Segment, TextSegment, Vocabulary

NUM_CODES, PER_IMAGE = 64, 16


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    d = tmp_path_factory.mktemp("doc_tok")
    rng = random.Random(0)
    words = ["a", "red", "circle", "left", "of", "blue", "square", "image", "shows", "3", "文字", "🙂"]
    (d / "c.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)))
    return train_text_tokenizer([d / "c.txt"], d / "bpe", 320)


@pytest.fixture(scope="module")
def vocab(tok: TextTokenizer) -> Vocabulary:
    return Vocabulary(num_text_tokens=tok.vocab_size, num_image_codes=NUM_CODES, image_tokens_per_image=PER_IMAGE)


text_seg = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=40).map(TextSegment)
image_seg = st.lists(st.integers(0, NUM_CODES - 1), min_size=PER_IMAGE, max_size=PER_IMAGE).map(
    lambda c: ImageSegment(tuple(c))
)


def normalise(segments: list[Segment]) -> list[Segment]:
    """Adjacent text segments serialise as one run of text ids, so they decode as one segment."""
    out: list[Segment] = []
    for s in segments:
        if isinstance(s, TextSegment) and out and isinstance(out[-1], TextSegment):
            out[-1] = TextSegment(out[-1].text + s.text)
        else:
            out.append(s)
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(text_seg, image_seg), max_size=6))
def test_document_roundtrip(tok: TextTokenizer, vocab: Vocabulary, doc: list[Segment]) -> None:
    ids = vocab.encode_document(doc, tok.encode)
    assert ids[0] == vocab.bos_id and ids[-1] == vocab.eos_id
    table = vocab.modality_table()
    mods = table[torch.tensor(ids, dtype=torch.long)]
    assert int((mods == Modality.IMAGE).sum()) == PER_IMAGE * sum(isinstance(s, ImageSegment) for s in doc)
    assert all(0 <= i < vocab.size for i in ids)
    back = vocab.decode_document(ids, tok.decode)
    assert back == normalise(doc)


def test_vocab_save_load_with_text_model(tok: TextTokenizer, tmp_path: Path) -> None:
    v = Vocabulary(num_text_tokens=tok.vocab_size)
    assert v.text_offset == len(v.special_tokens) and v.image_offset == v.text_offset + tok.vocab_size
    assert v.padded_size % 1024 == 0
    assert Vocabulary.load(v.save(tmp_path)) == v


def test_chameleon_sizing_rule() -> None:
    # docs/tokenizers.md: text vocab_size = 65536 - 8192 image codes - 8 specials fills 65536 exactly.
    v = Vocabulary(num_text_tokens=65536 - 8192 - 8)
    assert v.size == v.padded_size == 65536


def test_vocabulary_for_pads_to_the_asked_multiple_and_keeps_an_imported_one(tok: TextTokenizer) -> None:
    from types import SimpleNamespace

    from tessera.data.tokenizers import vocabulary_for
    from tessera.tokenizers.vocab import VocabularyError

    image = SimpleNamespace(num_codes=512, tokens_per_image=64)
    assert vocabulary_for(tok, image).pad_to_multiple_of == 1024
    v = vocabulary_for(tok, image, 128)
    assert v.padded_size % 128 == 0 and v.padded_size - v.size < 128
    # an imported Chameleon's text tokenizer carries its vocabulary: its padding is the checkpoint's
    own = SimpleNamespace(vocab=Vocabulary(num_text_tokens=100, num_image_codes=512, image_tokens_per_image=64),
                          vocab_size=100)
    assert vocabulary_for(own, image) is own.vocab and vocabulary_for(own, image, 1024) is own.vocab
    with pytest.raises(VocabularyError, match="pads to a multiple of 1024"):
        vocabulary_for(own, image, 128)
    with pytest.raises(VocabularyError, match="pad_to_multiple_of must be positive"):
        Vocabulary(num_text_tokens=10, pad_to_multiple_of=0)
