"""The shard formats ``tessera.data.raw`` reads, each parsed into ``RawDocument``s (images still encoded).

| format        | container                | a document is                                                       |
|---------------|--------------------------|---------------------------------------------------------------------|
| `segments`    | webdataset .tar          | ``KEY.json {"segments": [...]}`` + the image files it names          |
| `img2dataset` | webdataset .tar          | ``KEY.{jpg,jpeg,png,webp,...}`` + caption in ``KEY.txt`` / ``KEY.json`` |
| `parquet`     | .parquet                 | a row: image (HF Image struct, bytes or a local path) + text column |
| `interleaved` | .tar, .parquet, .jsonl   | OBELICS / MINT-1T: aligned ``texts`` / ``images`` lists             |
| `folder`      | a directory              | ``NAME.{jpg,png,...}`` + ``NAME.txt`` (recursively)                  |
| `conversations` | .jsonl, .tar, .parquet | ``{"messages": [{"role", "content"}]}`` (transformers' chat format)  |

``sniff_format`` guesses a shard's format from its container and first samples; ``iter_raw_documents``
parses one shard in a given format. Every bad sample is counted under one reason (``SkipStats``) and
skipped; image URLs are never fetched (counted as ``missing_image``).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds

log = logging.getLogger("tessera.data")

# Every reason a sample can be skipped for; stats.json reports all of them (zeros included).
SKIP_REASONS: tuple[str, ...] = (
    "empty_file",  # a zero-byte member (JSON, caption or image)
    "invalid_utf8",  # JSON or caption text that is not UTF-8
    "invalid_json",  # not JSON at all
    "bad_schema",  # JSON / row without the fields its format needs, or with the wrong types
    "missing_json",  # segments layout: image files without a KEY.json
    "missing_image",  # a document names an image it does not hold (image URLs included: never fetched)
    "missing_caption",  # an image (img2dataset, parquet, folder) without caption text
    "bad_image",  # truncated / unreadable image bytes
    "too_long",  # over a document limit (images, text characters, tokens)
    "unreadable_shard",  # the shard itself is damaged (the samples before the damage are kept)
    "bad_role",  # conversations: a message whose role is not system / user / assistant
    "empty_conversation",  # conversations: no messages, or no content in any of them
    "no_targets",  # pretokenize: the loss mask (--loss-on) selects no token of the document
)

FORMATS: tuple[str, ...] = ("segments", "img2dataset", "parquet", "interleaved", "folder", "conversations")
ROLES: tuple[str, ...] = ("system", "user", "assistant")
IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
SHARD_EXTS: tuple[str, ...] = (".tar", ".parquet", ".jsonl")
URL_PREFIXES: tuple[str, ...] = ("http://", "https://", "ftp://", "s3://", "gs://", "data:")
# Column names tried in order when --image-column / --text-column are not given.
IMAGE_COLUMNS: tuple[str, ...] = ("image", "jpg", "png", "img", "image_bytes", "image_path")
TEXT_COLUMNS: tuple[str, ...] = ("text", "caption", "txt", "TEXT", "alt_text", "sentence")
CAPTION_FIELDS: tuple[str, ...] = ("caption", "text", "TEXT", "txt")


class FormatError(ValueError):
    """A shard that no format can read, or a forced format its container cannot hold."""


@dataclass
class SkipStats:
    """Counts of skipped samples by reason (+ the good ones), mergeable across workers."""

    skipped: Counter = field(default_factory=Counter)
    documents: int = 0

    def skip(self, reason: str, where: str, detail: str = "", n: int = 1) -> None:
        assert reason in SKIP_REASONS, reason
        self.skipped[reason] += n
        log.warning("skipping %s: %s%s%s", where, reason, f" ({detail})" if detail else "", f" x{n}" if n > 1 else "")

    def merge(self, other: SkipStats) -> None:
        self.skipped.update(other.skipped)
        self.documents += other.documents

    def as_dict(self) -> dict[str, int]:
        return {r: int(self.skipped.get(r, 0)) for r in SKIP_REASONS}


@dataclass(frozen=True)
class RawImage:
    """An image not decoded yet: encoded bytes, or a local file; ``frame`` of a multi-frame file."""

    name: str  # for log lines and the extension of a curated copy
    data: bytes | None = None
    path: str | None = None
    frame: int | None = None

    @property
    def ext(self) -> str:
        ext = self.name.rsplit(".", 1)[-1].lower() if "." in self.name else ""
        return ext if ext in IMAGE_EXTS else "img"


@dataclass
class RawDocument:
    key: str
    segments: list[str | RawImage]
    source: str = ""
    # conversations: (role, content) per message; ``segments`` is then the contents in order
    messages: list[tuple[str, list[str | RawImage]]] | None = None


@dataclass(frozen=True)
class ReaderOptions:
    """How shards are read. ``format``: ``auto`` (sniffed per shard) or one of ``FORMATS``.
    ``caption_first``: share of caption-image pairs written caption first (the rest image first),
    exactly floor(n * share) of every shard's first n pairs, spread evenly."""

    format: str = "auto"
    caption_first: float = 0.5
    image_column: str | None = None
    text_column: str | None = None
    images: bool = True  # False: text only (tokenizer training); image entries are neither looked up nor checked

    def __post_init__(self) -> None:
        if self.format != "auto" and self.format not in FORMATS:
            raise FormatError(f"--format {self.format!r}: expected auto or one of {', '.join(FORMATS)}")
        if not 0.0 <= self.caption_first <= 1.0:
            raise FormatError(f"--caption-first {self.caption_first}: expected a share in [0, 1]")


# ---- containers --------------------------------------------------------------------------------
def container(url: str) -> str:
    if os.path.isdir(url):
        return "dir"
    low = url.lower()
    if low.endswith(".parquet"):
        return "parquet"
    if low.endswith(".jsonl"):
        return "jsonl"
    return "tar"


CONTAINERS: dict[str, tuple[str, ...]] = {
    "segments": ("tar",),
    "img2dataset": ("tar",),
    "parquet": ("parquet",),
    "interleaved": ("tar", "parquet", "jsonl"),
    "folder": ("dir",),
    "conversations": ("jsonl", "tar", "parquet"),
}


def check_format(url: str, fmt: str) -> None:
    kind = container(url)
    if fmt != "auto" and kind not in CONTAINERS[fmt]:
        fits = [f for f, c in CONTAINERS.items() if kind in c]
        raise FormatError(f"--format {fmt} cannot read {url} (a {kind} shard); formats that can: {', '.join(fits)}")


def is_url(s: str) -> bool:
    return s.lower().startswith(URL_PREFIXES)


# ---- sniffing ----------------------------------------------------------------------------------
def _tar_sample_kind(sample: dict) -> str | None:
    meta = None
    raw = sample.get("json")
    if raw:
        try:
            meta = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            meta = None
    if isinstance(meta, dict) and "segments" in meta:
        return "segments"
    if isinstance(meta, dict) and "messages" in meta:
        return "conversations"
    if isinstance(meta, dict) and "texts" in meta and "images" in meta:
        return "interleaved"
    if any(ext in sample for ext in IMAGE_EXTS):
        return "img2dataset"
    return None


def sniff_format(url: str, samples: int = 16) -> str | None:
    """The format ``url`` looks like (by its container, columns or first samples), or None."""
    kind = container(url)
    if kind == "dir":
        return "folder"
    if kind == "jsonl":
        return _sniff_jsonl(url, samples)
    if kind == "parquet":
        try:
            import pyarrow.parquet as pq

            names = set(pq.read_schema(url).names)
        except Exception:  # pyarrow raises several types for damaged files
            return None
        if "messages" in names:
            return "conversations"
        return "interleaved" if {"texts", "images"} <= names else "parquet"
    votes: Counter = Counter()
    try:
        for i, sample in enumerate(wds.tariterators.tarfile_samples([{"url": url}], handler=wds.handlers.ignore_and_stop)):
            if i >= samples:
                break
            k = _tar_sample_kind(sample)
            if k:
                votes[k] += 1
    except Exception:  # a damaged tar: whatever was read before the damage decides
        pass
    return votes.most_common(1)[0][0] if votes else None


def _sniff_jsonl(url: str, lines: int) -> str:
    """``conversations`` when most of the first parsable lines hold ``messages``, else ``interleaved``."""
    votes: Counter = Counter()
    try:
        with open(url, "rb") as fh:
            for n, line in enumerate(fh):
                if n >= lines:
                    break
                try:
                    meta = json.loads(line)
                except (ValueError, UnicodeDecodeError):
                    continue
                if isinstance(meta, dict):
                    votes["conversations" if "messages" in meta else "interleaved"] += 1
    except OSError:
        pass
    return votes.most_common(1)[0][0] if votes else "interleaved"


# ---- per-format parsers -----------------------------------------------------------------------
def _decode_text(data: bytes, stats: SkipStats, where: str, what: str) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        stats.skip("invalid_utf8", where, f"{what}: {exc}")
        return None


def _parse_json(data: bytes, stats: SkipStats, where: str, what: str) -> object | None:
    if len(data) == 0:
        stats.skip("empty_file", where, what)
        return None
    text = _decode_text(data, stats, where, what)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        stats.skip("invalid_json", where, f"{what}: {exc}")
        return None


def tar_samples(url: str, stats: SkipStats) -> Iterator[dict]:
    """webdataset's samples of one tar (dicts of lower-cased suffix -> bytes); a damaged tar is counted once."""
    seen = []

    def on_error(exc: Exception) -> bool:
        if not seen:  # webdataset reports one damaged tar at two levels (member and sample iterators)
            stats.skip("unreadable_shard", url, f"{type(exc).__name__}: {exc}")
        seen.append(exc)
        return True

    yield from wds.tariterators.tarfile_samples([{"url": url}], handler=on_error)


def _segments_docs(url: str, opts: ReaderOptions, stats: SkipStats) -> Iterator[RawDocument]:
    for sample in tar_samples(url, stats):
        key = sample.get("__key__", "?")
        where = f"{url}:{key}"
        if sample.get("json") is None:
            stats.skip("missing_json", where)
            continue
        meta = _parse_json(sample["json"], stats, where, f"{key}.json")
        if meta is None:
            continue
        segs = meta.get("segments") if isinstance(meta, dict) else None
        if not isinstance(segs, list) or not segs:
            stats.skip("bad_schema", where, "'segments' must be a non-empty list")
            continue
        out: list[str | RawImage] = []
        for i, seg in enumerate(segs):
            if isinstance(seg, dict) and isinstance(seg.get("text"), str) and "image" not in seg:
                out.append(seg["text"])
            elif isinstance(seg, dict) and isinstance(seg.get("image"), str) and "text" not in seg:
                if not opts.images:
                    continue
                name = seg["image"]
                # the image file is KEY.<suffix>; webdataset stores it under the lower-cased <suffix>
                suffix = name[len(key) + 1 :] if name.startswith(key + ".") else name
                data = sample.get(suffix.lower())
                if data is None:
                    stats.skip("missing_image", where, f"segments[{i}] names {name!r}")
                    break
                if len(data) == 0:
                    stats.skip("empty_file", where, name)
                    break
                out.append(RawImage(name, data))
            else:
                stats.skip("bad_schema", where, f"segments[{i}] must be {{'text': str}} or {{'image': name}}")
                break
        else:
            source = meta.get("source", "")
            yield RawDocument(key, out, source if isinstance(source, str) else str(source))


class _PairOrder:
    """Caption first for exactly floor(n * share) of the first n pairs, spread evenly (Bresenham)."""

    def __init__(self, share: float) -> None:
        self.share, self.n = share, 0

    def segments(self, caption: str, image: RawImage) -> list[str | RawImage]:
        first = int((self.n + 1) * self.share) > int(self.n * self.share)
        self.n += 1
        return [caption, image] if first else [image, caption]


def _caption_from_json(meta: object) -> str | None:
    if isinstance(meta, dict):
        for f in CAPTION_FIELDS:
            if isinstance(meta.get(f), str):
                return meta[f]
    return None


def _img2dataset_docs(url: str, opts: ReaderOptions, stats: SkipStats) -> Iterator[RawDocument]:
    order = _PairOrder(opts.caption_first)
    for sample in tar_samples(url, stats):
        key = sample.get("__key__", "?")
        where = f"{url}:{key}"
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if opts.images and ext is None:
            stats.skip("missing_image", where, "no .jpg/.jpeg/.png/.webp member")
            continue
        if opts.images and len(sample[ext]) == 0:
            stats.skip("empty_file", where, f"{key}.{ext}")
            continue
        caption = None
        if sample.get("txt") is not None:
            caption = _decode_text(sample["txt"], stats, where, f"{key}.txt")
            if caption is None:
                continue
        if not (caption and caption.strip()) and sample.get("json") is not None:
            meta = _parse_json(sample["json"], stats, where, f"{key}.json")
            if meta is None:
                continue
            caption = _caption_from_json(meta)
        if not (caption and caption.strip()):
            stats.skip("missing_caption", where, f"no text in {key}.txt or a caption/text field of {key}.json")
            continue
        if not opts.images:
            yield RawDocument(key, [caption], "img2dataset")
            continue
        yield RawDocument(key, order.segments(caption, RawImage(f"{key}.{ext}", sample[ext])), "img2dataset")


def _image_cell(cell: object, base: Path, where: str, stats: SkipStats, name: str) -> RawImage | None:
    """One image cell of a row: HF Image struct {bytes, path}, raw bytes, or a path / URL string."""
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return RawImage(cell.get("path") or name, bytes(cell["bytes"]))
        cell = cell.get("path")
    if isinstance(cell, bytes | bytearray):
        if not cell:
            stats.skip("empty_file", where, name)
            return None
        return RawImage(name, bytes(cell))
    if isinstance(cell, str) and cell:
        if is_url(cell):
            stats.skip("missing_image", where, f"{cell[:80]} is a URL (images are never fetched)")
            return None
        path = Path(cell) if os.path.isabs(cell) else base / cell
        if not path.is_file():
            stats.skip("missing_image", where, f"{path}: no such file")
            return None
        return RawImage(path.name, path=str(path))
    stats.skip("bad_schema" if cell is not None else "missing_image", where, f"{name}: not image bytes or a path")
    return None


def _interleaved_row(texts: object, images: object, key: str, where: str, base: Path, stats: SkipStats,
                     opts: ReaderOptions, members: dict | None = None) -> list[str | RawImage] | None:
    """OBELICS / MINT-1T: ``texts[i]`` and ``images[i]`` aligned, one of the two null at each position.
    In a tar, an image entry names a member (``KEY.<suffix>`` or the suffix), or the k-th non-null entry
    is frame k of the document's multi-frame ``KEY.tiff`` (MINT-1T PDF / ArXiv)."""
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        stats.skip("bad_schema", where, "'texts' and 'images' must be lists of the same length")
        return None
    out: list[str | RawImage] = []
    k = 0
    for i, (t, im) in enumerate(zip(texts, images, strict=True)):
        if t is not None and not isinstance(t, str):
            stats.skip("bad_schema", where, f"texts[{i}] is not a string")
            return None
        if t:
            out.append(t)
        if im is None:
            continue
        k += 1
        if not opts.images:
            continue
        img = None
        if members is not None and isinstance(im, str) and not is_url(im):
            suffix = (im[len(key) + 1 :] if im.startswith(key + ".") else im).lower()
            if suffix in members:
                data = members[suffix]
                if not data:
                    stats.skip("empty_file", where, f"{key}.{suffix}")
                    return None
                img = RawImage(f"{key}.{suffix}", data)
            else:
                multi = next((e for e in ("tiff", "tif") if e in members), None)
                if multi is not None:
                    img = RawImage(f"{key}.{multi}", members[multi], frame=k - 1)
        if img is None:
            img = _image_cell(im, base, where, stats, f"images[{i}]")
            if img is None:
                return None
        out.append(img)
    if not out and not k:
        stats.skip("bad_schema", where, "no text and no image")
        return None
    return out


def _interleaved_tar_docs(url: str, opts: ReaderOptions, stats: SkipStats) -> Iterator[RawDocument]:
    base = Path(url).parent
    for sample in tar_samples(url, stats):
        key = sample.get("__key__", "?")
        where = f"{url}:{key}"
        if sample.get("json") is None:
            stats.skip("missing_json", where)
            continue
        meta = _parse_json(sample["json"], stats, where, f"{key}.json")
        if meta is None:
            continue
        if not isinstance(meta, dict):
            stats.skip("bad_schema", where, "expected a JSON object with 'texts' and 'images'")
            continue
        members = {k: v for k, v in sample.items() if not k.startswith("__") and k != "json"}
        segs = _interleaved_row(meta.get("texts"), meta.get("images"), key, where, base, stats, opts, members)
        if segs is not None:
            yield RawDocument(key, segs, meta.get("source") if isinstance(meta.get("source"), str) else "interleaved")


def _interleaved_jsonl_docs(url: str, opts: ReaderOptions, stats: SkipStats) -> Iterator[RawDocument]:
    base = Path(url).parent
    stem = Path(url).name.split(".")[0]
    try:
        fh = open(url, "rb")  # noqa: SIM115 (closed below; lines are read lazily)
    except OSError as exc:
        stats.skip("unreadable_shard", url, str(exc))
        return
    with fh:
        for n, line in enumerate(fh):
            if not line.strip():
                continue
            meta = _parse_json(line, stats, f"{url}:{n + 1}", f"line {n + 1}")
            if meta is None:
                continue
            if not isinstance(meta, dict):
                stats.skip("bad_schema", f"{url}:{n + 1}", "expected a JSON object with 'texts' and 'images'")
                continue
            key = str(meta.get("key") or meta.get("id") or f"{stem}-{n:08d}")
            segs = _interleaved_row(meta.get("texts"), meta.get("images"), key, f"{url}:{key}", base, stats, opts)
            if segs is not None:
                yield RawDocument(key, segs, meta.get("source") if isinstance(meta.get("source"), str) else "interleaved")


def _conversation_image(ref: object, key: str, where: str, base: Path, stats: SkipStats, what: str,
                        members: dict | None) -> RawImage | None:
    """An image part's reference: a member of the tar sample (``KEY.<suffix>`` or the suffix), a path
    relative to the shard (JSONL / parquet), or image bytes / an HF Image struct (parquet)."""
    if members is not None:
        if isinstance(ref, str) and not is_url(ref):
            suffix = (ref[len(key) + 1 :] if ref.startswith(key + ".") else ref).lower()
            data = members.get(suffix)
            if data is None:
                stats.skip("missing_image", where, f"{what} names {ref!r}, which the sample does not hold")
                return None
            if not data:
                stats.skip("empty_file", where, f"{key}.{suffix}")
                return None
            return RawImage(f"{key}.{suffix}", data)
        if isinstance(ref, str):
            stats.skip("missing_image", where, f"{what}: {ref[:80]} is a URL (images are never fetched)")
            return None
    return _image_cell(ref, base, where, stats, what)


def _conversation(meta: object, key: str, where: str, base: Path, stats: SkipStats, opts: ReaderOptions,
                  members: dict | None = None) -> list[tuple[str, list[str | RawImage]]] | None:
    """transformers' chat format: ``{"messages": [{"role": "system" | "user" | "assistant", "content": str |
    [{"type": "text", "text": str}, {"type": "image", "image": ref}]}], "images": [ref, ...]}``. An image
    part without a reference (``{"type": "image"}``, TRL's convention) takes the next entry of the top-level
    ``images`` list; every entry must be used. None (counted) when the record is bad."""
    if not isinstance(meta, dict):
        stats.skip("bad_schema", where, "expected a JSON object with 'messages'")
        return None
    msgs = meta.get("messages")
    if not isinstance(msgs, list):
        stats.skip("bad_schema", where, "'messages' must be a list of {role, content}")
        return None
    if not msgs:
        stats.skip("empty_conversation", where, "'messages' is empty")
        return None
    images = meta.get("images")
    if images is not None and not isinstance(images, list):
        stats.skip("bad_schema", where, "'images' must be a list")
        return None
    images = images or []
    used = 0
    out: list[tuple[str, list[str | RawImage]]] = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            stats.skip("bad_schema", where, f"messages[{i}] must be an object with a string 'role'")
            return None
        role = m["role"]
        if role not in ROLES:
            stats.skip("bad_role", where, f"messages[{i}].role {role[:40]!r} is not one of {', '.join(ROLES)}")
            return None
        content = m.get("content")
        parts = [] if content is None else [content] if isinstance(content, str) else content
        if not isinstance(parts, list):
            stats.skip("bad_schema", where, f"messages[{i}].content must be a string or a list of parts")
            return None
        items: list[str | RawImage] = []
        for j, part in enumerate(parts):
            what = f"messages[{i}].content[{j}]"
            if isinstance(part, str):  # a bare string part: text
                part = {"type": "text", "text": part}
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                if part["text"]:
                    items.append(part["text"])
                continue
            if kind != "image":
                stats.skip("bad_schema", where, f"{what} must be {{'type': 'text', 'text': str}} or {{'type': 'image'}}")
                return None
            ref = next((part[f] for f in ("image", "path", "url") if part.get(f) is not None), None)
            if ref is None:
                if used >= len(images):
                    stats.skip("bad_schema", where, f"{what} is an image placeholder but 'images' has no entry left")
                    return None
                ref, used = images[used], used + 1
            if not opts.images:
                continue
            img = _conversation_image(ref, key, where, base, stats, what, members)
            if img is None:
                return None
            items.append(img)
        out.append((role, items))
    if used != len(images):
        stats.skip("bad_schema", where, f"'images' lists {len(images)} images, the messages use {used}")
        return None
    if not any(items for _, items in out) and opts.images:
        stats.skip("empty_conversation", where, "no message has any content")
        return None
    return out


def _conversation_doc(key: str, messages: list[tuple[str, list[str | RawImage]]], source: object) -> RawDocument:
    segments = [item for _, items in messages for item in items]
    return RawDocument(key, segments, source if isinstance(source, str) else "conversations", messages)


def _conversation_jsonl_docs(url: str, opts: ReaderOptions, stats: SkipStats) -> Iterator[RawDocument]:
    base = Path(url).parent
    stem = Path(url).name.split(".")[0]
    try:
        fh = open(url, "rb")  # noqa: SIM115 (closed below; lines are read lazily)
    except OSError as exc:
        stats.skip("unreadable_shard", url, str(exc))
        return
    with fh:
        for n, line in enumerate(fh):
            if not line.strip():
                continue
            meta = _parse_json(line, stats, f"{url}:{n + 1}", f"line {n + 1}")
            if meta is None:
                continue
            key = str(meta.get("key") or meta.get("id") or f"{stem}-{n:08d}") if isinstance(meta, dict) else f"{stem}-{n:08d}"
            msgs = _conversation(meta, key, f"{url}:{key}", base, stats, opts)
            if msgs is not None:
                yield _conversation_doc(key, msgs, meta.get("source"))


def _conversation_tar_docs(url: str, opts: ReaderOptions, stats: SkipStats) -> Iterator[RawDocument]:
    base = Path(url).parent
    for sample in tar_samples(url, stats):
        key = sample.get("__key__", "?")
        where = f"{url}:{key}"
        if sample.get("json") is None:
            stats.skip("missing_json", where)
            continue
        meta = _parse_json(sample["json"], stats, where, f"{key}.json")
        if meta is None:
            continue
        members = {k: v for k, v in sample.items() if not k.startswith("__") and k != "json"}
        msgs = _conversation(meta, key, where, base, stats, opts, members)
        if msgs is not None:
            yield _conversation_doc(key, msgs, meta.get("source"))


def _conversation_parquet_docs(url: str, opts: ReaderOptions, stats: SkipStats) -> Iterator[RawDocument]:
    names = _parquet_columns(url, stats)
    if names is None:
        return
    if "messages" not in names:
        raise FormatError(f"{url}: no column 'messages'; conversations need it (columns: {names})")
    base, stem = Path(url).parent, Path(url).name.split(".")[0]
    key_col = next((c for c in ("key", "id") if c in names), None)
    cols = ["messages"] + [c for c in ("images", "source") if c in names] + ([key_col] if key_col else [])
    for n, row in enumerate(_parquet_batches(url, cols, stats)):
        key = str(row[key_col]) if key_col and row.get(key_col) is not None else f"{stem}-{n:08d}"
        msgs = _conversation(row, key, f"{url}:{key}", base, stats, opts)
        if msgs is not None:
            yield _conversation_doc(key, msgs, row.get("source"))


def _parquet_batches(url: str, columns: list[str], stats: SkipStats, batch_rows: int = 64) -> Iterator[dict]:
    """Rows (dicts) of the given columns, ``batch_rows`` at a time: never the whole file in memory."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(url)
        for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
            yield from batch.to_pylist()
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError / ... for damaged files
        stats.skip("unreadable_shard", url, f"{type(exc).__name__}: {exc}")


def _parquet_columns(url: str, stats: SkipStats) -> list[str] | None:
    import pyarrow.parquet as pq

    try:
        return list(pq.read_schema(url).names)
    except Exception as exc:
        stats.skip("unreadable_shard", url, f"{type(exc).__name__}: {exc}")
        return None


def _pick(names: list[str], given: str | None, candidates: tuple[str, ...], what: str, url: str) -> str:
    if given is not None:
        if given not in names:
            raise FormatError(f"{url}: no column {given!r} (--{what}-column); columns: {names}")
        return given
    for c in candidates:
        if c in names:
            return c
    raise FormatError(f"{url}: no {what} column among {list(candidates)}; pass --{what}-column (columns: {names})")


def _parquet_pair_docs(url: str, opts: ReaderOptions, stats: SkipStats) -> Iterator[RawDocument]:
    names = _parquet_columns(url, stats)
    if names is None:
        return
    img_col = _pick(names, opts.image_column, IMAGE_COLUMNS, "image", url)
    txt_col = _pick(names, opts.text_column, TEXT_COLUMNS, "text", url)
    key_col = "key" if "key" in names else None
    base, stem = Path(url).parent, Path(url).name.split(".")[0]
    order = _PairOrder(opts.caption_first)
    cols = [img_col, txt_col] + ([key_col] if key_col else [])
    for n, row in enumerate(_parquet_batches(url, cols, stats)):
        key = str(row[key_col]) if key_col and row.get(key_col) is not None else f"{stem}-{n:08d}"
        where = f"{url}:{key}"
        caption = row.get(txt_col)
        if caption is not None and not isinstance(caption, str):
            stats.skip("bad_schema", where, f"column {txt_col!r} is not a string")
            continue
        img = _image_cell(row.get(img_col), base, where, stats, f"{key}.{img_col}") if opts.images else None
        if opts.images and img is None:
            continue
        if not (caption and caption.strip()):
            stats.skip("missing_caption", where, f"empty column {txt_col!r}")
            continue
        yield RawDocument(key, order.segments(caption, img) if img else [caption], "parquet")


def _interleaved_parquet_docs(url: str, opts: ReaderOptions, stats: SkipStats) -> Iterator[RawDocument]:
    names = _parquet_columns(url, stats)
    if names is None:
        return
    for need in ("texts", "images"):
        if need not in names:
            raise FormatError(f"{url}: no column {need!r}; interleaved parquet needs 'texts' and 'images' (columns: {names})")
    base, stem = Path(url).parent, Path(url).name.split(".")[0]
    key_col = next((c for c in ("key", "id") if c in names), None)
    cols = ["texts", "images"] + ([key_col] if key_col else [])
    for n, row in enumerate(_parquet_batches(url, cols, stats)):
        key = str(row[key_col]) if key_col and row.get(key_col) is not None else f"{stem}-{n:08d}"
        segs = _interleaved_row(row.get("texts"), row.get("images"), key, f"{url}:{key}", base, stats, opts)
        if segs is not None:
            yield RawDocument(key, segs, "interleaved")


def folder_images(root: str) -> list[Path]:
    """Image files under ``root`` (recursively), sorted."""
    return sorted(p for p in Path(root).rglob("*") if p.is_file() and p.suffix[1:].lower() in IMAGE_EXTS)


def _folder_docs(url: str, opts: ReaderOptions, stats: SkipStats) -> Iterator[RawDocument]:
    root = Path(url)
    order = _PairOrder(opts.caption_first)
    images = folder_images(url)
    stems = {p.with_suffix("") for p in images}
    for txt in sorted(root.rglob("*.txt")):
        if txt.with_suffix("") not in stems:
            stats.skip("missing_image", str(txt), "a caption without an image file of the same name")
    for p in images:
        key = str(p.relative_to(root).with_suffix(""))
        where = f"{url}:{key}"
        txt = p.with_suffix(".txt")
        if not txt.is_file():
            stats.skip("missing_caption", where, f"no {txt.name}")
            continue
        if opts.images and p.stat().st_size == 0:
            stats.skip("empty_file", where, p.name)
            continue
        caption = _decode_text(txt.read_bytes(), stats, where, txt.name)
        if caption is None:
            continue
        if not caption.strip():
            stats.skip("missing_caption", where, f"{txt.name} is empty")
            continue
        img = RawImage(p.name, path=str(p))
        yield RawDocument(key, order.segments(caption, img) if opts.images else [caption], "folder")


def iter_raw_documents(url: str, fmt: str, opts: ReaderOptions, stats: SkipStats) -> Iterator[RawDocument]:
    """The documents of one shard read as ``fmt`` (not ``auto``), images still encoded."""
    check_format(url, fmt)
    if fmt == "segments":
        yield from _segments_docs(url, opts, stats)
    elif fmt == "img2dataset":
        yield from _img2dataset_docs(url, opts, stats)
    elif fmt == "parquet":
        yield from _parquet_pair_docs(url, opts, stats)
    elif fmt == "folder":
        yield from _folder_docs(url, opts, stats)
    elif fmt == "conversations":
        kind = container(url)
        yield from (_conversation_jsonl_docs if kind == "jsonl" else _conversation_parquet_docs if kind == "parquet"
                    else _conversation_tar_docs)(url, opts, stats)
    elif container(url) == "parquet":
        yield from _interleaved_parquet_docs(url, opts, stats)
    elif container(url) == "jsonl":
        yield from _interleaved_jsonl_docs(url, opts, stats)
    else:
        yield from _interleaved_tar_docs(url, opts, stats)
