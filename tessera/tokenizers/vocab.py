"""The unified vocabulary: one id space for special tokens, text BPE pieces and image codes.

Layout (ids increase left to right)::

    [ specials | text pieces (sentencepiece ids, shifted) | image codes | padding ]
      0 ..        text_offset ..                            image_offset ..        size .. padded_size

Every id has one modality (``Modality``); ``modality_table()`` returns it as a tensor so a mask
over the vocabulary is one gather. Padding ids exist only so the embedding divides evenly across
tensor-parallel ranks (megatron's rule: a multiple of 128 x TP); they are SPECIAL and never sampled.

A document is an ordered list of ``TextSegment`` and ``ImageSegment``; it serialises as
``<bos> text... <boi> codes <eoi> text... <eos>``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from pathlib import Path

import torch

from tessera.utils import atomic_write_json

VOCAB_FILE = "vocab.json"


class Modality(IntEnum):
    TEXT = 0
    IMAGE = 1
    SPECIAL = 2


# Order fixes the ids 0..len-1. Keep <pad> at 0: megatron and HF treat 0-padding as harmless.
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<boi>", "<eoi>", "<reserved0>", "<reserved1>", "<reserved2>")
# The chat template's turn markers (tessera.data.chat, docs/finetuning.md): start and end of a turn. <reserved0>
# stays free: the native transformers export names the first reserved special <image>, its image placeholder.
TURN_START_TOKEN = "<reserved1>"
TURN_END_TOKEN = "<reserved2>"


@dataclass(frozen=True)
class TextSegment:
    text: str


@dataclass(frozen=True)
class ImageSegment:
    codes: tuple[int, ...]  # codebook indices in [0, num_image_codes), row-major over the latent grid

    @staticmethod
    def from_tensor(codes: torch.Tensor) -> ImageSegment:
        return ImageSegment(tuple(int(c) for c in codes.reshape(-1).tolist()))


Segment = TextSegment | ImageSegment


class VocabularyError(ValueError):
    pass


@dataclass(frozen=True)
class Vocabulary:
    num_text_tokens: int  # size of the sentencepiece model
    num_image_codes: int = 8192
    image_tokens_per_image: int = 1024  # latent grid h * w
    # Padded size is a multiple of this; 1024 = 128 x 8 keeps one vocabulary valid for TP in {1, 2, 4, 8},
    # so a checkpoint saved under one TP layout loads under another without resizing the embedding.
    pad_to_multiple_of: int = 1024
    special_tokens: tuple[str, ...] = field(default=SPECIAL_TOKENS)

    def __post_init__(self) -> None:
        if self.num_text_tokens <= 0 or self.num_image_codes <= 0 or self.image_tokens_per_image <= 0:
            raise VocabularyError(f"vocabulary sizes must be positive: {self}")
        if self.pad_to_multiple_of <= 0:
            raise VocabularyError(f"pad_to_multiple_of must be positive, got {self.pad_to_multiple_of}")
        for name in ("<pad>", "<bos>", "<eos>", "<boi>", "<eoi>"):
            if name not in self.special_tokens:
                raise VocabularyError(f"special token {name} missing from {self.special_tokens}")

    # ---- id ranges -------------------------------------------------------------------------
    @property
    def text_offset(self) -> int:
        return len(self.special_tokens)

    @property
    def image_offset(self) -> int:
        return self.text_offset + self.num_text_tokens

    @property
    def size(self) -> int:
        """Number of real ids (without padding)."""
        return self.image_offset + self.num_image_codes

    @property
    def padded_size(self) -> int:
        m = self.pad_to_multiple_of
        return (self.size + m - 1) // m * m

    def check_tensor_parallel(self, tp: int) -> None:
        if self.padded_size % (128 * tp):
            raise VocabularyError(
                f"padded vocabulary size {self.padded_size} is not divisible by 128 x TP = {128 * tp}; "
                f"raise pad_to_multiple_of (now {self.pad_to_multiple_of})"
            )

    def special_id(self, name: str) -> int:
        try:
            return self.special_tokens.index(name)
        except ValueError:
            raise VocabularyError(f"unknown special token {name!r}") from None

    def optional_special_id(self, name: str) -> int | None:
        """The id of special ``name``, or None where this vocabulary has no such special (an imported
        Chameleon's has only pad / bos / eos / boi / eoi)."""
        return self.special_tokens.index(name) if name in self.special_tokens else None

    @property
    def pad_id(self) -> int:
        return self.special_id("<pad>")

    @property
    def bos_id(self) -> int:
        return self.special_id("<bos>")

    @property
    def eos_id(self) -> int:
        return self.special_id("<eos>")

    @property
    def boi_id(self) -> int:
        return self.special_id("<boi>")

    @property
    def eoi_id(self) -> int:
        return self.special_id("<eoi>")

    @property
    def image_span(self) -> int:
        """Tokens one image occupies in a sequence: <boi> + codes + <eoi>."""
        return self.image_tokens_per_image + 2

    # ---- tensors ----------------------------------------------------------------------------
    def modality_table(self, padded: bool = True) -> torch.Tensor:
        """int8 [padded_size] (or [size]): the modality of every id."""
        n = self.padded_size if padded else self.size
        table = torch.full((n,), int(Modality.SPECIAL), dtype=torch.int8)
        table[self.text_offset : self.image_offset] = int(Modality.TEXT)
        table[self.image_offset : self.size] = int(Modality.IMAGE)
        return table

    def image_codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.num_image_codes):
            raise VocabularyError(f"image code out of range [0, {self.num_image_codes})")
        return codes.long() + self.image_offset

    def ids_to_image_codes(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel() and (int(ids.min()) < self.image_offset or int(ids.max()) >= self.size):
            raise VocabularyError("id outside the image-code range")
        return ids.long() - self.image_offset

    def text_piece_to_id(self, piece_ids: Sequence[int]) -> list[int]:
        return [p + self.text_offset for p in piece_ids]

    def id_to_text_piece(self, ids: Sequence[int]) -> list[int]:
        return [i - self.text_offset for i in ids]

    # ---- documents -------------------------------------------------------------------------
    def encode_document(
        self,
        segments: Sequence[Segment],
        text_encode: Callable[[str], list[int]],
        add_bos: bool = True,
        add_eos: bool = True,
    ) -> list[int]:
        """Serialise a document. ``text_encode`` maps a string to sentencepiece piece ids."""
        ids: list[int] = [self.bos_id] if add_bos else []
        for seg in segments:
            if isinstance(seg, TextSegment):
                ids.extend(self.text_piece_to_id(text_encode(seg.text)))
            elif isinstance(seg, ImageSegment):
                if len(seg.codes) != self.image_tokens_per_image:
                    raise VocabularyError(
                        f"image has {len(seg.codes)} codes, the vocabulary expects {self.image_tokens_per_image}"
                    )
                ids.append(self.boi_id)
                ids.extend(self.image_codes_to_ids(torch.tensor(seg.codes, dtype=torch.long)).tolist())
                ids.append(self.eoi_id)
            else:
                raise VocabularyError(f"unknown segment type {type(seg).__name__}")
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode_document(
        self, ids: Sequence[int], text_decode: Callable[[list[int]], str], strict: bool = True
    ) -> list[Segment]:
        """Inverse of ``encode_document``. With ``strict`` an image of the wrong length is an error;
        without it (model output) a truncated image is dropped."""
        segments: list[Segment] = []
        text: list[int] = []
        codes: list[int] | None = None

        def flush_text() -> None:
            if text:
                segments.append(TextSegment(text_decode(self.id_to_text_piece(text))))
                text.clear()

        for pos, i in enumerate(ids):
            i = int(i)
            if codes is not None:
                if i == self.eoi_id:
                    if len(codes) == self.image_tokens_per_image:
                        segments.append(ImageSegment(tuple(codes)))
                    elif strict:
                        raise VocabularyError(f"image ending at position {pos} has {len(codes)} codes")
                    codes = None
                elif self.image_offset <= i < self.size:
                    codes.append(i - self.image_offset)
                elif strict:
                    raise VocabularyError(f"id {i} at position {pos} inside an image is not an image code")
                continue
            if i == self.boi_id:
                flush_text()
                codes = []
            elif self.text_offset <= i < self.image_offset:
                text.append(i)
            elif i in (self.bos_id, self.pad_id):
                continue
            elif i == self.eos_id:
                break
            elif strict:
                raise VocabularyError(f"unexpected id {i} at position {pos} outside an image")
        if codes is not None and strict:
            raise VocabularyError("document ends inside an image")
        flush_text()
        return segments

    # ---- persistence -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["special_tokens"] = list(self.special_tokens)
        d["size"] = self.size
        d["padded_size"] = self.padded_size
        return d

    def save(self, path: str | Path) -> Path:
        """Write ``vocab.json`` (path may be a directory)."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / VOCAB_FILE
        return atomic_write_json(path, self.to_dict(), indent=2, default=None)

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        path = Path(path)
        if path.is_dir():
            path = path / VOCAB_FILE
        if not path.is_file():
            raise VocabularyError(f"{path}: no vocabulary file (expected {VOCAB_FILE})")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise VocabularyError(f"{path}: invalid JSON: {exc}") from exc
        data.pop("size", None)
        data.pop("padded_size", None)
        data["special_tokens"] = tuple(data.get("special_tokens", SPECIAL_TOKENS))
        try:
            return cls(**data)
        except TypeError as exc:
            raise VocabularyError(f"{path}: {exc}") from exc
