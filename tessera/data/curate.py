"""``tessera data curate``: filter and deduplicate raw shards of any format into segments-layout shards
(conversations into the conversations layout, so they stay conversations).

Per document, in this order (a dropped document is counted under the first filter it fails):

1. image filters, on every image of the document: ``min_side``, ``max_aspect``, ``min_colours`` (distinct
   RGB colours), ``min_entropy`` (grey-level entropy in bits) -- blank and tiny images;
2. text filters, on the document's text (its text segments joined): ``min_text_chars``,
   ``max_text_chars``, ``max_repeat_ratio`` (share of characters in runs of 3+ equal characters),
   ``max_nonprintable_ratio``; ``languages`` (py3langid, which ships its model, when installed);
3. ``scorer``: a user-supplied image-caption alignment scorer (TorchScript file or ``module:function``),
   on documents with one image and some text; ``min_score`` drops the low ones;
4. across all shards of the run, in shard order (the first occurrence is kept): exact duplicate text
   (``dedup_text``), exact duplicate images (``dedup_images``: hash of the decoded pixels) and near
   duplicates (``near_dup_hamming``: 64-bit DCT perceptual hashes within that Hamming distance).

Shards are filtered in parallel (``workers``), each into a part tar + its signatures; deduplication
then walks the parts in shard order, so the result does not depend on the worker count. Kept documents
keep their encoded image bytes (no re-encoding) and are written as ``OUT/curated-NNNNNN.tar`` with
``OUT/stats.json`` (counts per filter, see docs/data.md) and ``OUT/report.md``; the work happens in
``OUT.partial`` which is renamed at the end.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import multiprocessing as mp
import os
import shutil
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tessera.data.document import Message, conversation_to_tar_members, segments_to_tar_members, write_tar
from tessera.data.formats import (
    RawDocument,
    RawImage,
    ReaderOptions,
    SkipStats,
    iter_raw_documents,
    tar_samples,
)
from tessera.data.raw import expand_urls, explain_empty, resolve_format, to_document
from tessera.progress import Progress
from tessera.tokenizers.preprocess import fit_image, pixels
from tessera.utils import atomic_write_json, swap_in_dir

STATS_FILE = "stats.json"
REPORT_FILE = "report.md"
# stats.json "filtered" keys, in the order the filters run
FILTERS: tuple[str, ...] = (
    "image_too_small", "image_aspect", "image_few_colours", "image_low_entropy",
    "text_too_short", "text_too_long", "text_repetitive", "text_nonprintable", "language",
    "alignment", "duplicate_text", "duplicate_image", "near_duplicate_image",
)


class CurateError(RuntimeError):
    pass


@dataclass(frozen=True)
class CurateConfig:
    # image filters (None / 0: off)
    min_side: int = 0
    max_aspect: float | None = None
    min_colours: int = 0
    min_entropy: float = 0.0
    # text filters
    min_text_chars: int = 0
    max_text_chars: int | None = None
    max_repeat_ratio: float | None = None
    max_nonprintable_ratio: float | None = None
    languages: tuple[str, ...] = ()  # ISO 639-1 codes; empty: no language filter
    min_language_score: float = 0.5
    # alignment scorer
    scorer: str | None = None  # TorchScript file, or module:function
    min_score: float | None = None
    scorer_image_size: int = 224
    scorer_batch: int = 32
    # deduplication across the run
    dedup_text: bool = True
    dedup_images: bool = True
    near_dup_hamming: int = 4  # < 0: off
    # output
    shard_size: int = 1000

    def __post_init__(self) -> None:
        if self.scorer is None and self.min_score is not None:
            raise CurateError("--min-score needs --scorer")
        if self.near_dup_hamming > 32:
            raise CurateError(f"--near-dup-hamming {self.near_dup_hamming}: at most 32 of the 64 hash bits")
        if self.shard_size <= 0:
            raise CurateError("--shard-size must be positive")


# ---- measures --------------------------------------------------------------------------------
_DCT = None


def _dct_matrix(n: int = 32) -> np.ndarray:
    k, i = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return np.cos(np.pi * (2 * i + 1) * k / (2 * n))


def phash(img: Image.Image) -> int:
    """64-bit perceptual hash (pHash): grey 32 x 32 (LANCZOS), 2-D DCT-II, the 8 x 8 lowest frequencies
    compared with their median. Near-identical pictures (rescaled, recompressed) differ in a few bits."""
    global _DCT
    if _DCT is None:
        _DCT = _dct_matrix(32)
    a = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT @ a @ _DCT.T)[:8, :8].reshape(-1)
    bits = low > np.median(low)
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def pixel_hash(img: Image.Image) -> str:
    return hashlib.sha1(f"{img.size}".encode() + img.tobytes()).hexdigest()[:20]


def normalise_text(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split())


def text_hash(text: str) -> str:
    return hashlib.sha1(normalise_text(text).encode("utf-8")).hexdigest()[:20]


def _small(img: Image.Image, side: int = 128) -> Image.Image:
    # counted on at most 128 x 128 pixels (NEAREST adds no colours): blank images stay blank
    return img if max(img.size) <= side else img.resize((min(side, img.width), min(side, img.height)),
                                                        Image.Resampling.NEAREST)


def has_colours(img: Image.Image, n: int) -> bool:
    """At least ``n`` distinct RGB colours (Pillow stops counting past n - 1)."""
    return n <= 1 or _small(img).convert("RGB").getcolors(n - 1) is None


def grey_entropy(img: Image.Image) -> float:
    """Shannon entropy (bits) of the grey-level histogram: 0 for a flat image, 8 at most."""
    h = np.asarray(_small(img).convert("L").histogram(), dtype=np.float64)
    p = h[h > 0] / h.sum()
    return float(-(p * np.log2(p)).sum())


def repeat_ratio(text: str) -> float:
    """Share of characters inside runs of 3 or more equal characters ('!!!!!!', 'aaaa')."""
    if not text:
        return 0.0
    inside, run = 0, 1
    for a, b in zip(text, text[1:], strict=False):
        if a == b:
            run += 1
        else:
            inside += run if run >= 3 else 0
            run = 1
    inside += run if run >= 3 else 0
    return inside / len(text)


def nonprintable_ratio(text: str) -> float:
    """Share of characters that are neither printable nor ordinary whitespace (U+FFFD counts: mojibake)."""
    if not text:
        return 0.0
    bad = sum(1 for c in text if (not c.isprintable() and c not in "\n\t\r") or c == "\ufffd")
    return bad / len(text)


# ---- optional models: language identifier and alignment scorer ---------------------------------
def load_language_identifier() -> Callable[[str], tuple[str, float]]:
    """py3langid (langid.py's model, shipped inside the package; nothing is downloaded)."""
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError as exc:
        raise CurateError("--language needs the py3langid package (it ships its model): pip install py3langid") from exc
    ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return lambda text: tuple(ident.classify(text))  # type: ignore[return-value]


def load_scorer(spec: str, image_size: int = 224) -> Callable[[list[Image.Image], list[str]], list[float]]:
    """``scorer(images, texts) -> scores``. A TorchScript file gets ``(pixels [n, 3, S, S] float in [0, 1],
    texts: List[str]) -> Tensor[n]`` (images through the one preprocessing, ``fit_image``); a
    ``module:function`` gets the PIL images and texts and returns n floats."""
    path = Path(spec)
    if path.is_file():
        import torch

        try:
            module = torch.jit.load(str(path), map_location="cpu").eval()
        except (RuntimeError, ValueError) as exc:
            raise CurateError(f"--scorer {spec}: not a TorchScript module: {exc}") from exc

        def run(images: list[Image.Image], texts: list[str]) -> list[float]:
            x = torch.stack([torch.from_numpy(pixels(fit_image(im, image_size))) for im in images]).float() / 255.0
            with torch.inference_mode():
                return [float(s) for s in module(x, texts).reshape(-1).tolist()]

        return run
    mod, sep, fn = spec.partition(":")
    if not sep or not mod or not fn:
        raise CurateError(f"--scorer {spec!r}: expected a TorchScript file or module:function")
    try:
        func = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as exc:
        raise CurateError(f"--scorer {spec}: cannot import: {exc}") from exc
    return lambda images, texts: [float(s) for s in func(images, texts)]


# ---- one document ----------------------------------------------------------------------------
def first_failing_filter(images: Sequence[Image.Image], text: str, cfg: CurateConfig,
                         language: Callable[[str], tuple[str, float]] | None = None) -> str | None:
    """The local filter (image, text, language) the document fails first, or None."""
    for im in images:
        w, h = im.size
        if cfg.min_side and min(w, h) < cfg.min_side:
            return "image_too_small"
        if cfg.max_aspect is not None and max(w, h) > cfg.max_aspect * min(w, h):
            return "image_aspect"
        small = _small(im)
        if cfg.min_colours and not has_colours(small, cfg.min_colours):
            return "image_few_colours"
        if cfg.min_entropy and grey_entropy(small) < cfg.min_entropy:
            return "image_low_entropy"
    n = len(text.strip())
    if n < cfg.min_text_chars:
        return "text_too_short"
    if cfg.max_text_chars is not None and n > cfg.max_text_chars:
        return "text_too_long"
    if cfg.max_repeat_ratio is not None and repeat_ratio(text) > cfg.max_repeat_ratio:
        return "text_repetitive"
    if cfg.max_nonprintable_ratio is not None and nonprintable_ratio(text) > cfg.max_nonprintable_ratio:
        return "text_nonprintable"
    if language is not None and text.strip():
        lang, score = language(text[:2000])
        if lang not in cfg.languages or score < cfg.min_language_score:
            return "language"
    return None


def _image_bytes(img: RawImage, decoded: Image.Image) -> tuple[str, bytes]:
    """The image as stored in the curated shard: the source's bytes when it has them as one file."""
    if img.frame is None:
        data = img.data if img.data is not None else Path(img.path or "").read_bytes()
        return img.ext, data
    import io

    buf = io.BytesIO()
    decoded.save(buf, format="PNG")  # one frame of a multi-frame file: re-encoded losslessly
    return "png", buf.getvalue()


def curate_shard(url: str, index: int, part_prefix: str, cfg: CurateConfig, reader: ReaderOptions) -> dict:
    """Filter one shard into ``part_prefix``.tar (documents keyed ``{index:06d}-{n:08d}``) and
    ``part_prefix``.json (counts + one signature per kept document; written last)."""
    cpu0 = time.process_time()
    stats = SkipStats()
    filtered: Counter = Counter()
    language = load_language_identifier() if cfg.languages else None
    scorer = load_scorer(cfg.scorer, cfg.scorer_image_size) if cfg.scorer else None
    members: list[tuple[str, bytes]] = []
    sigs: list[dict] = []
    read = scored = 0
    pending: list[tuple] = []

    def keep(key: str, raw: RawDocument, images: list[Image.Image], text: str) -> None:
        doc_key = f"{index:06d}-{len(sigs):08d}"
        stored = [_image_bytes(s, im) for s, im in zip((s for s in raw.segments if isinstance(s, RawImage)), images,
                                                       strict=True)]
        extra = {"origin": f"{url}:{key}"}
        if raw.messages is not None:  # a conversation stays one, in the conversations layout
            msgs = [Message(role, items) for role, items in raw.messages]
            members.extend(conversation_to_tar_members(doc_key, msgs, raw.source, stored, extra))
        else:
            members.extend(segments_to_tar_members(doc_key, raw.segments, raw.source, stored, extra))
        sigs.append({"text": text_hash(text) if text.strip() else None,
                     "pixels": [pixel_hash(im) for im in images], "phash": [phash(im) for im in images]})

    def flush() -> None:
        nonlocal scored
        if not pending:
            return
        scores = scorer([p[2][0] for p in pending], [p[3] for p in pending]) if scorer else []
        if len(scores) != len(pending):
            raise CurateError(f"--scorer {cfg.scorer} returned {len(scores)} scores for {len(pending)} pairs")
        scored += len(pending)
        for (key, raw, images, text), s in zip(pending, scores, strict=True):
            if cfg.min_score is not None and not s >= cfg.min_score:  # NaN fails too
                filtered["alignment"] += 1
            else:
                keep(key, raw, images, text)
        pending.clear()

    fmt = resolve_format(url, reader)
    for raw in iter_raw_documents(url, fmt, reader, stats):
        read += 1
        doc = to_document(url, raw, stats)
        if doc is None:
            continue
        text = " ".join(s for s in doc.segments if isinstance(s, str))
        images = doc.images
        reason = first_failing_filter(images, text, cfg, language)
        if reason:
            filtered[reason] += 1
            continue
        if scorer is not None and len(images) == 1 and text.strip():
            pending.append((raw.key, raw, images, text))
            if len(pending) >= cfg.scorer_batch:
                flush()
        else:
            keep(raw.key, raw, images, text)
    flush()
    write_tar(Path(part_prefix + ".tar"), members)
    result = {"shard": url, "read": read, "passed": len(sigs), "scored": scored, "skipped": stats.as_dict(),
              "filtered": dict(filtered), "signatures": sigs, "cpu_seconds": time.process_time() - cpu0}
    atomic_write_json(part_prefix + ".json", result, indent=None)
    return result


# ---- across shards: deduplication ------------------------------------------------------------
class NearDuplicateIndex:
    """64-bit hashes within ``max_distance`` bits of a stored one. Multi-index hashing: the hash is cut
    into max_distance + 1 bands, and two hashes that close agree exactly on at least one band
    (pigeonhole), so only the hashes sharing a band value are compared."""

    def __init__(self, max_distance: int) -> None:
        self.t = max_distance
        n = max_distance + 1
        edges = [round(64 * i / n) for i in range(n + 1)]
        self.bands = [(a, (1 << (b - a)) - 1) for a, b in zip(edges, edges[1:], strict=False)]
        self.buckets: dict[tuple[int, int], list[int]] = {}

    def near(self, h: int) -> bool:
        for i, (shift, mask) in enumerate(self.bands):
            for other in self.buckets.get((i, (h >> shift) & mask), ()):
                if (h ^ other).bit_count() <= self.t:
                    return True
        return False

    def add(self, h: int) -> None:
        for i, (shift, mask) in enumerate(self.bands):
            self.buckets.setdefault((i, (h >> shift) & mask), []).append(h)


def deduplicate(parts: Sequence[dict], cfg: CurateConfig, filtered: Counter) -> list[list[bool]]:
    """Keep flags per part, per document: the first occurrence in shard order wins."""
    texts: set[str] = set()
    pix: set[str] = set()
    near = NearDuplicateIndex(cfg.near_dup_hamming) if cfg.near_dup_hamming >= 0 else None
    out = []
    for part in parts:
        flags = []
        for sig in part["signatures"]:
            if cfg.dedup_text and sig["text"] is not None and sig["text"] in texts:
                filtered["duplicate_text"] += 1
                flags.append(False)
            elif cfg.dedup_images and any(p in pix for p in sig["pixels"]):
                filtered["duplicate_image"] += 1
                flags.append(False)
            elif near is not None and any(near.near(h) for h in sig["phash"]):
                filtered["near_duplicate_image"] += 1
                flags.append(False)
            else:
                flags.append(True)
                if sig["text"] is not None:
                    texts.add(sig["text"])
                pix.update(sig["pixels"])
                if near is not None:
                    for h in sig["phash"]:
                        near.add(h)
        out.append(flags)
    return out


# ---- workers and the command -----------------------------------------------------------------
_W: dict = {}


def _worker_init(cfg: CurateConfig, reader: ReaderOptions) -> None:
    import torch

    torch.set_num_threads(1)  # one core per worker: the pool is the parallelism
    _W["cfg"], _W["reader"] = cfg, reader


def _worker_run(job: tuple[str, int, str]) -> dict:
    return curate_shard(job[0], job[1], job[2], _W["cfg"], _W["reader"])


DEFAULT_CONFIG = CurateConfig()
DEFAULT_READER = ReaderOptions()


def curate(inputs: str | Sequence[str], out: str | Path, cfg: CurateConfig = DEFAULT_CONFIG,
           reader: ReaderOptions = DEFAULT_READER, workers: int = 1, overwrite: bool = False,
           progress: bool = True) -> dict:
    """Curate ``inputs`` into ``out``; returns stats.json's content."""
    out = Path(out)
    urls = expand_urls(inputs)
    if not urls:
        raise CurateError(f"--input {inputs!r} matches no shards")
    missing = [u for u in urls if not os.path.exists(u)]
    if missing:
        raise CurateError(f"--input: {len(missing)} shard(s) do not exist, first: {missing[0]}")
    if out.exists() and not overwrite:
        raise CurateError(f"{out} already exists; pass --overwrite to replace it")
    if reader.format != "auto":
        for u in urls:
            resolve_format(u, reader)
    if cfg.languages:
        load_language_identifier()  # fail before any work when the package is missing
    if cfg.scorer:
        load_scorer(cfg.scorer, cfg.scorer_image_size)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "parts").mkdir(parents=True)
    jobs = [(u, i, str(partial / "parts" / f"shard-{i:06d}")) for i, u in enumerate(urls)]
    t0 = time.perf_counter()
    results: dict[int, dict] = {}
    with Progress("curate", total=len(urls), unit="shards", enabled=progress) as prog:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                results[job[1]] = curate_shard(job[0], job[1], job[2], cfg, reader)
                prog.update(1)
        else:
            ctx = mp.get_context("spawn")  # as pretokenize: safe with threads and CUDA in the parent
            with ctx.Pool(min(workers, len(jobs)), _worker_init, (cfg, reader)) as pool:
                for job, r in zip(jobs, pool.imap(_worker_run, jobs), strict=True):
                    results[job[1]] = r
                    prog.update(1)
    filter_seconds = time.perf_counter() - t0
    parts = [results[i] for i in range(len(urls))]
    filtered: Counter = Counter()
    for p in parts:
        filtered.update(p["filtered"])
    flags = deduplicate(parts, cfg, filtered)
    kept = sum(sum(f) for f in flags)
    skipped = SkipStats()
    for p in parts:
        skipped.skipped.update(p["skipped"])
    if kept == 0:
        why = explain_empty(urls, skipped, reader) if not sum(p["passed"] for p in parts) and not filtered else (
            "no documents left after curation")
        raise CurateError(f"{why}; filtered: {json.dumps({k: v for k, v in filtered.items() if v})}")
    shards = _write_output(partial, jobs, flags, cfg.shard_size)
    seconds = time.perf_counter() - t0
    read = sum(p["read"] for p in parts)
    n_workers = max(1, min(workers, len(jobs)))
    stats = {
        "documents_read": read,
        "documents": kept,
        "skipped": skipped.as_dict(),
        "filtered": {k: int(filtered.get(k, 0)) for k in FILTERS},
        "scored": sum(p["scored"] for p in parts),
        "shards_in": len(urls),
        "shards": shards,
        "workers": n_workers,
        "seconds": round(seconds, 3),
        "documents_per_s_per_core": round(read / max(filter_seconds, 1e-9) / n_workers, 2),
        # the same rate by CPU time of the filtering processes: what a core does when nothing else runs
        "documents_per_cpu_s": round(read / max(sum(p["cpu_seconds"] for p in parts), 1e-9), 2),
        "settings": {**asdict(cfg), "reader": asdict(reader)},
    }
    stats = json.loads(json.dumps(stats))  # what stats.json holds (tuples become lists)
    (partial / STATS_FILE).write_text(json.dumps(stats, indent=2))
    (partial / REPORT_FILE).write_text(format_report(stats))
    shutil.rmtree(partial / "parts")
    swap_in_dir(partial, out)  # --overwrite: a crash leaves the old output or the new one, never neither
    return stats


def _write_output(partial: Path, jobs: list[tuple[str, int, str]], flags: list[list[bool]], shard_size: int) -> list[str]:
    """Kept documents, in shard order, into curated-NNNNNN.tar of ``shard_size`` documents each."""
    names: list[str] = []
    batch: list[tuple[str, bytes]] = []
    n_in_batch = 0

    def flush() -> None:
        nonlocal batch, n_in_batch
        name = f"curated-{len(names):06d}.tar"
        write_tar(partial / name, batch)
        names.append(name)
        batch, n_in_batch = [], 0

    for (_, _, prefix), keep in zip(jobs, flags, strict=True):
        samples = tar_samples(prefix + ".tar", SkipStats())  # our own part: one sample per document, in order
        for sample, ok in zip(samples, keep, strict=True):
            if not ok:
                continue
            batch += [(f"{sample['__key__']}.{k}", v) for k, v in sample.items() if not k.startswith("__")]
            n_in_batch += 1
            if n_in_batch >= shard_size:
                flush()
    if n_in_batch:
        flush()
    return names


def format_report(stats: dict) -> str:
    read, kept = stats["documents_read"], stats["documents"]
    lines = ["# Curation report", "", f"{kept:,} of {read:,} documents kept ({kept / max(1, read):.1%}) in "
             f"{len(stats['shards'])} shard(s); {stats['documents_per_s_per_core']:,.0f} documents/s/core.", "",
             "| dropped by | documents | share of read |", "|---|---:|---:|"]
    rows = [(f"read: {k}", v) for k, v in stats["skipped"].items() if v]
    rows += [(k, v) for k, v in stats["filtered"].items() if v]
    for k, v in rows:
        lines.append(f"| {k} | {v:,} | {v / max(1, read):.1%} |")
    if not rows:
        lines.append("| (nothing) | 0 | 0% |")
    return "\n".join(lines) + "\n"

