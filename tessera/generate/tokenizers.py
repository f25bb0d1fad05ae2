"""The text and image tokenizers that belong to a checkpoint, and where they are looked for.

Convention (docs/generation.md): a checkpoint or run directory holds its tokenizers as

    CKPT/tokenizers/text.model      sentencepiece model (TextTokenizer), or
    CKPT/tokenizers/text/           an imported Hugging Face Chameleon's tokenizer.json + hf_id_map.json
                                    (``tessera convert from-hf``; HFTextTokenizer)
    CKPT/tokenizers/image/          ImageTokenizer directory (config.json + model.safetensors)

Looked up in the checkpoint directory first, then in the run directory above ``checkpoints/``; for an
adapter checkpoint (LoRA) then in its base checkpoint's (an import's tokenizers live there).
``--text-tokenizer`` / ``--image-tokenizer`` override either.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tessera.generate.engine import GenerationError
from tessera.tokenizers.vocab import Vocabulary

TOKENIZER_DIR = "tokenizers"
TEXT_MODEL = "text.model"
TEXT_DIR = "text"  # imported checkpoints (tessera.convert): tokenizer.json + hf_id_map.json
IMAGE_DIR = "image"


@dataclass
class Tokenizers:
    """``text``: a ``TextTokenizer`` (``encode``/``decode``); ``image``: an ``ImageTokenizer`` or None
    (text-only use); ``vocab``: the unified vocabulary when not taken from the model."""

    text: Any
    image: Any | None = None
    vocab: Vocabulary | None = None

    def check(self, vocab: Vocabulary) -> None:
        """The tokenizers must be the ones the vocabulary was built from."""
        n_text = getattr(self.text, "vocab_size", None)
        if n_text is not None and n_text != vocab.num_text_tokens:
            raise GenerationError(
                f"text tokenizer has {n_text} pieces but the checkpoint's vocabulary expects "
                f"{vocab.num_text_tokens}: wrong --text-tokenizer?"
            )
        if self.image is not None:
            if self.image.num_codes != vocab.num_image_codes:
                raise GenerationError(
                    f"image tokenizer has {self.image.num_codes} codes but the vocabulary expects "
                    f"{vocab.num_image_codes}: wrong --image-tokenizer?"
                )
            if self.image.tokens_per_image != vocab.image_tokens_per_image:
                raise GenerationError(
                    f"image tokenizer makes {self.image.tokens_per_image} codes per image but the vocabulary "
                    f"expects {vocab.image_tokens_per_image}: wrong --image-tokenizer?"
                )


def _candidates(checkpoint: Path) -> list[Path]:
    dirs = [checkpoint / TOKENIZER_DIR]
    for parent in checkpoint.parents:
        if parent.name == "checkpoints":
            dirs.append(parent.parent / TOKENIZER_DIR)
            break
    dirs.append(checkpoint.parent / TOKENIZER_DIR)
    return dirs


def find_tokenizer_paths(checkpoint: str | Path, also: tuple[str | Path, ...] = ()) -> tuple[Path | None, Path | None]:
    """(text model, image dir) found by the convention, either None when absent; ``also``: more checkpoint
    directories to look in afterwards (an adapter checkpoint's base)."""
    text = image = None
    for d in [c for ckpt in (checkpoint, *also) for c in _candidates(Path(ckpt))]:
        if text is None and (d / TEXT_MODEL).is_file():
            text = d / TEXT_MODEL
        elif text is None and (d / TEXT_DIR / "tokenizer.json").is_file():
            text = d / TEXT_DIR
        if image is None and (d / IMAGE_DIR).is_dir():
            image = d / IMAGE_DIR
    return text, image


def load_tokenizers(
    checkpoint: str | Path | None,
    text: str | Path | None = None,
    image: str | Path | None = None,
    need_image: bool = True,
    device: str = "cpu",
    also: tuple[str | Path, ...] = (),
) -> Tokenizers:
    """Load the checkpoint's tokenizers (explicit paths win). ``text`` may be a sentencepiece model or
    an imported checkpoint's ``tokenizers/text/`` directory. A missing image tokenizer is an error only
    when ``need_image``."""
    from tessera.convert import load_text_tokenizer
    from tessera.tokenizers.image import ImageTokenizer

    found_text, found_image = find_tokenizer_paths(checkpoint, also) if checkpoint is not None else (None, None)
    text_path = Path(text) if text else found_text
    image_path = Path(image) if image else found_image
    where = f"{checkpoint}/{TOKENIZER_DIR}/" if checkpoint is not None else "the checkpoint"
    if text_path is None:
        raise GenerationError(
            f"no text tokenizer: expected {where}{TEXT_MODEL} (or {where}{TEXT_DIR}/ with tokenizer.json) "
            "or pass --text-tokenizer"
        )
    text_tok = load_text_tokenizer(text_path)
    image_tok = None
    if image_path is not None:
        image_tok = ImageTokenizer.load(image_path, device=device)
    elif need_image:
        raise GenerationError(f"no image tokenizer: expected {where}{IMAGE_DIR}/ or pass --image-tokenizer")
    return Tokenizers(text=text_tok, image=image_tok)
