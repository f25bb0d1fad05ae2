"""The converters' only contact with tessera.model: build a GPTModel around given tensors and save
it as a Tessera checkpoint, or load a checkpoint's full state dict. Single process (TP=1, PP=1);
dist_checkpointing re-shards the result for any TP/PP layout when training loads it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from tessera.config import ConfigError, from_dict
from tessera.convert.errors import ConvertError
from tessera.model.layer_names import match_names, to_local_names
from tessera.utils import torch_dtype


def model_config(fields: dict[str, Any]):
    """A ``ModelConfig`` with the given fields (the rest at their defaults), validated."""
    from tessera.model.config import ModelConfig

    known = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        return from_dict(ModelConfig, {k: v for k, v in fields.items() if k in known}, "converted config")
    except (ConfigError, ValueError) as exc:
        raise ConvertError(f"converted model config is invalid: {exc}") from exc


def _ensure_parallel() -> None:
    from tessera.model.parallel import ensure_single_process

    ensure_single_process()


# With Transformer Engine (a CUDA machine) the pre-norms are fused into linear_qkv / linear_fc1 and
# named after them; the converters speak the local spec's names and translate at the model boundary.
to_model_names = match_names


def _param_keys(module: torch.nn.Module) -> set[str]:
    # state_dict keys minus megatron's per-module "_extra_state" (TE / fp8 bookkeeping, no weights)
    return {k for k in module.state_dict() if not k.endswith("_extra_state")}


def save_tessera_checkpoint(
    cfg: Any, state: dict[str, torch.Tensor], out_dir: Path, vocab: Any, extra_config: dict | None = None
) -> None:
    """Build the GPTModel for ``cfg`` without allocating weights, adopt ``state`` and save."""
    from tessera.model.chameleon import build_model
    from tessera.model.checkpoint import save_model_checkpoint

    _ensure_parallel()
    dtype = torch_dtype(cfg.params_dtype)
    # CPU initialisation even on a CUDA machine: under the meta device no weights are allocated at all,
    # and the converted tensors are adopted as they are (assign=True) instead of copied.
    try:
        with torch.device("meta"):
            model = build_model(cfg, pre_process=True, post_process=True, use_cpu_initialization=True)
        on_meta = True
    except Exception:  # some megatron versions insist on real tensors at construction
        model = build_model(cfg, pre_process=True, post_process=True, use_cpu_initialization=True)
        on_meta = False
    expected = _param_keys(model)
    state = to_model_names(state, expected)
    missing = sorted(expected - set(state))
    extra = sorted(set(state) - expected)
    if missing or extra:
        raise ConvertError(
            f"converted weights do not match Tessera's model: missing {missing[:4]}, unexpected {extra[:4]}"
        )
    ref = model.state_dict()
    for k in expected:
        if tuple(ref[k].shape) != tuple(state[k].shape):
            raise ConvertError(f"tensor {k!r}: converted shape {tuple(state[k].shape)}, model expects {tuple(ref[k].shape)}")
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=on_meta)
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise ConvertError(f"parameters left unset after conversion: {leftover[:4]}")
    model.eval()
    save_model_checkpoint(model, cfg, out_dir, vocab=vocab, extra_config=extra_config, step=0)


def load_tessera_state(ckpt: str | Path, dtype: str | None = None,
                       base: str | Path | None = None) -> tuple[Any, Any, dict[str, torch.Tensor], Path]:
    """(ModelConfig, Vocabulary | None, full state dict, resolved checkpoint dir). An adapter checkpoint (LoRA)
    comes with its adapters merged into the weights (its base: the recorded one, or ``base``)."""
    import tessera.model as tm
    from tessera.model.checkpoint import resolve_checkpoint

    path = resolve_checkpoint(ckpt)
    loaded = tm.load(path, device="cpu", dtype=torch_dtype(dtype) if dtype else None, adapters="merge", base=base)
    # No copies: the returned tensors are the module's own; once the caller drops the module they are
    # freed one by one as the export consumes them.
    state = {k: v.detach() for k, v in loaded.module.state_dict().items() if not k.endswith("_extra_state")}
    return loaded.config, loaded.vocab, to_local_names(state), Path(path)
