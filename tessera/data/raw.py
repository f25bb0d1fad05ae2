"""Reading raw corpora: webdataset tar shards with one JSON document and its images per sample.

Format (docs/data.md)::

    KEY.json   {"segments": [{"text": "..."}, {"image": "KEY.0.png"}, ...], "source": "..."}
    KEY.0.png  (any format PIL reads; any mode, converted to RGB)

``iter_documents`` never raises on a bad sample: it counts it under a reason in ``SkipStats``,
logs one line naming the shard and key, and moves on. Keys must not contain dots (webdataset
groups a sample's files by the name up to the first dot).
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import webdataset as wds
from PIL import Image

from tessera.data.document import Document

log = logging.getLogger("tessera.data")

# Every reason a sample can be skipped for; stats.json reports all of them (zeros included).
SKIP_REASONS: tuple[str, ...] = (
    "empty_file",  # a zero-byte member (JSON or image)
    "invalid_utf8",  # the JSON is not UTF-8
    "invalid_json",  # not JSON at all
    "bad_schema",  # JSON without a list of {"text": str} / {"image": name} segments
    "missing_json",  # image files without a KEY.json
    "missing_image",  # a segment names an image the sample does not hold
    "bad_image",  # truncated / unreadable image bytes
    "too_long",  # over a document limit (images, text characters, tokens)
    "unreadable_shard",  # the tar itself is damaged (the samples before the damage are kept)
)


@dataclass
class SkipStats:
    """Counts of skipped samples by reason (+ the good ones), mergeable across workers."""

    skipped: Counter = field(default_factory=Counter)
    documents: int = 0

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        assert reason in SKIP_REASONS, reason
        self.skipped[reason] += 1
        log.warning("skipping %s: %s%s", where, reason, f" ({detail})" if detail else "")

    def merge(self, other: SkipStats) -> None:
        self.skipped.update(other.skipped)
        self.documents += other.documents

    def as_dict(self) -> dict[str, int]:
        return {r: int(self.skipped.get(r, 0)) for r in SKIP_REASONS}


@dataclass(frozen=True)
class DocumentLimits:
    max_images: int | None = None
    max_text_chars: int | None = None


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Brace patterns ('shards/{000..099}.tar') and lists of them -> concrete shard paths."""
    if isinstance(urls, str):
        urls = [urls]
    out: list[str] = []
    for u in urls:
        out.extend(wds.shardlists.expand_urls(u))
    return out


def _load_image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()  # force a full decode so truncation is caught here, not later
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # transparent pixels over white, the usual web convention
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping everything to white
        import numpy as np

        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(a.max()), 1.0)
        return Image.fromarray((a / top * 255).clip(0, 255).astype("uint8"), "L").convert("RGB")
    return img.convert("RGB")


def parse_sample(sample: dict, stats: SkipStats, limits: DocumentLimits = DocumentLimits()) -> Document | None:
    """One webdataset sample (dict of suffix -> bytes) -> Document, or None (counted in ``stats``)."""
    key = sample.get("__key__", "?")
    where = f"{sample.get('__url__', '?')}:{key}"
    raw = sample.get("json")
    if raw is None:
        stats.skip("missing_json", where)
        return None
    if len(raw) == 0:
        stats.skip("empty_file", where, f"{key}.json")
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        stats.skip("invalid_utf8", where, str(exc))
        return None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        stats.skip("invalid_json", where, str(exc))
        return None
    segs = meta.get("segments") if isinstance(meta, dict) else None
    if not isinstance(segs, list) or not segs:
        stats.skip("bad_schema", where, "'segments' must be a non-empty list")
        return None
    out: list[str | Image.Image] = []
    n_images = 0
    n_chars = 0
    for i, seg in enumerate(segs):
        if isinstance(seg, dict) and isinstance(seg.get("text"), str) and "image" not in seg:
            out.append(seg["text"])
            n_chars += len(seg["text"])
        elif isinstance(seg, dict) and isinstance(seg.get("image"), str) and "text" not in seg:
            name = seg["image"]
            # the image file is KEY.<suffix>; webdataset stores it under <suffix>
            suffix = name[len(key) + 1 :] if name.startswith(key + ".") else name
            data = sample.get(suffix.lower())
            if data is None:
                stats.skip("missing_image", where, f"segments[{i}] names {name!r}")
                return None
            if len(data) == 0:
                stats.skip("empty_file", where, name)
                return None
            try:
                out.append(_load_image(data))
            except Exception as exc:  # PIL raises many types for bad bytes
                stats.skip("bad_image", where, f"{name}: {type(exc).__name__}: {exc}")
                return None
            n_images += 1
        else:
            stats.skip("bad_schema", where, f"segments[{i}] must be {{'text': str}} or {{'image': name}}")
            return None
    if limits.max_images is not None and n_images > limits.max_images:
        stats.skip("too_long", where, f"{n_images} images > {limits.max_images}")
        return None
    if limits.max_text_chars is not None and n_chars > limits.max_text_chars:
        stats.skip("too_long", where, f"{n_chars} text characters > {limits.max_text_chars}")
        return None
    source = meta.get("source", "")
    return Document(key=key, segments=out, source=source if isinstance(source, str) else str(source))


def _raw_samples(urls: Iterable[str], stats: SkipStats) -> Iterator[dict]:
    def on_error(exc: Exception) -> bool:
        stats.skip("unreadable_shard", str(exc.args[-1]) if exc.args else "?", f"{type(exc).__name__}: {exc}")
        return True

    src = ({"url": u} for u in urls)
    yield from wds.tariterators.tarfile_samples(src, handler=on_error)


def iter_documents(
    urls: str | Sequence[str], stats: SkipStats | None = None, limits: DocumentLimits = DocumentLimits()
) -> Iterator[Document]:
    """Parsed documents with RGB PIL images, in shard order; bad samples are counted and skipped."""
    stats = SkipStats() if stats is None else stats
    for sample in _raw_samples(expand_urls(urls), stats):
        doc = parse_sample(sample, stats, limits)
        if doc is not None:
            stats.documents += 1
            yield doc
