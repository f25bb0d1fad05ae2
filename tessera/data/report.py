"""Modality balance: the share of text, image and special tokens per source and in the blended stream."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from tessera.data.batches import BlendedBatchIterator
from tessera.data.pretokenize import load_stats
from tessera.tokenizers.vocab import Modality

KINDS = ("text", "image", "special")


def source_balance(path: str | Path) -> dict:
    """Fractions from a dataset's stats.json (exact, whole dataset)."""
    st = load_stats(path)
    n = max(1, st["tokens"])
    return {
        "tokens": st["tokens"],
        "documents": st["documents"],
        "text": st["text_tokens"] / n,
        "image": st["image_tokens"] / n,
        "special": st["special_tokens"] / n,
    }


def blend_balance(it: BlendedBatchIterator, steps: int) -> dict:
    """Measured over ``steps`` steps of this iterator's rank: per source and overall, counting the
    input tokens of every packed sample, plus each source's share of slots."""
    table = it.vocab.modality_table()
    n_src = len(it.source_names)
    counts = np.zeros((n_src, 3), dtype=np.int64)
    slots = np.zeros(n_src, dtype=np.int64)
    first = it.step
    for _ in range(steps):
        for mb in it.next_step():
            mod = table[mb["tokens"]].long()  # [micro, seq]
            for s in mb["source"].unique().tolist():
                m = mod[mb["source"] == s]
                counts[s] += torch.bincount(m.reshape(-1), minlength=3).numpy()[:3]
                slots[s] += int(m.shape[0])

    def frac(c: np.ndarray) -> dict:
        tot = max(1, int(c.sum()))
        return {k: float(c[int(getattr(Modality, k.upper()))]) / tot for k in KINDS} | {"tokens": int(c.sum())}

    return {
        "steps": [first, it.step],
        "per_source": {n: frac(counts[i]) | {"slot_share": float(slots[i] / max(1, slots.sum()))}
                       for i, n in enumerate(it.source_names)},
        "blend": frac(counts.sum(0)),
    }


def format_report(sources: Mapping[str, dict], blend: dict | None, weights: Mapping[str, float] | None = None) -> str:
    lines = [f"{'source':<16}{'tokens':>14}{'text':>8}{'image':>8}{'special':>9}"]
    for n, b in sources.items():
        lines.append(f"{n:<16}{b['tokens']:>14,}{b['text']:>8.1%}{b['image']:>8.1%}{b['special']:>9.1%}")
    if blend:
        a, b = blend["steps"]
        lines.append(f"blended stream, steps [{a}, {b}) (measured on packed samples):")
        for n, r in blend["per_source"].items():
            w = f"  weight@start {weights[n]:.3f}" if weights else ""
            lines.append(f"  {n:<14}{r['tokens']:>14,}{r['text']:>8.1%}{r['image']:>8.1%}{r['special']:>9.1%}"
                         f"  slots {r['slot_share']:.1%}{w}")
        r = blend["blend"]
        lines.append(f"  {'all':<14}{r['tokens']:>14,}{r['text']:>8.1%}{r['image']:>8.1%}{r['special']:>9.1%}")
    return "\n".join(lines)
