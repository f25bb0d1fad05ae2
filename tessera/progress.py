"""Progress for long jobs: a log line per interval with rate and ETA (works in logs, not just TTYs)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """``with Progress("pretokenize", total=n, unit="docs") as p: p.update(k, loss=...)``."""

    def __init__(
        self,
        name: str,
        total: int | None = None,
        unit: str = "it",
        every_s: float = 2.0,
        stream: TextIO | None = None,
        enabled: bool = True,
    ) -> None:
        self.name, self.total, self.unit = name, total, unit
        self.every_s = every_s
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.count = 0
        self.start = time.perf_counter()
        self._last = 0.0

    def update(self, n: int = 1, force: bool = False, **fields: object) -> None:
        self.count += n
        now = time.perf_counter()
        if self.enabled and (force or now - self._last >= self.every_s):
            self._last = now
            self.stream.write(self.line(now, fields) + "\n")
            self.stream.flush()

    def line(self, now: float, fields: dict) -> str:
        elapsed = now - self.start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        parts = [f"[{self.name}]"]
        if self.total:
            pct = 100.0 * self.count / self.total
            eta = (self.total - self.count) / rate if rate > 0 else float("inf")
            eta_s = format_seconds(eta) if eta != float("inf") else "?"
            parts.append(f"{self.count}/{self.total} ({pct:.0f}%)")
            parts.append(f"{rate:.1f} {self.unit}/s elapsed {format_seconds(elapsed)} eta {eta_s}")
        else:
            parts.append(f"{self.count} {self.unit} {rate:.1f} {self.unit}/s elapsed {format_seconds(elapsed)}")
        for k, v in fields.items():
            parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
        return " ".join(parts)

    def close(self) -> None:
        if self.enabled:
            self.stream.write(self.line(time.perf_counter(), {}) + " done\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
