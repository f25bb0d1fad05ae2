"""Printing and saving benchmark results: a fixed-width table on stdout, JSON written atomically."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tessera.utils import atomic_write_json


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:  # NaN
            return "-"
        if abs(v) >= 1e5:
            return f"{v:,.0f}"
        return f"{v:.4g}"
    if v is None:
        return "-"
    return str(v)


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None, title: str = "") -> str:
    if not rows:
        return f"{title}\n(no rows)" if title else "(no rows)"
    cols = list(columns or [k for k in rows[0] if not isinstance(rows[0][k], (dict, list))])
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = [title] if title else []
    lines.append("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def write_json(path: str | Path, payload: dict) -> Path:
    """A benchmark's JSON, written atomically (``tessera.utils.atomic_write_json``)."""
    return atomic_write_json(path, payload, trailing_newline=True)


def emit(text: str) -> None:
    sys.stdout.write(text.rstrip("\n") + "\n")
    sys.stdout.flush()
