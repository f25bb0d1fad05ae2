"""What the data pipeline needs from the tokenizers (tessera/tokenizers), as Protocols.

The real ``TextTokenizer`` / ``ImageTokenizer`` satisfy these; tests may pass small stand-ins.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from PIL import Image

from tessera.tokenizers.vocab import Vocabulary, VocabularyError
from tessera.utils import default_device


@runtime_checkable
class TextTokenizerLike(Protocol):
    @property
    def vocab_size(self) -> int: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...


@runtime_checkable
class ImageTokenizerLike(Protocol):
    @property
    def num_codes(self) -> int: ...

    @property
    def tokens_per_image(self) -> int: ...

    @property
    def image_size(self) -> int: ...

    def encode(self, images: list[Image.Image]) -> torch.Tensor: ...  # LongTensor [n, tokens_per_image]


def load_text_tokenizer(path: str) -> TextTokenizerLike:
    """A sentencepiece ``.model`` (Tessera's ``TextTokenizer``) or an imported Chameleon's
    ``IMPORT/tokenizers/text`` directory (``HFTextTokenizer``: Chameleon's own BPE, in the import's ids)."""
    from tessera.convert.hf_tokenizer import load_text_tokenizer as load

    return load(path)


def load_image_tokenizer(path: str, device: str | None = None) -> ImageTokenizerLike:
    """The VQ tokenizer on ``device`` (default: cuda when present, else cpu)."""
    from tessera.tokenizers.image import ImageTokenizer

    return ImageTokenizer.load(path, device=default_device(device))


def vocabulary_for(
    text: TextTokenizerLike, image: ImageTokenizerLike, make_vocab_size_divisible_by: int | None = None
) -> Vocabulary:
    """The unified vocabulary the pretokenized ids live in. A text tokenizer that carries its own
    (an imported Chameleon's: its specials, order and padding) fixes it, so the data speaks the
    checkpoint's ids; its image sizes must then match the image tokenizer.

    ``make_vocab_size_divisible_by`` (megatron's name): the padded size's multiple, default
    ``Vocabulary.pad_to_multiple_of`` (valid for TP up to 8); a small model may pad to 128 (TP 1)."""
    own = getattr(text, "vocab", None)
    if isinstance(own, Vocabulary):
        if make_vocab_size_divisible_by not in (None, own.pad_to_multiple_of):
            raise VocabularyError(
                f"make_vocab_size_divisible_by {make_vocab_size_divisible_by}: the text tokenizer's own vocabulary "
                f"pads to a multiple of {own.pad_to_multiple_of}, which the checkpoint's embedding fixes"
            )
        got = (int(image.num_codes), int(image.tokens_per_image))
        if (own.num_image_codes, own.image_tokens_per_image) != got:
            raise VocabularyError(
                f"the text tokenizer's vocabulary has {own.num_image_codes} image codes x {own.image_tokens_per_image} "
                f"per image, the image tokenizer {got[0]} x {got[1]}: not the same checkpoint's tokenizers"
            )
        return own
    m = make_vocab_size_divisible_by
    return Vocabulary(
        num_text_tokens=int(text.vocab_size),
        num_image_codes=int(image.num_codes),
        image_tokens_per_image=int(image.tokens_per_image),
        pad_to_multiple_of=Vocabulary.pad_to_multiple_of if m is None else int(m),
    )
