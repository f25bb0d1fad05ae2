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

from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from tessera.utils import atomic_write_bytes

META = "\u2581"  # sentencepiece's whitespace symbol
MODEL_SUFFIX = ".model"


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
