"""The one reader of raw corpora: every format users have (``tessera.data.formats``), as ``Document``s.

``iter_documents(urls, stats, limits, options)`` yields documents with decoded RGB images, shard by
shard, each shard read in its own format (sniffed per shard, or ``ReaderOptions.format``). It never
raises on a bad sample: it counts it under a reason in ``SkipStats``, logs one line naming the shard
and key, and moves on. ``iter_texts`` reads the text of the same documents without decoding images
(text tokenizer training); ``index_images`` / ``load_image_ref`` give random access to every image
of folders, image files and tar shards (VQ training, whose batches are a pure function of the step).
``explain_empty`` says why a run produced no documents.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import webdataset as wds
from PIL import Image

from tessera.data.document import Document, Message
from tessera.data.formats import (
    IMAGE_EXTS,
    SHARD_EXTS,
    SKIP_REASONS,
    FormatError,
    RawDocument,
    RawImage,
    ReaderOptions,
    SkipStats,
    check_format,
    container,
    folder_images,
    iter_raw_documents,
    sniff_format,
)
from tessera.tokenizers.preprocess import open_image, to_rgb

__all__ = [
    "SKIP_REASONS", "DocumentLimits", "FormatError", "ImageRef", "RawDocument", "RawImage", "ReaderOptions",
    "SkipStats", "decode_image", "expand_urls", "explain_empty", "index_images", "iter_documents", "iter_raw",
    "iter_texts", "load_image_ref", "resolve_format",
]


DEFAULT_OPTIONS = ReaderOptions()  # auto-detected formats, half the pairs caption first


@dataclass(frozen=True)
class DocumentLimits:
    max_images: int | None = None
    max_text_chars: int | None = None


def _shards_in(directory: Path) -> list[str]:
    return sorted(str(p) for p in directory.iterdir() if p.is_file() and p.name.lower().endswith(SHARD_EXTS))


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Brace patterns ('shards/{000..099}.tar'), paths and lists of them -> concrete shards. A directory
    that holds shard files (.tar, .parquet, .jsonl) stands for them; any other directory is one
    ``folder`` shard (images + same-named .txt captions)."""
    if isinstance(urls, str | Path):
        urls = [str(urls)]
    out: list[str] = []
    for u in urls:
        for v in wds.shardlists.expand_urls(str(u)):
            inside = _shards_in(Path(v)) if os.path.isdir(v) else []
            out.extend(inside or [v])
    return out


def resolve_format(url: str, options: ReaderOptions) -> str:
    """The format ``url`` is read in: the forced one (checked against its container) or the sniffed one
    (the segments layout when nothing can be told, so its reasons say what is wrong)."""
    if options.format != "auto":
        check_format(url, options.format)
        return options.format
    return sniff_format(url) or "segments"


def decode_image(img: RawImage) -> Image.Image:
    """The one decoding: full load, EXIF orientation, RGB (transparency over white, 16-bit scaled)."""
    src = img.data if img.data is not None else img.path
    assert src is not None, img
    if img.frame is None:
        return to_rgb(open_image(src))
    with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as multi:
        multi.seek(img.frame)  # EOFError past the last frame: counted as bad_image
        multi.load()
        return to_rgb(multi.copy())


def iter_raw(urls: str | Sequence[str], stats: SkipStats, options: ReaderOptions = DEFAULT_OPTIONS
             ) -> Iterator[tuple[str, RawDocument]]:
    """(shard, document) with images still encoded, in shard order."""
    for url in expand_urls(urls):
        fmt = resolve_format(url, options)
        for doc in iter_raw_documents(url, fmt, options, stats):
            yield url, doc


def to_document(url: str, raw: RawDocument, stats: SkipStats, limits: DocumentLimits = DocumentLimits()
                ) -> Document | None:
    """Decode the images of one raw document and apply the limits; None (counted) when it fails."""
    where = f"{url}:{raw.key}"
    n_images = sum(1 for s in raw.segments if isinstance(s, RawImage))
    n_chars = sum(len(s) for s in raw.segments if isinstance(s, str))
    if limits.max_images is not None and n_images > limits.max_images:
        stats.skip("too_long", where, f"{n_images} images > {limits.max_images}")
        return None
    if limits.max_text_chars is not None and n_chars > limits.max_text_chars:
        stats.skip("too_long", where, f"{n_chars} text characters > {limits.max_text_chars}")
        return None
    segs: list[str | Image.Image] = []
    for s in raw.segments:
        if isinstance(s, str):
            segs.append(s)
            continue
        try:
            segs.append(decode_image(s))
        except Exception as exc:  # PIL raises many types for bad bytes
            stats.skip("bad_image", where, f"{s.name}: {type(exc).__name__}: {exc}")
            return None
    messages = None
    if raw.messages is not None:  # the same decoded objects, cut back into the turns
        it = iter(segs)
        messages = [Message(role, [next(it) for _ in items]) for role, items in raw.messages]
    return Document(key=raw.key, segments=segs, source=raw.source, messages=messages)


def iter_documents(
    urls: str | Sequence[str],
    stats: SkipStats | None = None,
    limits: DocumentLimits = DocumentLimits(),
    options: ReaderOptions = DEFAULT_OPTIONS,
) -> Iterator[Document]:
    """Parsed documents with RGB PIL images, in shard order; bad samples are counted and skipped."""
    stats = SkipStats() if stats is None else stats
    for url, raw in iter_raw(urls, stats, options):
        doc = to_document(url, raw, stats, limits)
        if doc is not None:
            stats.documents += 1
            yield doc


def iter_texts(urls: str | Sequence[str], stats: SkipStats | None = None,
               options: ReaderOptions = DEFAULT_OPTIONS) -> Iterator[str]:
    """The text segments of every document; images are neither decoded nor required to be there."""
    stats = SkipStats() if stats is None else stats
    for _, raw in iter_raw(urls, stats, replace(options, images=False)):
        stats.documents += 1
        yield from (s for s in raw.segments if isinstance(s, str))


def explain_empty(urls: Sequence[str], stats: SkipStats, options: ReaderOptions = DEFAULT_OPTIONS) -> str:
    """Why a run produced no documents: the counts and, when most samples failed the same way, the
    format the shards look like (a wrong ``--format``) or what the reason usually means."""
    counts = {k: v for k, v in stats.as_dict().items() if v}
    total = sum(counts.values())
    msg = f"no documents read from {len(urls)} shard(s)"
    if not total:
        return msg + ": the shards hold no samples"
    msg += f"; skipped {total}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    top, n = max(counts.items(), key=lambda kv: kv[1])
    if n * 2 <= total:
        return msg
    looks = [f for f in (sniff_format(u) for u in urls[:8]) if f]
    used = {resolve_format(u, options) for u in urls[:8]} if options.format == "auto" else {options.format}
    if looks and max(set(looks), key=looks.count) not in used:
        guess = max(set(looks), key=looks.count)
        return msg + f". These look like {guess} shards: pass --format {guess}"
    if top == "missing_image":
        return msg + ". Image URLs are never fetched: download the images first (e.g. with img2dataset)"
    if top == "missing_caption":
        return msg + ". The images have no caption: for parquet pass --text-column, for img2dataset keep KEY.txt"
    return msg


# ---- random access to single images (VQ training) ---------------------------------------------
@dataclass(frozen=True)
class ImageRef:
    """One image: a file, or a member of a tar shard at a byte offset (and a frame of a multi-frame file)."""

    path: str
    member: str | None = None
    offset: int = 0
    size: int = 0
    frame: int | None = None

    def __str__(self) -> str:
        where = f"{self.path}:{self.member}" if self.member else self.path
        return where if self.frame is None else f"{where}[{self.frame}]"


def _tar_image_refs(path: str) -> list[ImageRef]:
    refs = []
    try:
        with tarfile.open(path) as tf:
            members = sorted((m for m in tf if m.isfile() and m.name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS),
                             key=lambda m: m.name)
            for m in members:
                frames = 1
                if m.name.lower().endswith((".tif", ".tiff")):  # MINT-1T: one TIFF frame per image
                    fh = tf.extractfile(m)
                    try:
                        with Image.open(fh) as im:
                            frames = getattr(im, "n_frames", 1)
                    except Exception:
                        frames = 1  # unreadable: the loader counts it
                for f in range(frames):
                    refs.append(ImageRef(path, m.name, m.offset_data, m.size, f if frames > 1 else None))
    except tarfile.TarError as exc:
        raise FormatError(f"{path}: not a readable tar shard: {exc}") from exc
    return refs


def index_images(inputs: Sequence[str | Path]) -> list[ImageRef]:
    """Every image under ``inputs``: image files, folders of images (recursively), tar shards (image
    members of any layout), folders of tar shards and brace patterns of them; in input order, each
    folder and shard sorted. Parquet / JSONL shards are refused: random access to them would read a
    row group per image (``tessera data curate`` rewrites them as tar shards)."""
    refs: list[ImageRef] = []
    for inp in inputs:
        for u in expand_urls(str(inp)):
            p = Path(u)
            if not p.exists():
                raise FormatError(f"{p}: data path not found")
            kind = container(u)
            if kind == "dir":
                refs.extend(ImageRef(str(f)) for f in folder_images(u))
            elif p.suffix[1:].lower() in IMAGE_EXTS:
                refs.append(ImageRef(str(p)))
            elif kind == "tar" and p.suffix.lower() == ".tar":
                refs.extend(_tar_image_refs(u))
            elif kind in ("parquet", "jsonl"):
                raise FormatError(f"{p}: images are read from folders, image files and .tar shards; "
                                  "rewrite parquet / JSONL shards as tars with `tessera data curate`")
            else:
                raise FormatError(f"{p}: not an image folder, image file or .tar shard")
    if not refs:
        raise FormatError(f"no images found in {[str(i) for i in inputs]}")
    return refs


def load_image_ref(ref: ImageRef) -> Image.Image:
    """The image ``ref`` points at, decoded like every other (``decode_image``). Raises on bad bytes."""
    if ref.member is None:
        return decode_image(RawImage(Path(ref.path).name, path=ref.path, frame=ref.frame))
    with open(ref.path, "rb") as fh:
        fh.seek(ref.offset)
        data = fh.read(ref.size)
    if len(data) != ref.size:
        raise OSError(f"{ref}: shard ends inside the member")
    return decode_image(RawImage(ref.member, data, frame=ref.frame))
