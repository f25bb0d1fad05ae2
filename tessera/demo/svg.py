"""A tiny inline-SVG line chart for the demo report (no plotting dependency)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi] (1, 2, 5 x 10^k steps)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    ticks = []
    v = start
    while v <= hi + 1e-9 * step:
        ticks.append(round(v, 12))
        v += step
    return ticks


def _fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 or float(v).is_integer() else f"{v:.3g}"


def line_chart(
    series: Mapping[str, Sequence[tuple[float, float]]],
    title: str = "",
    xlabel: str = "step",
    ylabel: str = "",
    width: int = 520,
    height: int = 300,
) -> str:
    """An ``<svg>`` element drawing each named series of (x, y) points as a polyline with a legend.
    Non-finite points are dropped; an empty chart says so instead of failing."""
    clean = {k: [(float(x), float(y)) for x, y in pts if math.isfinite(x) and math.isfinite(y)] for k, pts in series.items()}
    clean = {k: v for k, v in clean.items() if v}
    left, right, top, bottom = 56, 12, 28 if title else 10, 40
    pw, ph = width - left - right, height - top - bottom
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'font-family="sans-serif" font-size="11">']
    out.append(f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>')
    if title:
        out.append(f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{escape(title)}</text>')
    if not clean:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="#888">no data</text></svg>')
        return "".join(out)
    xs = [x for pts in clean.values() for x, _ in pts]
    ys = [y for pts in clean.values() for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    for t in nice_ticks(y0, y1):
        if y0 <= t <= y1:
            out.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#eee"/>')
            out.append(f'<text x="{left - 4}" y="{py(t) + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    for t in nice_ticks(x0, x1):
        if x0 <= t <= x1:
            out.append(f'<text x="{px(t):.1f}" y="{top + ph + 14}" text-anchor="middle">{_fmt(t)}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">{escape(xlabel)}</text>')
    if ylabel:
        out.append(f'<text x="12" y="{top + ph / 2}" text-anchor="middle" '
                   f'transform="rotate(-90 12 {top + ph / 2})">{escape(ylabel)}</text>')
    for i, (name, pts) in enumerate(clean.items()):
        colour = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(pts))
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" points="{coords}"/>')
        if len(pts) == 1:
            out.append(f'<circle cx="{px(pts[0][0]):.1f}" cy="{py(pts[0][1]):.1f}" r="3" fill="{colour}"/>')
        ly = top + 14 + 14 * i
        out.append(f'<line x1="{left + pw - 110}" x2="{left + pw - 92}" y1="{ly - 4}" y2="{ly - 4}" stroke="{colour}" stroke-width="2"/>')
        out.append(f'<text x="{left + pw - 88}" y="{ly}">{escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)
