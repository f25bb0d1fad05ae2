"""Build one of the project's plain-C CPU kernels with the host compiler and cache the shared library.

The library is compiled once per (source, flags, compiler, CPU) into ``$TESSERA_CACHE_DIR`` (default
``~/.cache/tessera``), under a name keyed by all four, so a cache shared by different machines never
loads a build made for another CPU (``-march=native``). Compiling takes about a second and needs no
PyTorch headers: the kernels are called through ctypes with tensors' data pointers.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from tessera.utils import atomic_path

DEFAULT_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC", "-std=c11")


def cache_dir() -> Path:
    return Path(os.environ.get("TESSERA_CACHE_DIR") or Path.home() / ".cache" / "tessera")


def compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def cpu_signature() -> str:
    """What -march=native depends on."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_path(source: Path, flags: Sequence[str], cc: str, cpu: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256(source.read_bytes() + repr((tuple(flags), version, cpu, platform.machine())).encode()).hexdigest()[:16]
    return cache_dir() / f"{source.stem}-{key}.so"


def build(cc: str, source: Path, flags: Sequence[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a private name and rename: concurrent processes never load a half-written library.
    with atomic_path(target) as tmp:
        proc = subprocess.run([cc, *flags, "-o", str(tmp), str(source), "-lm"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed on {source}:\n{proc.stderr.strip()[-2000:]}")


def load_library(source: Path, flags: Sequence[str], *, disable_env: str, fallback: str,
                 declare: Callable[[ctypes.CDLL], None], loaded: dict, why_not: list, lock: threading.Lock,
                 path_for: Callable[[str], Path] | None = None) -> ctypes.CDLL | None:
    """``source`` built (once) and loaded, with ``declare`` setting its functions' ctypes signatures; or
    None, with the reason in ``why_not[0]``: ``disable_env=0`` in the environment, no compiler, or a build
    or load that failed (warned about once, naming ``fallback``, what the caller does instead).
    ``loaded`` / ``why_not`` / ``lock`` are the calling module's cache, so each library loads once per
    process; ``path_for(cc)`` overrides where the build goes (default: ``library_path``)."""
    if os.environ.get(disable_env, "1") == "0":
        why_not[:] = [f"disabled by {disable_env}=0"]
        return None
    with lock:
        if "lib" in loaded:
            return loaded["lib"]
        lib = None
        cc = compiler()
        if cc is None:
            why_not[:] = ["no C compiler (cc/gcc/clang, or $CC) on PATH"]
        else:
            try:
                path = path_for(cc) if path_for is not None else library_path(source, flags, cc, cpu_signature())
                if not path.exists():
                    build(cc, source, flags, path)
                lib = ctypes.CDLL(str(path))
                declare(lib)
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                why_not[:] = [str(exc)]
                warnings.warn(f"{source.name} unavailable, {fallback}: {exc}", stacklevel=3)
                lib = None
        loaded["lib"] = lib
        return lib
