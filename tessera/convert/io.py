"""File plumbing shared by the converters: atomic output directories, (sharded) safetensors."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tessera.convert.errors import ConvertError
from tessera.utils import atomic_dir

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp path beside ``out_dir`` (not yet created: the block creates it); rename it to
    ``out_dir`` only if the block succeeds, so a crash never leaves a half-written directory that
    looks complete."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ConvertError(f"{out_dir}: output directory already exists (pass --overwrite to replace it)")
    with atomic_dir(out_dir, create=False) as tmp:
        yield tmp


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConvertError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConvertError(f"{path}: invalid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: expected a JSON object at the top level")
    return data


def _load_one(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConvertError(f"{path}: weight shard missing")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (SafetensorError, RuntimeError, OSError, EOFError) as exc:
        raise ConvertError(f"{path}: unreadable weight file: {exc}") from exc


def load_hf_state_dict(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a transformers checkpoint: model.safetensors, a sharded safetensors index, or
    the legacy pytorch_model.bin (+ index). A shard named by the index but absent is an error."""
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index_path = hf_dir / index_name
        if index_path.is_file():
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConvertError(f"{index_path}: no weight_map")
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                part = _load_one(hf_dir / shard)
                state.update(part)
            missing = sorted(k for k in weight_map if k not in state)
            if missing:
                raise ConvertError(f"{index_path}: tensor {missing[0]!r} listed in the index is in no shard")
            return state
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (hf_dir / name).is_file():
            return _load_one(hf_dir / name)
    raise ConvertError(f"{hf_dir}: no model.safetensors, {SAFE_INDEX}, pytorch_model.bin or {BIN_INDEX}")


def save_hf_state_dict(state: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write safetensors shards of at most ``max_shard_bytes`` (+ index when more than one), the
    layout ``from_pretrained`` reads."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in state:
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key].contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    total = 0
    for n, shard in enumerate(shards, start=1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    (out_dir / SAFE_INDEX).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
