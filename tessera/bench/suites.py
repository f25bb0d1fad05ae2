"""Thin adapters from ``tessera bench`` to the benchmarks other packages own.

* data: ``tessera.data.bench.benchmark_batches`` against a floor in the same run: the same number of
  tokens read as plain contiguous windows from the same memory-mapped .bin (no packing, shuffling,
  weaving, masks or position ids) -- what the pipeline costs on top of reading its tokens;
* kernels: ``tessera.kernels.bench.benchmark_kernels`` (on a CPU it times the references only);
* decode: ``tessera.generate.bench.benchmark_decode`` (ours vs transformers, same weights).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch


# ---- data -----------------------------------------------------------------------------------------
def build_small_dataset(out: Path, docs: int = 200, seed: int = 0) -> Path:
    """A pretokenized dataset made on the spot (synthetic corpus, tiny BPE, random-weight tiny VQ):
    the batch pipeline's speed depends on token counts, not on what the tokens mean."""
    from tessera.data.pretokenize import pretokenize
    from tessera.data.synth import write_synth
    from tessera.tokenizers.image import ImageTokenizer, VQConfig
    from tessera.tokenizers.text import train_text_tokenizer

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


def run_data(data: Path | None = None, seq_length: int = 1024, batch: int = 8, steps: int = 50) -> dict:
    from tessera.data.bench import benchmark_batches

    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="tessera-bench-data-") as tmp:
        path = Path(data) if data is not None else build_small_dataset(Path(tmp))
        try:
            ours = benchmark_batches({"corpus": path}, seq_length=seq_length, global_batch=batch, micro_batch=batch,
                                     steps=steps, threads=1)
        finally:
            torch.set_num_threads(threads)  # benchmark_batches pins one thread; give the rest of the run its cores back
        floor = raw_read_floor(path, seq_length, batch, steps)
    rows = [
        {"pipeline": "tessera blended batches (packed, shuffled, masks)", "tokens_per_s_per_core": ours["tokens_per_s_per_core"],
         "tokens": ours["tokens"], "seconds": ours["seconds"], "setup_s": ours["setup_s"]},
        {"pipeline": "floor: contiguous windows of the .bin", "tokens_per_s_per_core": floor["tokens_per_s_per_core"],
         "tokens": floor["tokens"], "seconds": floor["seconds"], "setup_s": None},
    ]
    return {"data": str(data) if data else "(built on the spot: 200 synthetic documents)", "seq_length": seq_length,
            "batch": batch, "steps": steps, "goal_tokens_per_s_per_core": 1e6, "rows": rows, "tessera": ours}


# ---- kernels --------------------------------------------------------------------------------------
def run_kernels(batches: tuple[int, ...] = (1, 8, 64), vocab: int = 65536, device: str | None = None,
                compile: bool = True, attn_shapes: tuple[tuple[int, int, int, int], ...] | None = None) -> dict:
    from tessera.kernels.bench import ATTN_SHAPES, benchmark_kernels

    rows = benchmark_kernels(batches=batches, vocab=vocab, device=device, compile=compile,
                             attn_shapes=attn_shapes or ATTN_SHAPES)
    on_gpu = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    note = ("kernels: Triton vs PyTorch reference" if on_gpu else
            "kernels on CPU: Triton cannot run natively here, so these time the PyTorch references only, "
            "and the CPU attention kernel against SDPA")
    return {"batches": list(batches), "vocab": vocab, "note": note, "rows": rows}


# ---- decode ---------------------------------------------------------------------------------------
def run_decode(preset: str = "tiny", batches: tuple[int, ...] = (1, 8), prompt_len: int = 32, new_tokens: int = 32,
               dtype: str | None = None, device: str | None = None, machine: dict | None = None,
               repeats: int = 2) -> dict:
    """Ours (bf16 and fp32 unless ``dtype`` picks one) vs transformers (fp32, bf16) on the same weights.
    The engine runs where the model is (CUDA when present); ``device`` is recorded, not forced."""
    from tessera.generate.bench import benchmark_decode

    dtypes = {"bf16": ("bfloat16",), "fp32": ("float32",), None: ("bfloat16", "float32")}[dtype]
    res = benchmark_decode(preset=preset, batches=tuple(batches), prompt_len=prompt_len, new_tokens=new_tokens,
                           dtypes=dtypes, repeats=repeats, verbose=False)
    res.setdefault("rows", [])
    return res
