"""BPE text tokenizer: a thin, lossless wrapper around a sentencepiece model.

Lossless means ``decode(encode(s)) == s`` for every Unicode string (no lone surrogates):
identity normalisation, no dummy prefix, no whitespace folding, and byte fallback so an unseen
character becomes its UTF-8 bytes instead of ``<unk>``. One wrinkle sentencepiece leaves: it
writes spaces as U+2581 ("▁") internally, so a literal "▁" in the input would come back as a
space. ``encode`` therefore emits a literal "▁" as its three UTF-8 byte pieces, which decode
back to "▁" (byte pieces bypass the meta-symbol replacement).

Only ``<unk>`` (id 0, never produced thanks to byte fallback) is reserved inside sentencepiece;
``<bos>``/``<eos>``/image markers live in the unified ``Vocabulary`` around the text range.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from tessera.utils import atomic_write_bytes

log = logging.getLogger(__name__)

META = "\u2581"  # sentencepiece's whitespace symbol
MODEL_SUFFIX = ".model"
# sentencepiece skips sentences longer than max_sentence_length bytes; we cut lines to this many characters.
_MAX_CHARS = 4096


class TextTokenizerError(ValueError):
    pass


class TextTokenizer:
    """``TextTokenizer.load("out/text.model")``; ids are sentencepiece piece ids in ``[0, vocab_size)``."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: Path | None = None) -> None:
        self.sp = processor
        self.path = path
        meta_bytes = META.encode("utf-8")
        self._meta_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in meta_bytes]
        if any(self.sp.id_to_piece(i) != f"<0x{b:02X}>" for i, b in zip(self._meta_ids, meta_bytes, strict=True)):
            raise TextTokenizerError(f"{path}: sentencepiece model was not trained with byte_fallback=True")

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        """``path`` is the ``.model`` file or the prefix it was trained with."""
        path = Path(path)
        if not path.is_file() and path.with_name(path.name + MODEL_SUFFIX).is_file():
            path = path.with_name(path.name + MODEL_SUFFIX)
        if not path.is_file():
            raise TextTokenizerError(f"{path}: no sentencepiece model file")
        sp = spm.SentencePieceProcessor()
        try:
            sp.load(str(path))
        except (OSError, RuntimeError) as exc:
            raise TextTokenizerError(f"{path}: not a sentencepiece model: {exc}") from exc
        return cls(sp, path)

    def save(self, out_prefix: str | Path) -> Path:
        """Write the model as ``out_prefix.model`` (a directory gets ``text.model``); atomic."""
        out = Path(out_prefix)
        out = out / "text.model" if out.is_dir() else out.with_name(out.name + MODEL_SUFFIX)
        return atomic_write_bytes(out, self.sp.serialized_model_proto())

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TextTokenizerError(f"encode expects str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise TextTokenizerError(f"text is not valid Unicode (lone surrogate?): {exc}") from exc
        if META not in text:
            return self.sp.encode(text)
        ids: list[int] = []
        for k, chunk in enumerate(text.split(META)):
            if k:
                ids.extend(self._meta_ids)
            if chunk:
                ids.extend(self.sp.encode(chunk))
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if all(isinstance(t, str) and META not in t for t in texts):
            for t in texts:  # same validation as encode, then one multi-threaded sentencepiece call
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise TextTokenizerError(f"text is not valid Unicode (lone surrogate?): {exc}") from exc
            return self.sp.encode(list(texts))
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        n = self.vocab_size
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise TextTokenizerError(f"piece id(s) {bad[:5]} outside [0, {n})")
        return self.sp.decode(ids)

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]


# ---- training --------------------------------------------------------------------------------


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
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = out_prefix.with_name(f".{out_prefix.name}.tmp{os.getpid()}")
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
        for suffix in (".model", ".vocab"):
            Path(str(tmp_prefix) + suffix).unlink(missing_ok=True)
        raise TextTokenizerError(f"sentencepiece training failed for {out_prefix}: {exc}") from exc
    # .vocab first, .model last: the .model file is what marks a finished tokenizer.
    for suffix in (".vocab", ".model"):
        os.replace(str(tmp_prefix) + suffix, str(out_prefix) + suffix)
    if stats["corrupt"]:
        log.warning("skipped %d corrupt sample(s) while training %s", stats["corrupt"], out_prefix)
    return TextTokenizer.load(str(out_prefix) + MODEL_SUFFIX)
