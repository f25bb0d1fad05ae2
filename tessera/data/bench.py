"""Throughput of the data pipeline: the batch stream from pretokenized data (``benchmark_batches``) and
curation of raw shards (``benchmark_curation``, documents/s per core)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import torch

from tessera.data.batches import BlendedBatchIterator, PackingConfig, open_sources
from tessera.data.blend import BlendSchedule


def benchmark_batches(
    sources: Mapping[str, str | Path],
    schedule: BlendSchedule | None = None,
    seq_length: int = 2048,
    global_batch: int = 64,
    micro_batch: int = 8,
    steps: int = 20,
    warmup_steps: int = 2,
    seed: int = 0,
    packing: PackingConfig | None = None,
    threads: int = 1,
) -> dict:
    """Time ``steps`` global steps of blended micro-batches on one process (dp_size 1, all slots).

    Returns tokens/s and tokens/s/core (``threads`` torch threads = cores used; default 1, so
    the two agree), plus the settings. Index building (cached on disk after the first call) is
    timed separately as ``setup_s``."""
    torch.set_num_threads(threads)
    packing = packing or PackingConfig(seq_length=seq_length)
    if packing.seq_length != seq_length:
        raise ValueError(f"packing.seq_length {packing.seq_length} != seq_length {seq_length}")
    schedule = schedule or BlendSchedule.constant({n: 1.0 for n in sources})
    need = (steps + warmup_steps) * global_batch
    t0 = time.perf_counter()
    srcs = open_sources(sources, packing, {n: need for n in sources})
    setup = time.perf_counter() - t0
    it = BlendedBatchIterator(srcs, schedule, global_batch, micro_batch, seed=seed)
    for _ in range(warmup_steps):
        it.next_step()
    t0 = time.perf_counter()
    tokens = 0
    for _ in range(steps):
        for mb in it.next_step():
            tokens += mb["tokens"].numel()
    dt = time.perf_counter() - t0
    return {
        "tokens_per_s": tokens / dt,
        "tokens_per_s_per_core": tokens / dt / threads,
        "tokens": tokens,
        "seconds": dt,
        "setup_s": setup,
        "seq_length": seq_length,
        "global_batch": global_batch,
        "micro_batch": micro_batch,
        "steps": steps,
        "threads": threads,
        "attention_mask": packing.create_attention_mask,
        "reset_attention_mask": packing.reset_attention_mask,
        "reset_position_ids": packing.reset_position_ids,
        "document_mask": packing.document_mask,
        "loss_mask": {n: s.mask is not None for n, s in srcs.items()},
    }


def write_caption_shards(out: Path, docs: int, image_size: int = 256, shard_size: int = 500, seed: int = 0,
                         dup_every: int = 10) -> list[Path]:
    """img2dataset-style shards (KEY.jpg + KEY.txt + KEY.json) of smooth random JPEG pictures with unique
    captions; every ``dup_every``-th picture repeats an earlier one, so deduplication has work to do."""
    import io
    import json

    import numpy as np
    from PIL import Image

    from tessera.data.document import write_tar

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths, members, pictures = [], [], []
    for i in range(docs):
        if dup_every and i % dup_every == dup_every - 1 and pictures:
            data = pictures[int(rng.integers(len(pictures)))]
        else:
            grid = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            img = Image.fromarray(grid).resize((image_size, image_size), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            data = buf.getvalue()
            pictures.append(data)
        key = f"{i:09d}"
        cap = f"picture {i}: a smooth pattern of {int(rng.integers(2, 9))} colours, photographed at dusk"
        members += [(f"{key}.jpg", data), (f"{key}.txt", cap.encode()),
                    (f"{key}.json", json.dumps({"key": key, "caption": cap, "status": "success"}).encode())]
        if len(members) >= 3 * shard_size or i == docs - 1:
            paths.append(out / f"{len(paths):05d}.tar")
            write_tar(paths[-1], members)
            members = []
    return paths


def benchmark_curation(docs: int = 2000, image_size: int = 256, workers: int = 1, workdir: str | Path | None = None,
                       cfg=None) -> dict:
    """Time ``tessera data curate`` over generated img2dataset-style shards with every filter on except the
    language filter and the scorer (user-supplied models); returns its stats plus the corpus settings."""
    import shutil
    import tempfile

    from tessera.data.curate import CurateConfig, curate

    cfg = cfg or CurateConfig(min_side=64, max_aspect=3.0, min_colours=16, min_entropy=1.0, min_text_chars=5,
                              max_text_chars=2000, max_repeat_ratio=0.5, max_nonprintable_ratio=0.1)
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="tessera-bench-curate-"))
    try:
        write_caption_shards(root / "raw", docs, image_size)
        st = curate(str(root / "raw"), root / "out", cfg, workers=workers, overwrite=True, progress=False)
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return {"documents_per_s_per_core": st["documents_per_s_per_core"], "documents_per_cpu_s": st["documents_per_cpu_s"],
            "documents_read": st["documents_read"],
            "documents": st["documents"], "seconds": st["seconds"], "workers": st["workers"],
            "image_size": image_size, "filtered": {k: v for k, v in st["filtered"].items() if v}}
