"""``tessera.model.load``: a checkpoint as a ready-to-run single-process model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tessera.model.checkpoint import (
    VOCAB_FILE,
    CheckpointError,
    load_model_state,
    load_sharded,
    model_sharded_state_dict,
    read_checkpoint_meta,
    read_model_config,
    resolve_checkpoint,
)
from tessera.model.config import ModelConfig
from tessera.utils import default_device


@dataclass
class TesseraModel:
    """A loaded checkpoint. ``module`` is the megatron GPTModel (TP=1, PP=1); its decoder layers are
    ``module.decoder.layers[i]`` (``.input_layernorm``, ``.self_attention.{linear_qkv, q_layernorm,
    k_layernorm, linear_proj}``, ``.pre_mlp_layernorm``, ``.mlp.{linear_fc1, linear_fc2}``; with
    swin_norm ``.post_self_attn_layernorm`` / ``.post_mlp_layernorm``), then ``module.decoder.final_layernorm``,
    ``module.output_layer``, embeddings ``module.embedding.word_embeddings``, RoPE ``module.rotary_pos_emb``."""

    config: ModelConfig
    vocab: Any  # tessera.tokenizers.vocab.Vocabulary | None
    module: torch.nn.Module
    device: torch.device
    step: int = 0
    path: Path | None = None
    # an adapter checkpoint's base (tessera.model.checkpoint.BaseReference) and LoRA settings; ``module``
    # holds the adapters unmerged when loaded with adapters="unmerged"
    base: Any = None
    lora: Any = None  # tessera.model.lora.LoRASpec | None

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids LongTensor [b, s] -> logits [b, s, vocab_size] (eval mode, causal, no grad)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.seq_length:
            raise ValueError(f"sequence length {input_ids.shape[1]} > model seq_length {self.config.seq_length}")
        self.module.eval()
        ids = input_ids.to(self.device)
        pos = torch.arange(ids.shape[1], device=self.device).unsqueeze(0).expand_as(ids)
        return self.module(ids, pos, None)


def _load_into(model: torch.nn.Module, path: Path, part: str) -> None:
    """``part`` of the dist checkpoint at ``path`` into ``model`` (the other part keeps its values)."""
    load_model_state(model, load_sharded(path, model_sharded_state_dict(model, part))["model"], part)


# fields that change how the same weights are computed with, not the weights: a fine-tune may change them
_FREE_FIELDS = frozenset({"recompute", "recompute_method", "recompute_num_layers", "hidden_dropout",
                          "attention_dropout"})


def _check_same_model(base_path: Path, cfg: ModelConfig, adapter_path: Path) -> None:
    from tessera.config import to_dict

    a, b = to_dict(read_model_config(base_path)), to_dict(cfg)
    diff = sorted(k for k in set(a) | set(b) if k not in _FREE_FIELDS and a.get(k) != b.get(k))
    if diff:
        raise CheckpointError(f"{adapter_path}: its model differs from its base {base_path} in "
                              + ", ".join(f"{k} ({b.get(k)!r} vs {a.get(k)!r})" for k in diff))


def load(checkpoint_dir: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
         adapters: str = "merge", base: str | Path | None = None, verify_base: bool = True) -> TesseraModel:
    """Load the model of a checkpoint (a checkpoint dir, a run dir, or its ``checkpoints`` dir).

    Initialises a 1-process parallel state if none exists; only the ``model`` keys of the dist
    checkpoint are read (optimizer etc. are ignored). Any TP/PP layout of the save loads here.

    An adapter checkpoint (a LoRA run) loads its base (the path it records, or ``base``; its files must
    hash to the recorded SHA-256 unless ``verify_base`` is False), then its adapters; ``adapters="merge"``
    folds them into the weights (a plain model, what ``tessera convert to-hf`` exports), ``"unmerged"``
    keeps them as separate low-rank factors on the linears (``tessera generate --adapters unmerged``).
    """
    from megatron.core import parallel_state

    from tessera.model.chameleon import build_model
    from tessera.model.checkpoint import BaseReference, adapter_meta
    from tessera.model.lora import LoRASpec, apply_lora, merge_lora
    from tessera.model.parallel import ensure_single_process

    if adapters not in ("merge", "unmerged"):
        raise ValueError(f"adapters must be 'merge' or 'unmerged', got {adapters!r}")
    path = resolve_checkpoint(checkpoint_dir)
    meta = read_checkpoint_meta(path)
    cfg = read_model_config(path)
    vocab = None
    if (path / VOCAB_FILE).is_file():
        from tessera.tokenizers.vocab import Vocabulary

        vocab = Vocabulary.load(path / VOCAB_FILE)
    ensure_single_process()
    if parallel_state.get_tensor_model_parallel_world_size() != 1 or parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise CheckpointError(
            f"{path}: tessera.model.load builds the whole model in one process, but this process runs "
            "TP or PP > 1; load inside training with dist_checkpointing instead"
        )
    model = build_model(cfg, pre_process=True, post_process=True)
    lora_meta, ref, spec = adapter_meta(meta), None, None
    if lora_meta is None:
        _load_into(model, path, "all")
    else:
        ref = BaseReference.from_meta(meta, path)
        where = str(path)
        base_path = ref.check(base or ref.path, where) if verify_base else resolve_checkpoint(base or ref.path)
        if adapter_meta(read_checkpoint_meta(base_path)) is not None:
            raise CheckpointError(f"{path}: its base {base_path} is itself an adapter checkpoint")
        _check_same_model(base_path, cfg, path)
        _load_into(model, base_path, "base")
        spec = LoRASpec.from_dict(lora_meta)
        apply_lora(model, spec, seed=0)  # fresh factors, overwritten by the checkpoint's
        _load_into(model, path, "adapters")
        if adapters == "merge":
            merge_lora(model)
            for p in model.parameters():  # a plain model, as a full checkpoint loads
                p.requires_grad_(True)
        if vocab is None and (base_path / VOCAB_FILE).is_file():
            from tessera.tokenizers.vocab import Vocabulary

            vocab = Vocabulary.load(base_path / VOCAB_FILE)
        ref = dataclasses.replace(ref, path=str(base_path))
    device = default_device(device)
    model.to(device=device, dtype=dtype) if dtype is not None else model.to(device=device)
    model.eval()
    return TesseraModel(config=cfg, vocab=vocab, module=model, device=device, step=int(meta.get("step", 0)), path=path,
                        base=ref, lora=spec)
