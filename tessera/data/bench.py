"""Throughput of the batch pipeline from pretokenized data (the bench engineer calls ``benchmark_batches``)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import torch

from tessera.data.batches import PackingConfig, WovenBatchIterator, open_sources
from tessera.data.weave import WeaveSchedule


def benchmark_batches(
    sources: Mapping[str, str | Path],
    schedule: WeaveSchedule | None = None,
    seq_length: int = 2048,
    global_batch: int = 64,
    micro_batch: int = 8,
    steps: int = 20,
    warmup_steps: int = 2,
    seed: int = 0,
    packing: PackingConfig | None = None,
    threads: int = 1,
) -> dict:
    """Time ``steps`` global steps of woven micro-batches on one process (dp_size 1, all slots).

    Returns tokens/s and tokens/s/core (``threads`` torch threads = cores used; default 1, so
    the two agree), plus the settings. Index building (cached on disk after the first call) is
    timed separately as ``setup_s``."""
    torch.set_num_threads(threads)
    packing = packing or PackingConfig(seq_length=seq_length)
    if packing.seq_length != seq_length:
        raise ValueError(f"packing.seq_length {packing.seq_length} != seq_length {seq_length}")
    schedule = schedule or WeaveSchedule.constant({n: 1.0 for n in sources})
    need = (steps + warmup_steps) * global_batch
    t0 = time.perf_counter()
    srcs = open_sources(sources, packing, {n: need for n in sources})
    setup = time.perf_counter() - t0
    it = WovenBatchIterator(srcs, schedule, global_batch, micro_batch, seed=seed)
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
    }
