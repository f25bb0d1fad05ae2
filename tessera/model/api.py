"""``tessera.model.load``: a checkpoint as a ready-to-run single-process model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tessera.model.checkpoint import (
    DIST_DIR,
    VOCAB_FILE,
    CheckpointError,
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


def load(checkpoint_dir: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> TesseraModel:
    """Load the model of a checkpoint (a checkpoint dir, a run dir, or its ``checkpoints`` dir).

    Initialises a 1-process parallel state if none exists; only the ``model`` keys of the dist
    checkpoint are read (optimizer etc. are ignored). Any TP/PP layout of the save loads here.
    """
    from megatron.core import dist_checkpointing, parallel_state
    from torch.distributed.checkpoint.api import CheckpointException

    from tessera.model.chameleon import build_model
    from tessera.model.parallel import ensure_single_process

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
    if not (path / DIST_DIR).is_dir():
        raise CheckpointError(f"{path / DIST_DIR}: missing (incomplete checkpoint)")
    model = build_model(cfg, pre_process=True, post_process=True)
    # megatron raises several types for missing / mismatched tensors; torch.distributed.checkpoint's
    # CheckpointException is a BaseException
    try:
        state = dist_checkpointing.load(model_sharded_state_dict(model), str(path / DIST_DIR))
    except (Exception, CheckpointException) as exc:
        raise CheckpointError(f"{path / DIST_DIR}: cannot load the model weights: {exc}") from exc
    model.load_state_dict(state["model"])
    device = default_device(device)
    model.to(device=device, dtype=dtype) if dtype is not None else model.to(device=device)
    model.eval()
    return TesseraModel(config=cfg, vocab=vocab, module=model, device=device, step=int(meta.get("step", 0)), path=path)
