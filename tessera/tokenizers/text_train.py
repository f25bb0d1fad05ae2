"""Training the BPE text tokenizer (``train_text_tokenizer``) on plain text files or raw shards.

Apart from ``text.py`` because it reads corpora through ``tessera.data.raw``: the tokenizer itself sits
below the data layer, its training above it (tests/test_import_layers.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from tessera.tokenizers.text import MODEL_SUFFIX, TextTokenizer, TextTokenizerError
from tessera.utils import atomic_prefix

log = logging.getLogger(__name__)

# sentencepiece skips sentences longer than max_sentence_length bytes; we cut lines to this many characters.
_MAX_CHARS = 4096


def iter_corpus_texts(inputs: Sequence[str | Path], stats: dict[str, int] | None = None) -> Iterator[str]:
    """Text of every input: a plain text file (as is), or the text of every document of shards and folders
    in any format ``tessera.data.raw`` reads (webdataset, parquet, JSONL, image folders with captions;
    images are not read). Bad samples are counted in ``stats['corrupt']`` and skipped."""
    from tessera.data.formats import SHARD_EXTS, SkipStats
    from tessera.data.raw import iter_texts

    stats = stats if stats is not None else {}
    stats.setdefault("corrupt", 0)
    for inp in inputs:
        path = Path(inp)
        if not path.exists() and "{" not in str(inp):
            raise TextTokenizerError(f"{path}: input file not found")
        if path.is_dir() or path.name.lower().endswith(SHARD_EXTS) or "{" in str(inp):
            skipped = SkipStats()
            try:
                yield from iter_texts(str(inp), skipped)
            except ValueError as exc:  # a parquet shard without a text column, ...
                raise TextTokenizerError(str(exc)) from exc
            stats["corrupt"] += sum(skipped.as_dict().values())
        else:
            try:
                yield path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise TextTokenizerError(f"{path}: not UTF-8 text: {exc}") from exc


def _sentences(texts: Iterator[str]) -> Iterator[str]:
    # sentencepiece trains on lines; long lines are cut so none is silently dropped by the trainer.
    for text in texts:
        for line in text.splitlines():
            for i in range(0, len(line), _MAX_CHARS):
                piece = line[i : i + _MAX_CHARS]
                if piece.strip():
                    yield piece


def train_text_tokenizer(
    inputs: Sequence[str | Path],
    out_prefix: str | Path,
    vocab_size: int,
    *,
    character_coverage: float = 0.9995,
    max_sentences: int = 0,
    seed: int = 0,
    num_threads: int = 1,
    max_piece_length: int = 16,
) -> TextTokenizer:
    """Train a byte-fallback BPE model on ``inputs`` and write ``out_prefix.model`` / ``.vocab``.

    ``vocab_size`` is a target: on a small corpus the trainer stops early (hard_vocab_limit off).
    Training is deterministic for a given corpus order and seed. ``max_sentences`` > 0 samples that
    many lines (seeded) instead of using the whole corpus.
    """
    if vocab_size < 260:
        raise TextTokenizerError(f"vocab_size {vocab_size} too small: byte fallback alone needs 257 pieces")
    if not inputs:
        raise TextTokenizerError("no input files given")
    stats: dict[str, int] = {}
    sentences = list(_sentences(iter_corpus_texts(inputs, stats)))
    if not sentences:
        raise TextTokenizerError(f"empty corpus: no text found in {[str(p) for p in inputs]}")
    out_prefix = Path(out_prefix)
    # .vocab first, .model last: the .model file is what marks a finished tokenizer.
    with atomic_prefix(out_prefix, (".vocab", ".model")) as tmp_prefix:
        spm.set_random_generator_seed(seed)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_prefix=str(tmp_prefix),
                model_type="bpe",
                vocab_size=vocab_size,
                hard_vocab_limit=False,
                byte_fallback=True,
                split_digits=True,
                normalization_rule_name="identity",
                add_dummy_prefix=False,
                remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True,
                split_by_whitespace=True,
                character_coverage=character_coverage,
                input_sentence_size=max_sentences,
                shuffle_input_sentence=max_sentences > 0,
                max_sentence_length=4 * _MAX_CHARS,
                max_sentencepiece_length=max_piece_length,
                unk_id=0,
                bos_id=-1,
                eos_id=-1,
                pad_id=-1,
                num_threads=num_threads,
                minloglevel=2,
            )
        except RuntimeError as exc:
            raise TextTokenizerError(f"sentencepiece training failed for {out_prefix}: {exc}") from exc
    if stats["corrupt"]:
        log.warning("skipped %d corrupt sample(s) while training %s", stats["corrupt"], out_prefix)
    return TextTokenizer.load(str(out_prefix) + MODEL_SUFFIX)
