"""The fused CPU decoding step (``cpu_decode.c``): build it with the host C compiler, load it with ctypes.

A decode step of a small model on the CPU is dominated by per-op costs, not arithmetic: ~17 small
matrix-vector products and ~100 tiny elementwise ops, each a dispatch plus a kernel launch through
PyTorch. ``cpu_decode.c`` does the whole step in one call (docs/generation.md, "Fused CPU step").

The shared library is compiled once per source / compiler / CPU into ``$TESSERA_CACHE_DIR`` (default
``~/.cache/tessera``), with ``-O3 -march=native``; compiling takes about a second and needs no PyTorch
headers (plain C, called through ctypes with tensors' data pointers). Without a C compiler, or with
``TESSERA_CPU_DECODE=0``, ``load()`` returns None and the decoder keeps its PyTorch path.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

from tessera.kernels import _cbuild

SOURCE = Path(__file__).with_name("cpu_decode.c")
FLAGS = _cbuild.DEFAULT_FLAGS

NORM_NONE, NORM_RMS, NORM_LAYER = 0, 1, 2


class Norm(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("eps", ctypes.c_float),
                ("weight", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


class Layer(ctypes.Structure):
    _fields_ = [
        ("ln_attn", Norm), ("post_attn", Norm), ("ln_mlp", Norm), ("post_mlp", Norm),
        ("qkv", ctypes.c_void_p), ("proj", ctypes.c_void_p), ("fc1", ctypes.c_void_p), ("fc2", ctypes.c_void_p),
        ("qk_weight", ctypes.c_void_p), ("qk_bias", ctypes.c_void_p), ("qk_eps", ctypes.c_float),
        ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p),
    ]


class Model(ctypes.Structure):
    _fields_ = [
        ("layers", ctypes.c_int32), ("hidden", ctypes.c_int32), ("heads", ctypes.c_int32),
        ("groups", ctypes.c_int32), ("head_dim", ctypes.c_int32), ("ffn", ctypes.c_int32),
        ("vocab", ctypes.c_int32), ("rot", ctypes.c_int32), ("batch", ctypes.c_int32),
        ("max_len", ctypes.c_int32), ("bf16", ctypes.c_int32), ("threads", ctypes.c_int32),
        ("q_scale", ctypes.c_float),
        ("embedding", ctypes.c_void_p), ("embedding_rows", ctypes.c_int64), ("final_norm", Norm), ("output", ctypes.c_void_p),
        ("cos", ctypes.c_void_p), ("sin_signed", ctypes.c_void_p), ("layer", ctypes.POINTER(Layer)),
    ]


_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}
_why_not: list[str] = []


def _compiler() -> str | None:
    return _cbuild.compiler()


def _cpu_signature() -> str:
    """What -march=native depends on, so a cache shared by different CPUs never loads a foreign build."""
    return _cbuild.cpu_signature()


def _library_path(cc: str) -> Path:
    return _cbuild.library_path(SOURCE, FLAGS, cc, _cpu_signature())


def _declare(lib: ctypes.CDLL) -> None:
    lib.tessera_decode_step.restype = ctypes.c_int
    lib.tessera_decode_step.argtypes = [ctypes.POINTER(Model)] + [ctypes.c_void_p] * 3 + [
        ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    lib.tessera_decode_scratch_floats.restype = ctypes.c_int64
    lib.tessera_decode_scratch_floats.argtypes = [ctypes.POINTER(Model)]


def load() -> ctypes.CDLL | None:
    """The compiled library, or None (see ``unavailable_reason()``)."""
    return _cbuild.load_library(SOURCE, FLAGS, disable_env="TESSERA_CPU_DECODE", fallback="using the PyTorch path",
                                declare=_declare, loaded=_loaded, why_not=_why_not, lock=_lock,
                                path_for=_library_path)


def unavailable_reason() -> str | None:
    return _why_not[0] if _why_not else None
