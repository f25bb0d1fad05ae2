"""``tessera bench data``: throughput of the data pipeline.

* ``benchmark_batches``: tokens/s/core of the packed, blended batch stream from pretokenized data;
  ``run_data`` sets it against a floor in the same run: the same number of tokens read as plain
  contiguous windows from the same memory-mapped .bin (no packing, shuffling, weaving, masks or position
  ids) -- what the pipeline costs on top of reading its tokens;
* ``benchmark_curation``: documents/s/core of ``tessera data curate`` on generated img2dataset shards.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
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


def build_small_dataset(out: Path, docs: int = 200, seed: int = 0) -> Path:
    """A pretokenized dataset made on the spot (synthetic corpus, tiny BPE, random-weight tiny VQ):
    the batch pipeline's speed depends on token counts, not on what the tokens mean."""
    from tessera.data.pretokenize import pretokenize
    from tessera.data.synth import write_synth
    from tessera.tokenizers.image import ImageTokenizer, VQConfig
    from tessera.tokenizers.text_train import train_text_tokenizer

    raw = out / "raw"
    m = write_synth(raw, docs=docs, image_size=32, seed=seed, shard_size=docs, heldout_docs=0, progress=False)
    shards = [str(raw / s) for s in m["train_shards"]]
    text = train_text_tokenizer(shards, out / "text", vocab_size=300, seed=seed)
    torch.manual_seed(seed)
    image = ImageTokenizer.from_config(VQConfig.preset("tiny"))
    pretokenize(shards, out / "pretok", text, image, progress=False)
    return out / "pretok"


def raw_read_floor(path: Path, seq_length: int, batch: int, steps: int) -> dict:
    """Tokens/s of slicing contiguous [batch, seq+1] windows out of the memory-mapped token file."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dtype = IndexedDataset(str(path / "data"), multimodal=False, mmap=True).index.dtype
    tokens = np.memmap(path / "data.bin", dtype=dtype, mode="r")
    span = batch * (seq_length + 1)
    reps = max(1, -(-span // tokens.size))
    tokens = np.concatenate([tokens] * reps) if reps > 1 else tokens
    t0 = time.perf_counter()
    n = 0
    off = 0
    for _ in range(steps):
        if off + span > tokens.size:
            off = 0
        win = torch.from_numpy(tokens[off : off + span].astype(np.int64)).view(batch, seq_length + 1)
        _x, _y = win[:, :-1].contiguous(), win[:, 1:].contiguous()
        n += batch * seq_length
        off += span
    dt = time.perf_counter() - t0
    return {"tokens_per_s": n / dt, "tokens_per_s_per_core": n / dt, "tokens": n, "seconds": dt}


def run_data(sources: Mapping[str, str | Path] | None = None, seq_length: int = 1024, global_batch: int = 8,
             micro_batch: int = 8, steps: int = 50, config: str | Path | None = None,
             document_mask: bool = False) -> dict:
    """``tessera bench data``: the blended batch stream of ``sources`` (name -> pretokenized directory), of a
    DataConfig YAML (``config``: its sources, blend, packing and batch sizes win), or of a small dataset
    built on the spot, and the floor of its first source."""
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="tessera-bench-data-") as tmp:
        schedule, packing, seed, what = None, None, 0, None
        if config is not None:
            from tessera.data.config import batch_sizes, load_data_config

            cfg = load_data_config(config)
            sources = {s.name: s.path for s in cfg.train_sources()}
            schedule, packing, seed, seq_length = cfg.schedule(), cfg.packing(), cfg.seed, cfg.seq_length
            gbs, mbs = batch_sizes(config)  # a training config's parallel section wins over the flags
            global_batch, micro_batch = gbs or global_batch, mbs or micro_batch
            what = str(config)
        elif not sources:
            sources = {"corpus": build_small_dataset(Path(tmp))}
            what = "(built on the spot: 200 synthetic documents)"
        if packing is None and document_mask:
            packing = PackingConfig(seq_length, document_mask=True)
        try:
            ours = benchmark_batches(sources, schedule, seq_length=seq_length, global_batch=global_batch,
                                     micro_batch=micro_batch, steps=steps, seed=seed, packing=packing, threads=1)
        finally:
            torch.set_num_threads(threads)  # benchmark_batches pins one thread; give the rest of the run its cores back
        first = next(iter(sources))
        floor = raw_read_floor(Path(sources[first]), seq_length, global_batch, steps)
    rows = [
        {"pipeline": "tessera blended batches (packed, shuffled, masks)", "tokens_per_s_per_core": ours["tokens_per_s_per_core"],
         "tokens": ours["tokens"], "seconds": ours["seconds"], "setup_s": ours["setup_s"]},
        {"pipeline": f"floor: contiguous windows of {first}'s .bin", "tokens_per_s_per_core": floor["tokens_per_s_per_core"],
         "tokens": floor["tokens"], "seconds": floor["seconds"], "setup_s": None},
    ]
    return {"data": what or {n: str(p) for n, p in sources.items()}, "seq_length": seq_length,
            "global_batch": global_batch, "micro_batch": micro_batch, "steps": steps,
            "goal_tokens_per_s_per_core": 1e6, "rows": rows, "tessera": ours}
