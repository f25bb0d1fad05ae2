"""Pretokenization: raw shards -> one megatron-core IndexedDataset of unified-vocabulary ids.

Output directory (complete only once it exists under its final name)::

    OUT/data.bin, OUT/data.idx   one sequence per document: <bos> text <boi> codes <eoi> ... <eos>
                                 (a conversation: the chat template, tessera.data.chat)
    OUT/loss_mask.{bin,idx}      uint8, the same documents and lengths: 1 where the token is a training
                                 target (--loss-on); absent when every token is one (readers: no file = all)
    OUT/vocab.json               the unified Vocabulary built from the two tokenizers' sizes
    OUT/stats.json               documents, text / image / special tokens, skipped samples by reason

Work happens in ``OUT.partial/``: each shard becomes ``parts/shard-NNNNNN.{bin,idx,json}`` (the
json, written last and by rename, marks the part complete), then parts are merged in shard order
and ``OUT.partial`` is renamed to ``OUT``. A killed run leaves only ``OUT.partial``; running the same
command again reuses its finished parts and redoes the rest. The output does not depend on
``--workers`` (parts are merged in shard order).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from tessera.data.chat import LOSS_ON, ChatTemplate, assemble, document_pieces, loss_mask
from tessera.data.document import Document
from tessera.data.raw import (
    SKIP_REASONS,
    DocumentLimits,
    ReaderOptions,
    SkipStats,
    expand_urls,
    explain_empty,
    iter_documents,
    resolve_format,
)
from tessera.data.tokenizers import (
    ImageTokenizerLike,
    TextTokenizerLike,
    load_image_tokenizer,
    load_text_tokenizer,
    vocabulary_for,
)
from tessera.progress import Progress
from tessera.tokenizers.preprocess import fit_image
from tessera.tokenizers.vocab import Vocabulary
from tessera.utils import atomic_prefix, atomic_write_text, swap_in_dir

log = logging.getLogger("tessera.data")

DATA_PREFIX = "data"
MASK_PREFIX = "loss_mask"
STATS_FILE = "stats.json"
PARTIAL_SUFFIX = ".partial"


class PretokenizeError(RuntimeError):
    pass


@dataclass(frozen=True)
class PretokenizeOptions:
    max_doc_tokens: int | None = None
    max_images: int | None = None
    max_text_chars: int | None = None
    batch_docs: int = 64  # documents whose texts / images are encoded in one call
    image_batch: int = 64
    device: str | None = None  # where a VQ encoder loaded from a path runs; None: cuda when present
    reader: ReaderOptions = field(default_factory=ReaderOptions)  # --format, --caption-first, columns
    # --loss-on: auto (conversations: assistant, other documents: all), assistant, all, image, text
    loss_on: str = "auto"
    # --make-vocab-size-divisible-by: the vocabulary's padded size is a multiple of this (None: 1024, which
    # serves TP up to 8; 128 serves TP 1 with a smaller output layer). An imported Chameleon keeps its own.
    make_vocab_size_divisible_by: int | None = None

    def __post_init__(self) -> None:
        if self.loss_on != "auto" and self.loss_on not in LOSS_ON:
            raise PretokenizeError(f"--loss-on {self.loss_on!r}: expected auto or one of {', '.join(LOSS_ON)}")
        m = self.make_vocab_size_divisible_by
        if m is not None and (m <= 0 or m % 128):
            raise PretokenizeError(f"--make-vocab-size-divisible-by {m}: expected a positive multiple of 128")


def token_dtype(vocab: Vocabulary) -> type[np.number]:
    return np.uint16 if vocab.padded_size <= 65536 else np.int32


def _encode_batch(
    docs: list[Document], text_tok: TextTokenizerLike, image_tok: ImageTokenizerLike, vocab: Vocabulary, image_batch: int,
    template: ChatTemplate,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, per-token flags) of each document (conversations through the chat template); texts in one
    encode_batch call, images through the VQ encoder in batches."""
    pieces = [template.pieces(d.messages) if d.messages is not None else document_pieces(d.segments, vocab)
              for d in docs]
    texts = [p.value for ps in pieces for p in ps if p.kind == "text"]
    images = [fit_image(p.value, image_tok.image_size) for ps in pieces for p in ps if p.kind == "image"]
    text_ids = text_tok.encode_batch(texts) if texts else []
    codes: list[torch.Tensor] = []
    with torch.inference_mode():
        for i in range(0, len(images), image_batch):
            c = image_tok.encode(images[i : i + image_batch])
            codes.append(c.detach().to("cpu", torch.long).reshape(len(images[i : i + image_batch]), -1))
    all_codes = torch.cat(codes) if codes else torch.zeros(0, vocab.image_tokens_per_image, dtype=torch.long)
    if all_codes.shape[1] != vocab.image_tokens_per_image:
        raise PretokenizeError(f"image tokenizer gave {all_codes.shape[1]} codes per image, expected {vocab.image_tokens_per_image}")
    image_ids = iter(vocab.image_codes_to_ids(all_codes).numpy())

    def next_text() -> np.ndarray:
        piece_ids = np.asarray(next(text_iter), dtype=np.int64)
        if piece_ids.size and (piece_ids.min() < 0 or piece_ids.max() >= vocab.num_text_tokens):
            raise PretokenizeError(f"text tokenizer returned a piece outside [0, {vocab.num_text_tokens})")
        return piece_ids + vocab.text_offset

    text_iter = iter(text_ids)
    return [assemble(ps, next_text, lambda: next(image_ids), vocab) for ps in pieces]


def _loss_mask(doc: Document, flags: np.ndarray, loss_on: str, where: str) -> np.ndarray | None:
    """The document's loss mask under ``loss_on``, or None when every token is a target."""
    mode = loss_on if loss_on != "auto" else ("assistant" if doc.messages is not None else "all")
    if mode == "assistant" and doc.messages is None:
        raise PretokenizeError(f"--loss-on assistant: {where} is not a conversation (pass --loss-on all, image "
                               "or text for other documents)")
    return None if mode == "all" else loss_mask(flags, mode)


def count_modalities(ids: np.ndarray, vocab: Vocabulary) -> dict[str, int]:
    text = int(((ids >= vocab.text_offset) & (ids < vocab.image_offset)).sum())
    image = int(((ids >= vocab.image_offset) & (ids < vocab.size)).sum())
    return {"text_tokens": text, "image_tokens": image, "special_tokens": int(ids.size) - text - image}


def pretokenize_shard(
    url: str,
    part_prefix: str,
    text_tok: TextTokenizerLike,
    image_tok: ImageTokenizerLike,
    vocab: Vocabulary,
    opts: PretokenizeOptions,
) -> dict:
    """One shard -> ``part_prefix``.{bin,idx} and its stats ``part_prefix``.json (written last)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    # Written under temporary prefixes, renamed when finished (the mask only if a document had one); the
    # part's .json, written after, marks it done.
    with atomic_prefix(part_prefix, (".bin", ".idx")) as tmp, \
            atomic_prefix(part_prefix + "-mask", (".bin", ".idx")) as mask_tmp:
        builder = IndexedDatasetBuilder(get_bin_path(tmp), dtype=token_dtype(vocab))
        mask_builder = None  # opened at the first document with a mask (every earlier one: all ones)
        lengths: list[int] = []
        stats = SkipStats()
        totals = {"documents": 0, "images": 0, "text_tokens": 0, "image_tokens": 0, "special_tokens": 0, "tokens": 0,
                  "target_tokens": 0, "conversations": 0}
        sources: dict[str, int] = {}
        limits = DocumentLimits(opts.max_images, opts.max_text_chars)
        template = ChatTemplate.for_vocabulary(vocab, text_tok)

        def flush(batch: list[Document]) -> None:
            nonlocal mask_builder
            encoded = _encode_batch(batch, text_tok, image_tok, vocab, opts.image_batch, template)
            for doc, (ids, flags) in zip(batch, encoded, strict=True):
                where = f"{url}:{doc.key}"
                if opts.max_doc_tokens is not None and ids.size > opts.max_doc_tokens:
                    stats.skip("too_long", where, f"{ids.size} tokens > {opts.max_doc_tokens}")
                    continue
                mask = _loss_mask(doc, flags, opts.loss_on, where)
                if mask is not None and not mask.any():
                    stats.skip("no_targets", where, f"--loss-on {opts.loss_on} selects none of its {ids.size} tokens")
                    continue
                if mask is not None and mask_builder is None:
                    mask_builder = IndexedDatasetBuilder(get_bin_path(mask_tmp), dtype=np.uint8)
                    for n in lengths:
                        mask_builder.add_document(np.ones(n, dtype=np.uint8), [n])
                builder.add_document(ids, [ids.size])  # accepts any array-like
                if mask_builder is not None:
                    mask_builder.add_document(np.ones(ids.size, np.uint8) if mask is None else mask, [ids.size])
                lengths.append(int(ids.size))
                c = count_modalities(ids, vocab)
                for k, v in c.items():
                    totals[k] += v
                totals["tokens"] += int(ids.size)
                totals["target_tokens"] += int(ids.size) if mask is None else int(mask.sum())
                totals["documents"] += 1
                totals["conversations"] += doc.messages is not None
                totals["images"] += len(doc.images)
                sources[doc.source] = sources.get(doc.source, 0) + 1

        batch: list[Document] = []
        for doc in iter_documents([url], stats, limits, opts.reader):
            batch.append(doc)
            if len(batch) >= opts.batch_docs:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
        builder.finalize(get_idx_path(tmp))
        if mask_builder is not None:
            mask_builder.finalize(get_idx_path(mask_tmp))
    result = {**totals, "skipped": stats.as_dict(), "sources": sources, "shard": url, "mask": mask_builder is not None}
    _write_json(Path(part_prefix + ".json"), result)
    return result


def _write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))


# ---- worker processes -------------------------------------------------------------------------
_W: dict = {}


def _worker_init(text_spec, image_spec, vocab: Vocabulary, opts: PretokenizeOptions) -> None:
    torch.set_num_threads(1)  # one core per worker: the pool is the parallelism
    _W["text"] = load_text_tokenizer(text_spec) if isinstance(text_spec, str) else text_spec
    _W["image"] = load_image_tokenizer(image_spec, opts.device) if isinstance(image_spec, str) else image_spec
    _W["vocab"], _W["opts"] = vocab, opts


def _worker_run(job: tuple[str, str]) -> dict:
    url, part = job
    return pretokenize_shard(url, part, _W["text"], _W["image"], _W["vocab"], _W["opts"])


# ---- the command ------------------------------------------------------------------------------
def _fingerprint(urls: list[str], vocab: Vocabulary, text_spec, image_spec, opts: PretokenizeOptions) -> str:
    def ident(spec) -> object:
        if not isinstance(spec, str):
            return type(spec).__name__  # the vocabulary sizes below cover the rest
        p = Path(spec)
        files = sorted(p.iterdir()) if p.is_dir() else [p] if p.exists() else []
        # a retrained tokenizer at the same path must not reuse parts encoded with the old one
        return [os.path.abspath(spec)] + [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]

    blob = json.dumps(
        {
            "urls": urls,
            "vocab": vocab.to_dict(),
            "text": ident(text_spec),
            "image": ident(image_spec),
            "opts": [opts.max_doc_tokens, opts.max_images, opts.max_text_chars, asdict(opts.reader), opts.loss_on],
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def is_complete(out: str | Path) -> bool:
    out = Path(out)
    return (out / STATS_FILE).is_file() and (out / f"{DATA_PREFIX}.idx").is_file()


def pretokenize(
    inputs: str | list[str],
    out: str | Path,
    text_tokenizer: TextTokenizerLike | str,
    image_tokenizer: ImageTokenizerLike | str,
    workers: int = 1,
    options: PretokenizeOptions = PretokenizeOptions(),
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Pretokenize ``inputs`` (brace patterns / paths) into ``out``; returns stats.json's content.

    Tokenizers are objects or paths (``TextTokenizer.load`` / ``ImageTokenizer.load``); with
    ``workers > 1`` they are loaded (or pickled) into each spawned worker, shards split among them."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    out = Path(out)
    urls = expand_urls(inputs)
    if not urls:
        raise PretokenizeError(f"--input {inputs!r} matches no shards")
    missing = [u for u in urls if "://" not in u and not os.path.exists(u)]
    if missing:
        raise PretokenizeError(f"--input: {len(missing)} shard(s) do not exist, first: {missing[0]}")
    if options.reader.format != "auto":
        for u in urls:
            resolve_format(u, options.reader)  # a forced format its container cannot hold fails here
    if out.exists():
        if not overwrite:
            what = "a complete dataset" if is_complete(out) else "something"
            raise PretokenizeError(f"{out} already holds {what}; pass --overwrite to replace it")
    text_tok = load_text_tokenizer(text_tokenizer) if isinstance(text_tokenizer, str) else text_tokenizer
    image_tok = (
        load_image_tokenizer(image_tokenizer, options.device) if isinstance(image_tokenizer, str) else image_tokenizer
    )
    vocab = vocabulary_for(text_tok, image_tok, options.make_vocab_size_divisible_by)

    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    parts_dir = partial / "parts"
    fp = _fingerprint(urls, vocab, text_tokenizer, image_tokenizer, options)
    fp_file = partial / "fingerprint"
    if partial.exists() and (not fp_file.is_file() or fp_file.read_text() != fp):
        log.warning("%s is from a different run; starting over", partial)
        shutil.rmtree(partial)
    parts_dir.mkdir(parents=True, exist_ok=True)
    fp_file.write_text(fp)

    part_of = {u: str(parts_dir / f"shard-{i:06d}") for i, u in enumerate(urls)}
    results: dict[str, dict] = {}
    todo = []
    for u in urls:
        done = Path(part_of[u] + ".json")
        if done.is_file():
            results[u] = json.loads(done.read_text())
        else:
            todo.append((u, part_of[u]))
    if results:
        log.info("resuming: %d of %d shards already done", len(results), len(urls))

    t0 = time.perf_counter()
    with Progress("pretokenize", total=len(urls), unit="shards", enabled=progress) as prog:
        prog.update(len(results))
        if workers <= 1 or len(todo) <= 1:
            for job in todo:
                results[job[0]] = pretokenize_shard(job[0], job[1], text_tok, image_tok, vocab, options)
                prog.update(1, docs=sum(r["documents"] for r in results.values()))
        else:
            # spawn, not fork: safe with CUDA and with threads already running in the parent
            ctx = mp.get_context("spawn")
            text_spec = text_tokenizer if isinstance(text_tokenizer, str) else text_tok
            image_spec = image_tokenizer if isinstance(image_tokenizer, str) else image_tok
            with ctx.Pool(min(workers, len(todo)), _worker_init, (text_spec, image_spec, vocab, options)) as pool:
                for r in pool.imap_unordered(_worker_run, todo):
                    results[r["shard"]] = r
                    prog.update(1, docs=sum(x["documents"] for x in results.values()))

    if sum(r["documents"] for r in results.values()) == 0:
        # nothing to train on: fail now (the parts stay for inspection) instead of publishing an empty OUT
        skipped = SkipStats()
        for r in results.values():
            skipped.skipped.update(r["skipped"])
        raise PretokenizeError(explain_empty(urls, skipped, options.reader))

    # merge parts in shard order, then publish the directory by one rename
    merged = str(partial / DATA_PREFIX)
    builder = IndexedDatasetBuilder(get_bin_path(merged), dtype=token_dtype(vocab))
    for u in urls:
        builder.add_index(part_of[u])
    builder.finalize(get_idx_path(merged))
    masked = any(results[u].get("mask") for u in urls)
    if masked:
        _merge_masks(urls, part_of, results, str(partial / MASK_PREFIX))
    vocab.save(partial)
    stats = _total_stats(urls, results, vocab, time.perf_counter() - t0)
    stats.update(loss_on=options.loss_on, loss_mask=masked,
                 chat_template=ChatTemplate.for_vocabulary(vocab, text_tok).to_dict())
    _write_json(partial / STATS_FILE, stats)
    shutil.rmtree(parts_dir)
    fp_file.unlink()
    swap_in_dir(partial, out)  # --overwrite: the old one is moved aside first so there is never a mix
    return stats


def _merge_masks(urls: list[str], part_of: dict[str, str], results: dict[str, dict], prefix: str) -> None:
    """OUT/loss_mask: the parts' masks in shard order; a part without one (every token a target) gets ones
    for each of its documents, so the mask dataset has exactly the data's documents and lengths."""
    from megatron.core.datasets.indexed_dataset import (
        IndexedDataset,
        IndexedDatasetBuilder,
        get_bin_path,
        get_idx_path,
    )

    builder = IndexedDatasetBuilder(get_bin_path(prefix), dtype=np.uint8)
    for u in urls:
        if results[u].get("mask"):
            builder.add_index(part_of[u] + "-mask")
            continue
        part = IndexedDataset(part_of[u], mmap=True)  # held while its mmap'd lengths are read
        for n in np.array(part.sequence_lengths):
            builder.add_document(np.ones(int(n), dtype=np.uint8), [int(n)])
    builder.finalize(get_idx_path(prefix))


def _total_stats(urls: list[str], results: dict[str, dict], vocab: Vocabulary, seconds: float) -> dict:
    keys = ("documents", "conversations", "images", "text_tokens", "image_tokens", "special_tokens", "tokens",
            "target_tokens")
    total = {k: sum(results[u].get(k, 0) for u in urls) for k in keys}
    skipped = {r: sum(results[u]["skipped"].get(r, 0) for u in urls) for r in SKIP_REASONS}
    sources: dict[str, int] = {}
    for u in urls:
        for s, n in results[u]["sources"].items():
            sources[s] = sources.get(s, 0) + n
    return {
        **total,
        "skipped": skipped,
        "skipped_total": sum(skipped.values()),
        "sources": dict(sorted(sources.items())),
        "shards": len(urls),
        "vocab_size": vocab.size,
        "padded_vocab_size": vocab.padded_size,
        "tokens_per_image": vocab.image_tokens_per_image,
        "seconds": round(seconds, 3),
    }


def load_stats(path: str | Path) -> dict:
    path = Path(path)
    f = path / STATS_FILE if path.is_dir() else path
    if not f.is_file():
        raise PretokenizeError(f"{path}: no {STATS_FILE}; not a complete pretokenized dataset")
    return json.loads(f.read_text())
