"""The GPU check's harness: the sizes each part runs at, a part's record (checks, numbers, status, time
budget) and the helpers the parts share. Apart from gpu_check.py (the parts and the run) so the model
parts (gpu_check_model.py) use it without importing the module that loads them.
"""

from __future__ import annotations

import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


# ---- sizes ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    """What each part runs at: one set for a GPU, one tiny set for the CPU dry run."""

    ce_shapes: tuple[tuple[int, int], ...]  # (tokens, vocab) checked in bf16 and fp32
    ce_big: tuple[int, int] | None  # tokens x vocab > 2**31 (None: the CPU's sparse strided stand-in)
    sample_batch: int
    sample_vocab: int
    timing_reps: int
    compile_reference: bool  # torch.compile(reference) rows
    # model parts (tessera.model.config.ModelConfig fields)
    layer_model: dict = field(default_factory=dict)
    layer_tokens: tuple[int, int] = (2, 512)  # batch, seq of the TE-vs-local comparison
    ckpt_model: dict = field(default_factory=dict)
    train_model: dict = field(default_factory=dict)
    train_batch: tuple[int, int] = (8, 8)  # micro, global
    train_steps: int = 12
    gen_model: dict = field(default_factory=dict)
    gen_tokens: int = 64  # image codes per generated image (one image per prompt)
    gen_batches: tuple[int, ...] = (1, 8)
    vq_images: int = 1024  # rendered synthetic scenes the `demo` VQ preset trains on
    vq_steps: int = 300
    vq_batch: int = 64
    aot_kernels: tuple[str, ...] | None = None  # None: every kernel
    aot_archs: tuple[int, ...] = (80, 90)


GPU_SIZES = Sizes(
    ce_shapes=((4096, 65536), (1000, 32000)),  # 32000: a vocabulary that is not a multiple of the block
    ce_big=(16400, 131072),  # 2_149_580_800 logits: the last rows start beyond 2**31 elements
    sample_batch=64, sample_vocab=65536, timing_reps=20, compile_reference=True,
    layer_model=dict(num_layers=4, hidden_size=1024, ffn_hidden_size=2816, num_attention_heads=8,
                     num_query_groups=None, vocab_size=65536, seq_length=1024, qk_norm=True),
    ckpt_model=dict(num_layers=4, hidden_size=512, ffn_hidden_size=1408, num_attention_heads=8,
                    num_query_groups=4, vocab_size=8192, seq_length=256, qk_norm=True),
    # ~340M parameters: 16 x 2048-token sequences per step, enough steps to see the loss fall within the budget
    train_model=dict(num_layers=16, hidden_size=1024, ffn_hidden_size=2816, num_attention_heads=8,
                     num_query_groups=None, vocab_size=65536, seq_length=2048, qk_norm=True),
    train_batch=(8, 16), train_steps=12,
    gen_model=dict(num_layers=16, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=16,
                   num_query_groups=None, vocab_size=65536, seq_length=2048, qk_norm=True),
    gen_tokens=64,
)
DRY_SIZES = Sizes(
    ce_shapes=((9, 300),), ce_big=None, sample_batch=4, sample_vocab=336, timing_reps=1, compile_reference=False,
    layer_model=dict(num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, num_query_groups=2,
                     vocab_size=256, seq_length=64, qk_norm=True),
    layer_tokens=(2, 16),
    ckpt_model=dict(num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, num_query_groups=2,
                    vocab_size=256, seq_length=64, qk_norm=True),
    train_model=dict(num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, num_query_groups=2,
                     vocab_size=256, seq_length=32, qk_norm=True),
    train_batch=(2, 4), train_steps=6,
    gen_model=dict(num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, num_query_groups=2,
                   vocab_size=2048, seq_length=128, qk_norm=True),
    gen_tokens=4, gen_batches=(1, 2),
    vq_images=48, vq_steps=12, vq_batch=8,
    aot_kernels=("ce_forward_kernel",), aot_archs=(90,),
)


# ---- parts and their results --------------------------------------------------------------------
class Skip(Exception):
    """The part cannot run here (the reason is the message)."""


class OutOfTime(Exception):
    """The part's time budget ran out before a step that needs more."""


@dataclass
class Context:
    out: Path
    dry_run: bool
    sizes: Sizes
    device: str  # "cuda" or "cpu"
    deadline: float  # time.monotonic() by which the whole run should end


class Part:
    """One part's record: checks (pass/fail with numbers), notes (numbers), a status and the time."""

    def __init__(self, name: str, title: str, budget_s: float, ctx: Context) -> None:
        self.name, self.title, self.ctx = name, title, ctx
        self.start = time.monotonic()
        self.deadline = min(self.start + budget_s, ctx.deadline) if not ctx.dry_run else float("inf")
        self.checks: list[dict] = []
        self.numbers: dict[str, Any] = {}
        self.status = "pass"
        self.reason = ""

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def need(self, seconds: float, what: str) -> None:
        """Stop the part (recorded as failed) unless ``seconds`` of its budget are left for ``what``."""
        if self.time_left() < seconds:
            raise OutOfTime(f"time budget: {self.time_left():.0f} s left, {what} needs ~{seconds:.0f} s")

    def check(self, name: str, ok: bool, **numbers: Any) -> bool:
        self.checks.append({"check": name, "status": "pass" if ok else "fail", **_plain(numbers)})
        return ok

    def note(self, **numbers: Any) -> None:
        self.numbers.update(_plain(numbers))

    def as_dict(self) -> dict:
        if self.status == "pass" and any(c["status"] == "fail" for c in self.checks):
            self.status = "fail"
            self.reason = self.reason or "; ".join(c["check"] for c in self.checks if c["status"] == "fail")
        return {"part": self.name, "title": self.title, "status": self.status, "reason": self.reason,
                "seconds": round(time.monotonic() - self.start, 1), "numbers": self.numbers, "checks": self.checks}


def _plain(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:
            v = v.item()
        if isinstance(v, float):
            v = float(f"{v:.6g}")
        out[k] = v
    return out


def run_part(fn: Callable[[Part], None], name: str, title: str, budget_s: float, ctx: Context) -> dict:
    part = Part(name, title, budget_s, ctx)
    try:
        fn(part)
    except Skip as exc:
        part.status, part.reason = "skip", str(exc)
    except OutOfTime as exc:
        part.status, part.reason = "fail", str(exc)
    except Exception as exc:  # noqa: BLE001 - one broken part must not stop the others
        part.status = "fail"
        part.reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:400]
        part.numbers["traceback"] = traceback.format_exc()[-3000:]
    finally:
        _free_device_memory()
    return part.as_dict()


def _free_device_memory() -> None:
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64 (inf when a has a NaN/inf)."""
    import torch

    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def median_ms(fn: Callable[[], object], device: str, reps: int) -> float:
    """Median milliseconds of ``fn`` over ``reps`` calls after one warm-up (CUDA events on a GPU)."""
    import torch

    fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
