"""Chameleon's (transformers / Meta) vocabulary <-> Tessera's unified Vocabulary.

Chameleon's 65536 ids do not follow Tessera's ``[specials | text | image codes | padding]`` layout:
its 8192 image codes are BPE tokens named ``IMGIMG<digits as letters>Z`` scattered among the text
ids, and ``<racm3:break>`` / ``<eoss>`` open and close an image. We **permute** ids on import instead
of teaching every consumer an id table: the imported checkpoint is a normal Tessera checkpoint
(contiguous text and image ranges, ``modality_table()``, kernels, data and generation work unchanged),
and ``IdMap`` records ``tessera id -> Chameleon id`` so ``to-hf`` restores the original order exactly.

Tessera order after import: ``<pad> <bos> <eos> <boi> <eoi>`` (Chameleon's pad/bos/eos/break/eoss),
then every other Chameleon id in increasing order as "text" (this includes ``<unk>``, the reserved
tokens and the ``<image>`` placeholder: they embed like text), then image code 0..8191, then padding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tessera.convert.errors import ConvertError
from tessera.tokenizers.vocab import Vocabulary
from tessera.utils import atomic_write_json

IMAGE_PREFIX = "IMGIMG"
HF_BOI = "<racm3:break>"  # Chameleon's begin-of-image token
HF_EOI = "<eoss>"  # Chameleon's end-of-image token
HF_IMAGE = "<image>"  # transformers' placeholder that the processor expands to the image's codes
IMPORT_SPECIALS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<boi>", "<eoi>")
IDMAP_FILE = "hf_id_map.json"


def image_token_name(code: int) -> str:
    """Chameleon's name for image code ``code``: digits spelled A-J between ``IMGIMG`` and ``Z``."""
    return IMAGE_PREFIX + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def image_code_from_name(name: str) -> int:
    """Inverse of ``image_token_name`` (same rule as transformers' ``ChameleonImageVocabularyMapping``)."""
    body = name[len(IMAGE_PREFIX) : -1]
    if not name.startswith(IMAGE_PREFIX) or not body or any(not ("A" <= c <= "J") for c in body):
        raise ConvertError(f"{name!r} is not a Chameleon image-token name")
    return int("".join(str(ord(c) - ord("A")) for c in body))


@dataclass(frozen=True)
class IdMap:
    """``tessera_to_hf[t]`` is the Chameleon id of Tessera id ``t`` (for every real Tessera id)."""

    tessera_to_hf: tuple[int, ...]
    hf_vocab_size: int

    def __post_init__(self) -> None:
        if sorted(self.tessera_to_hf) != list(range(self.hf_vocab_size)):
            raise ConvertError("id map is not a bijection onto the Chameleon vocabulary")

    def tessera_index(self) -> torch.Tensor:
        """LongTensor [size]: gather HF rows with it to get Tessera rows."""
        return torch.tensor(self.tessera_to_hf, dtype=torch.long)

    def hf_to_tessera(self) -> torch.Tensor:
        """LongTensor [hf_vocab_size]: the Tessera id of each Chameleon id."""
        inv = torch.empty(self.hf_vocab_size, dtype=torch.long)
        inv[self.tessera_index()] = torch.arange(len(self.tessera_to_hf))
        return inv

    def rows_to_tessera(self, hf_rows: torch.Tensor, padded_size: int) -> torch.Tensor:
        """Embedding / output rows in Chameleon order -> Tessera order, zero rows for padding ids."""
        if hf_rows.shape[0] != self.hf_vocab_size:
            raise ConvertError(f"expected {self.hf_vocab_size} vocabulary rows, got {hf_rows.shape[0]}")
        out = hf_rows.new_zeros((padded_size, *hf_rows.shape[1:]))
        out[: len(self.tessera_to_hf)] = hf_rows[self.tessera_index()]
        return out

    def rows_to_hf(self, rows: torch.Tensor) -> torch.Tensor:
        """Inverse of ``rows_to_tessera`` (drops padding rows)."""
        out = rows.new_empty((self.hf_vocab_size, *rows.shape[1:]))
        out[self.tessera_index()] = rows[: len(self.tessera_to_hf)]
        return out

    def to_dict(self) -> dict:
        return {"hf_vocab_size": self.hf_vocab_size, "tessera_to_hf": list(self.tessera_to_hf)}

    def save(self, directory: str | Path) -> Path:
        return atomic_write_json(Path(directory) / IDMAP_FILE, self.to_dict(), indent=None)

    @classmethod
    def load(cls, directory: str | Path) -> IdMap | None:
        path = Path(directory) / IDMAP_FILE
        if not path.is_file():
            return None
        try:
            d = json.loads(path.read_text())
            return cls(tuple(int(i) for i in d["tessera_to_hf"]), int(d["hf_vocab_size"]))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConvertError(f"{path}: unreadable id map: {exc}") from exc


def _special_id(vocabulary_map: dict[str, int], cfg_id: int | None, names: tuple[str, ...], what: str) -> int:
    if cfg_id is not None:
        return int(cfg_id)
    for n in names:
        if n in vocabulary_map:
            return int(vocabulary_map[n])
    raise ConvertError(f"config.json: no {what} id (config key or one of the tokens {list(names)} in vocabulary_map)")


def vocab_from_chameleon(
    vocabulary_map: dict[str, int],
    hf_vocab_size: int,
    image_tokens_per_image: int,
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    pad_to_multiple_of: int = 1024,
) -> tuple[Vocabulary, IdMap]:
    """Build the Tessera vocabulary and the id permutation for a Chameleon vocabulary."""
    if not vocabulary_map:
        raise ConvertError("config.json: vocabulary_map is missing or empty (it names the image tokens)")
    specials = [
        _special_id(vocabulary_map, pad_id, ("<pad>",), "pad_token_id"),
        _special_id(vocabulary_map, bos_id, ("<s>", "<bos>"), "bos_token_id"),
        _special_id(vocabulary_map, eos_id, ("</s>", "<eos>"), "eos_token_id"),
        _special_id(vocabulary_map, None, (HF_BOI,), "begin-of-image"),
        _special_id(vocabulary_map, None, (HF_EOI,), "end-of-image"),
    ]
    if len(set(specials)) != len(specials):
        raise ConvertError(f"config.json: pad/bos/eos/boi/eoi ids must differ, got {specials}")
    codes: dict[int, int] = {}
    for name, idx in vocabulary_map.items():
        if name.startswith(IMAGE_PREFIX):
            code = image_code_from_name(name)
            if code in codes:
                raise ConvertError(f"vocabulary_map: image code {code} appears twice ({name!r})")
            codes[code] = int(idx)
    n_codes = len(codes)
    if n_codes == 0 or sorted(codes) != list(range(n_codes)):
        raise ConvertError(f"vocabulary_map: image tokens must cover codes 0..N-1 exactly, found {n_codes} codes")
    used = set(specials) | set(codes.values())
    if max(used) >= hf_vocab_size:
        raise ConvertError(f"vocabulary_map has ids >= vocab_size {hf_vocab_size}")
    text = [i for i in range(hf_vocab_size) if i not in used]
    vocab = Vocabulary(
        num_text_tokens=len(text),
        num_image_codes=n_codes,
        image_tokens_per_image=image_tokens_per_image,
        pad_to_multiple_of=pad_to_multiple_of,
        special_tokens=IMPORT_SPECIALS,
    )
    order = specials + text + [codes[c] for c in range(n_codes)]
    return vocab, IdMap(tuple(order), hf_vocab_size)


def native_vocabulary_map(vocab: Vocabulary, text_pieces: list[str] | None, padded_size: int) -> dict[str, int]:
    """Names for Tessera ids in transformers' Chameleon conventions: <racm3:break>/<eoss> for boi/eoi,
    the first reserved special as <image>, IMGIMG..Z for image codes, pieces for text."""
    names = {"<pad>": "<pad>", "<bos>": "<s>", "<eos>": "</s>", "<boi>": "<racm3:break>", "<eoi>": "<eoss>"}
    vmap: dict[str, int] = {}
    image_named = False
    for i, s in enumerate(vocab.special_tokens):
        name = names.get(s, s)
        if not image_named and s.startswith("<reserved"):
            name, image_named = HF_IMAGE, True
        vmap[name] = i
    if not image_named and padded_size > vocab.size:
        vmap[HF_IMAGE] = vocab.size  # a padding id: embeds, never sampled
    for p, piece in enumerate(text_pieces or []):
        vmap.setdefault(piece, vocab.text_offset + p)
    for c in range(vocab.num_image_codes):
        vmap[image_token_name(c)] = vocab.image_offset + c
    return vmap
