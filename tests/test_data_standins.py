"""Tiny deterministic tokenizers implementing tessera.data.tokenizers' protocols, for fast data tests.
(No tests here; the data tests import these. The end-to-end test uses the real tokenizers.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


class ByteTokenizer:
    """UTF-8 bytes as pieces: exact, no training, vocab 256."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class PatchColourTokenizer:
    """Each patch of a grid x grid split becomes its mean colour quantised to 3 bits per channel."""

    def __init__(self, image_size: int = 32, grid: int = 4) -> None:
        self.image_size, self.grid = image_size, grid

    @property
    def num_codes(self) -> int:
        return 512

    @property
    def tokens_per_image(self) -> int:
        return self.grid * self.grid

    def encode(self, images: list[Image.Image]) -> torch.Tensor:
        out = []
        for im in images:
            a = np.asarray(im.convert("RGB").resize((self.image_size, self.image_size)), dtype=np.float64)
            p = self.image_size // self.grid
            m = a.reshape(self.grid, p, self.grid, p, 3).mean((1, 3))
            q = np.clip((m / 32).astype(np.int64), 0, 7)
            out.append(torch.from_numpy(q[..., 0] * 64 + q[..., 1] * 8 + q[..., 2]).reshape(-1))
        return torch.stack(out) if out else torch.zeros(0, self.tokens_per_image, dtype=torch.long)


def pretokenized_synth(root: Path, sets: tuple[tuple[str, int, int], ...]) -> dict[str, Path]:
    """Per (name, seed, documents): a synthetic corpus of 32 px documents pretokenized with the stand-ins
    into ``root / name``; returns {name: that directory}."""
    from tessera.data.pretokenize import pretokenize
    from tessera.data.synth import write_synth

    out = {}
    for name, seed, docs in sets:
        m = write_synth(root / f"raw_{name}", docs, image_size=32, seed=seed, shard_size=100, progress=False)
        pretokenize(m["train_pattern"], root / name, ByteTokenizer(), PatchColourTokenizer(), progress=False)
        out[name] = root / name
    return out
