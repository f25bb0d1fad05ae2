"""Self-attention forward and backward for CPU training (``cpu_attention.c``), as an autograd function.

PyTorch's CPU flash attention runs its block GEMMs at about 15% of the machine's matmul peak, which
made attention a third of a small model's CPU training step. ``cpu_attention.c`` computes the same
FlashAttention-2 algorithm with register-blocked micro-kernels (fp32; bf16 products with fp32
accumulation for bf16 inputs where the CPU has AVX512-BF16) and reads q, k, v in the caller's strides
(docs/kernels.md, "CPU training attention"). ``SDPAttention`` (tessera/model/attention.py) uses it for CPU
tensors when ``supports()`` says the case is covered and ``prefer_cpu_kernel`` picks it; everything else goes to
``F.scaled_dot_product_attention``.

Built like the fused decode step (``tessera.kernels._cbuild``): compiled once per source, compiler and
CPU into ``$TESSERA_CACHE_DIR``. Without a C compiler, or with ``TESSERA_CPU_ATTENTION=0``,
``load()`` returns None and attention stays on SDPA.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from tessera.kernels import _cbuild

SOURCE = Path(__file__).with_name("cpu_attention.c")
# fused multiply-adds in the block products (ISO C mode would otherwise keep every product rounded)
FLAGS = _cbuild.DEFAULT_FLAGS + ("-ffp-contract=fast",)
DTYPES = (torch.float32, torch.bfloat16)


class View(ctypes.Structure):
    """A [batch, heads, seq, dim] tensor: data pointer and element strides (dim stride 1)."""
    _fields_ = [("data", ctypes.c_void_p), ("sb", ctypes.c_int64), ("sh", ctypes.c_int64), ("ss", ctypes.c_int64)]


class Shape(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int32) for name in
                ("batch", "heads", "groups", "seq", "head_dim", "causal", "bf16", "threads")] + [
                ("scale", ctypes.c_float), ("bf16_products", ctypes.c_int32)]


# bf16 inputs: block products in bf16 (vdpbf16ps, fp32 accumulation) where the build has AVX512-BF16;
# False multiplies in fp32 (the path every other CPU takes; tests switch it to cover both)
BF16_PRODUCTS = True


_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}
_why_not: list[str] = []


def _declare(lib: ctypes.CDLL) -> None:
    view = ctypes.POINTER(View)
    lib.tessera_attn_forward.restype = ctypes.c_int
    lib.tessera_attn_forward.argtypes = [ctypes.POINTER(Shape), view, view, view, view, ctypes.c_void_p]
    lib.tessera_attn_backward.restype = ctypes.c_int
    lib.tessera_attn_backward.argtypes = [ctypes.POINTER(Shape)] + [view] * 5 + [ctypes.c_void_p] + [view] * 3
    lib.tessera_attn_bf16_products.restype = ctypes.c_int
    lib.tessera_attn_bf16_products.argtypes = []


def load() -> ctypes.CDLL | None:
    """The compiled library, or None (see ``unavailable_reason()``)."""
    return _cbuild.load_library(SOURCE, FLAGS, disable_env="TESSERA_CPU_ATTENTION",
                                fallback="using scaled_dot_product_attention", declare=_declare,
                                loaded=_loaded, why_not=_why_not, lock=_lock)


def unavailable_reason() -> str | None:
    return _why_not[0] if _why_not else None


def bf16_products() -> bool:
    """Whether bf16 inputs are multiplied in bf16 here (the build found AVX512-BF16 and BF16_PRODUCTS is on)."""
    lib = load()
    return bool(lib is not None and lib.tessera_attn_bf16_products() and BF16_PRODUCTS)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> bool:
    """True when ``attention`` covers this call: CPU, fp32 or bf16 (one dtype), no dropout, self-attention
    (same length for queries and keys), whole GQA groups, head_dim a multiple of 16."""
    b, h, s, d = q.shape
    return (q.device.type == "cpu" and dropout_p == 0.0 and q.dtype in DTYPES
            and k.dtype == q.dtype and v.dtype == q.dtype and k.shape == v.shape
            and k.shape[0] == b and k.shape[2] == s and k.shape[3] == d and h % k.shape[1] == 0
            and d % 16 == 0 and 0 < s < 2**31 and load() is not None)


def _view(t: torch.Tensor) -> View:
    return View(t.data_ptr(), t.stride(0), t.stride(1), t.stride(2))


def _dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(3) == 1 else t.contiguous()


class _CPUAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float):
        q, k, v = (_dim_contiguous(t) for t in (q, k, v))
        b, h, s, d = q.shape
        shape = Shape(b, h, k.shape[1], s, d, int(causal), int(q.dtype == torch.bfloat16), torch.get_num_threads(), scale,
                      int(BF16_PRODUCTS))
        # empty_like keeps q's memory order: megatron's [s, b, heads, dim] stays that way, so the caller's
        # permute back to [s, b, hidden] is a view, not a copy
        out = torch.empty_like(q)
        lse = torch.empty(b, h, s, dtype=torch.float32)
        if load().tessera_attn_forward(shape, _view(q), _view(k), _view(v), _view(out), lse.data_ptr()) != 0:
            raise MemoryError("cpu_attention.c: could not allocate its per-thread block buffers")
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.shape = shape
        return out

    @staticmethod
    @once_differentiable  # the C backward is not itself differentiable: double backward raises, never silently wrong
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dout = _dim_contiguous(dout)
        dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
        ctx.shape.threads = torch.get_num_threads()
        rc = load().tessera_attn_backward(ctx.shape, _view(q), _view(k), _view(v), _view(out), _view(dout),
                                          lse.data_ptr(), _view(dq), _view(dk), _view(dv))
        if rc != 0:
            raise MemoryError("cpu_attention.c: could not allocate its per-thread head buffers")
        return dq, dk, dv, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)`` for
    [batch, heads, seq, dim] tensors in any strides; check ``supports()`` first."""
    if not supports(q, k, v, 0.0):
        raise ValueError(f"CPU attention does not cover q {tuple(q.shape)} {q.dtype} {q.device}, k {tuple(k.shape)} {k.dtype}, "
                         f"v {tuple(v.shape)} {v.dtype} (reason: {unavailable_reason() or 'shape, dtype or device'})")
    return _CPUAttention.apply(q, k, v, bool(causal), float(q.shape[-1] ** -0.5 if scale is None else scale))
