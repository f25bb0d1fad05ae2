"""One of each small helper the whole package shares: atomic writes, the default device, dtype names,
this process's rank and world size.

Lowest layer (tests/test_import_layers.py): imports nothing from tessera, and torch only inside the
functions that need it, so ``tessera.config`` and the CLI's parser stay light.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# ---- atomic writes ------------------------------------------------------------------------------------
# A reader (or a resumed run) must never see a half-written file: everything is written under a temporary
# name in the same directory (same filesystem, so the rename is atomic) and renamed over the target.


def _tmp_name(path: Path) -> Path:
    # The suffix stays last: PIL and friends pick the format from it. Unique per call, so concurrent
    # writers (processes or threads) of the same file never share a temporary.
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for the block to write; rename it over ``path`` when the block
    succeeds, remove it when the block raises (``path`` is then untouched)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _json_default(o: Any) -> Any:
    # numpy / torch scalars (benchmark results), paths; anything else by its repr
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2, *, ensure_ascii: bool = True,
                      trailing_newline: bool = False, default: Callable[[Any], Any] | None = _json_default) -> Path:
    """``json.dumps(obj)`` written atomically; values JSON does not know (numpy / torch scalars, paths)
    are written as numbers / strings."""
    text = json.dumps(obj, indent=indent, ensure_ascii=ensure_ascii, default=default)
    return atomic_write_text(path, text + ("\n" if trailing_newline else ""))


@contextlib.contextmanager
def atomic_prefix(prefix: str | Path, suffixes: Sequence[str]) -> Iterator[str]:
    """For writers that name their files by a prefix (sentencepiece's ``model_prefix``, megatron's
    ``IndexedDatasetBuilder``: ``PREFIX.bin`` + ``PREFIX.idx``): yield a temporary prefix beside ``prefix``.
    When the block succeeds, each ``tmp + suffix`` the block wrote is renamed to ``prefix + suffix`` in the
    order given (put last the file whose presence marks a finished write); when it raises, they are removed."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(prefix.with_name(f".{prefix.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"))
    try:
        yield tmp
        for suffix in suffixes:
            if os.path.exists(tmp + suffix):
                os.replace(tmp + suffix, str(prefix) + suffix)
    finally:
        for suffix in suffixes:
            Path(tmp + suffix).unlink(missing_ok=True)


def swap_in_dir(tmp: str | Path, target: str | Path) -> Path:
    """Rename the finished directory ``tmp`` to ``target``. An existing ``target`` is moved aside first and
    removed only once the new one is in place, so a crash leaves either the old or the new directory."""
    tmp, target = Path(tmp), Path(target)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return target


@contextlib.contextmanager
def atomic_dir(path: str | Path, create: bool = True) -> Iterator[Path]:
    """Yield a temporary directory beside ``path`` (created unless ``create=False``, for a block that
    creates it itself, e.g. ``shutil.copytree``); ``swap_in_dir`` it to ``path`` when the block succeeds,
    remove it when the block raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if create:
        tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in_dir(tmp, path)


# ---- devices and dtypes -------------------------------------------------------------------------------
def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` when given, else the current CUDA device when there is one, else the CPU."""
    import torch

    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# Every spelling a config, a flag or a checkpoint uses -> torch's name. Flags spell the short names
# (``--dtype {fp32,bf16}``); model configs and checkpoints keep torch's (``params_dtype: bfloat16``).
DTYPE_NAMES: dict[str, str] = {
    "fp32": "float32", "float32": "float32", "float": "float32",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "float16": "float16", "half": "float16",
}
SHORT_DTYPE_NAMES: dict[str, str] = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def dtype_name(dtype: str | torch.dtype) -> str:
    """torch's name (``float32``, ``bfloat16``, ``float16``) of any spelling or of a ``torch.dtype``."""
    key = str(dtype).removeprefix("torch.")
    if key not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}: expected one of {', '.join(SHORT_DTYPE_NAMES.values())} "
                         f"(or {', '.join(SHORT_DTYPE_NAMES)})")
    return DTYPE_NAMES[key]


def short_dtype_name(dtype: str | torch.dtype) -> str:
    """The flag spelling (``fp32``, ``bf16``, ``fp16``) of any spelling or of a ``torch.dtype``."""
    return SHORT_DTYPE_NAMES[dtype_name(dtype)]


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, dtype_name(dtype))


# ---- rank and world size ------------------------------------------------------------------------------
def rank() -> int:
    """This process's rank in the default process group; 0 without one."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The default process group's size; 1 without one."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def launch_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as the launcher (torchrun, Slurm through launch/) set them in the
    environment: what a process is before it joins its process group. (0, 1, 0) when not launched."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))
