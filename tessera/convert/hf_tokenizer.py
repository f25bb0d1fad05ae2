"""A Hugging Face ``tokenizer.json`` behind the same interface as Tessera's sentencepiece
``TextTokenizer`` (encode / encode_batch / decode / decode_batch / vocab_size / load / save).

An imported Chameleon checkpoint keeps Chameleon's own text tokenizer. Its ids are Chameleon ids;
Tessera's data and generation code speak *text piece ids* (``vocab id - text_offset``), so the
tokenizer translates through the checkpoint's ``IdMap``.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from tessera.convert.errors import ConvertError
from tessera.convert.hf_vocab import IdMap
from tessera.tokenizers.vocab import Vocabulary

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


class HFTextTokenizer:
    """Text <-> Tessera text-piece ids through a ``tokenizers`` tokenizer.json and an ``IdMap``."""

    def __init__(self, tokenizer_file: str | Path, idmap: IdMap, vocab: Vocabulary) -> None:
        from tokenizers import Tokenizer

        self.path = Path(tokenizer_file)
        try:
            self.tokenizer = Tokenizer.from_file(str(self.path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise ConvertError(f"{self.path}: unreadable tokenizer.json: {exc}") from exc
        # Text that happens to spell "<eoss>" stays text: specials are the Vocabulary's job.
        self.tokenizer.encode_special_tokens = True
        self.idmap, self.vocab = idmap, vocab
        hf_to_t = idmap.hf_to_tessera()
        self._hf_to_piece = hf_to_t - vocab.text_offset  # valid only where it lands in the text range
        self._piece_to_hf = idmap.tessera_index()[vocab.text_offset : vocab.image_offset]

    @property
    def vocab_size(self) -> int:
        return self.vocab.num_text_tokens

    def _to_pieces(self, hf_ids: Sequence[int]) -> list[int]:
        pieces = self._hf_to_piece[torch.as_tensor(list(hf_ids), dtype=torch.long)]
        bad = (pieces < 0) | (pieces >= self.vocab_size)
        if bool(bad.any()):
            first = int(torch.as_tensor(list(hf_ids))[bad][0])
            raise ConvertError(f"{self.path}: text encodes to id {first}, which is not a text token")
        return pieces.tolist()

    def encode(self, text: str) -> list[int]:
        return self._to_pieces(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encs = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [self._to_pieces(e.ids) for e in encs]

    def decode(self, pieces: Sequence[int]) -> str:
        bad = [int(p) for p in pieces if not 0 <= int(p) < self.vocab_size]
        if bad:
            raise ConvertError(f"piece id(s) {bad[:5]} outside [0, {self.vocab_size})")
        ids = self._piece_to_hf[torch.as_tensor([int(p) for p in pieces], dtype=torch.long)].tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        return [self.decode(p) for p in batch]

    # ---- persistence: a directory with the HF tokenizer files, the id map and the vocabulary ----
    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            src = self.path.parent / name
            if src.is_file() and src.resolve() != (directory / name).resolve():
                shutil.copyfile(src, directory / name)
        self.idmap.save(directory)
        self.vocab.save(directory)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> HFTextTokenizer:
        directory = Path(directory)
        idmap = IdMap.load(directory)
        if idmap is None:
            raise ConvertError(f"{directory}: no id map (hf_id_map.json) next to tokenizer.json")
        return cls(directory / "tokenizer.json", idmap, Vocabulary.load(directory))


def copy_tokenizer_files(src_dir: Path, dst_dir: Path, names: Sequence[str] = TOKENIZER_FILES + PROCESSOR_FILES) -> list[str]:
    dst_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in names:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, dst_dir / name)
            copied.append(name)
    return copied


def load_text_tokenizer(path: str | Path):
    """The text tokenizer at ``path``: a sentencepiece ``.model`` (Tessera's ``TextTokenizer``) or a
    directory holding ``tokenizer.json`` + ``hf_id_map.json`` (an imported Chameleon: ``HFTextTokenizer``)."""
    path = Path(path)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return HFTextTokenizer.load(path)
    from tessera.tokenizers.text import TextTokenizer

    return TextTokenizer.load(path)
