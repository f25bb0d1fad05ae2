"""Exact parameter counts, from a GPTModel built on the meta device (no weight memory)."""

from __future__ import annotations

import dataclasses

import torch

from tessera.model.config import ModelConfig


def analytic_parameter_count(cfg: ModelConfig) -> int:
    """Closed form of the Chameleon GPTModel's parameters (tests check it against meta-built models)."""
    h, hd, heads, groups = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.kv_groups
    attn = h * (heads + 2 * groups) * hd + heads * hd * h
    qk = 2 * (heads + groups) * hd if cfg.qk_norm else 0  # per-head weight + bias
    mlp = 3 * h * cfg.ffn_hidden_size  # SwiGLU: gate, up, down
    norms = 2 * h
    return cfg.num_layers * (attn + qk + mlp + norms) + h + 2 * cfg.vocab_size * h  # final norm, untied emb/head


def count_parameters(cfg: ModelConfig) -> int:
    """Every parameter of the full (TP=1, PP=1) model, counted on a meta-device build.

    Uses a 1-process parallel state (created and torn down here if none exists). If this process already
    runs another layout (TP or PP > 1) a full model cannot be built here, so the closed form is used.
    """
    from megatron.core import parallel_state

    from tessera.model.chameleon import build_model
    from tessera.model.parallel import destroy_parallel, initialize_parallel

    created = False
    if not parallel_state.model_parallel_is_initialized():
        initialize_parallel(1, 1)
        created = True
    try:
        if (
            parallel_state.get_tensor_model_parallel_world_size() != 1
            or parallel_state.get_pipeline_model_parallel_world_size() != 1
        ):
            return analytic_parameter_count(cfg)
        meta_cfg = dataclasses.replace(cfg)
        # use_cpu_initialization keeps megatron from asking for a CUDA device; on meta nothing is allocated.
        # The local spec: it has the TE spec's parameters (a fused norm is the same [hidden] weight), and
        # TE's modules would allocate on the CPU device megatron names for them, meta context or not.
        with torch.device("meta"):
            model = build_model(meta_cfg, pre_process=True, post_process=True, use_te=False,
                                perform_initialization=False, use_cpu_initialization=True)
        return sum(p.numel() for p in model.parameters())
    finally:
        if created:
            destroy_parallel()


def parameter_breakdown(cfg: ModelConfig) -> dict[str, int]:
    """Counts per part (embedding, per layer, final norm, output layer) from the closed form."""
    total = analytic_parameter_count(cfg)
    emb = cfg.vocab_size * cfg.hidden_size
    per_layer = (total - 2 * emb - cfg.hidden_size) // cfg.num_layers
    return {"embedding": emb, "per_layer": per_layer, "layers": per_layer * cfg.num_layers,
            "final_norm": cfg.hidden_size, "output_layer": emb}
