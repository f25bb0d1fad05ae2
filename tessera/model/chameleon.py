"""Build the Chameleon GPTModel (megatron-core) for this process's place in the TP x PP layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from tessera.model.config import ModelConfig
from tessera.model.cpu import enable_cpu_compat
from tessera.model.spec import chameleon_layer_spec

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def transformer_config(cfg: ModelConfig, **overrides) -> TransformerConfig:
    """megatron's TransformerConfig for ``cfg`` under the current parallel state.

    On the CPU: weights initialised on the CPU, no CUDA fusions, fp32 or bf16 as ``cfg.params_dtype`` says.
    """
    cuda = torch.cuda.is_available()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    vp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    cfg.validate(tp, pp, vp)
    dtype = torch_dtype(cfg.params_dtype)
    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        qk_layernorm=cfg.qk_norm,
        add_bias_linear=False,
        gated_linear_unit=True,  # SwiGLU: linear_fc1 = [gate; up]
        activation_func=F.silu,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vp,
        sequence_parallel=False,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not cuda,
        # The fused kernels below are CUDA (jit / apex / TE) paths.
        bias_dropout_fusion=cuda,
        apply_rope_fusion=False,
        masked_softmax_fusion=cuda,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_model(
    cfg: ModelConfig,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vp_stage: int | None = None,
    **config_overrides,
) -> GPTModel:
    """The GPTModel chunk this rank holds. ``pre_process`` / ``post_process`` default to whether this
    (virtual) pipeline stage is the first / last. Needs ``initialize_parallel`` first.

    Forward: ``model(input_ids [b, s], position_ids [b, s], attention_mask=None (causal), labels=None)``
    -> logits ``[b, s, vocab_size / TP]`` on the last stage (hidden states [s, b, h] elsewhere).
    Decoder layers: ``model.decoder.layers[i]`` (``.self_attention.linear_qkv``, ``.q_layernorm``, ...).
    """
    enable_cpu_compat()
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("megatron parallel state is not initialised: call tessera.model.initialize_parallel() first")
    vp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if vp is not None and vp_stage is None:
        raise ValueError("virtual pipeline parallelism is on: pass vp_stage")
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    config = transformer_config(cfg, **config_overrides)
    model = GPTModel(
        config=config,
        transformer_layer_spec=chameleon_layer_spec(cfg),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,  # logits stay vocab-sharded; language_model_loss handles TP
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=cfg.rotary_base,
        vp_stage=vp_stage,
    )
    # megatron's torch norms ignore params_dtype (Float16Module would cast them later): make every
    # parameter params_dtype now so a bf16 model is bf16 throughout (buffers such as RoPE's stay fp32).
    for p in model.parameters():
        if p.dtype != config.params_dtype:
            p.data = p.data.to(config.params_dtype)
    if pre_process:
        # megatron drops out embeddings with hidden_dropout; Chameleon's dropout is only on the
        # attention / MLP branches.
        model.embedding.embedding_dropout.p = 0.0
    model.tessera_config = cfg  # the ModelConfig travels with the module (KV decoding reads swin_norm etc.)
    return model
