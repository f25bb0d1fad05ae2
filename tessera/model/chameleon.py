"""Build the Chameleon GPTModel (megatron-core) for this process's place in the TP x PP layout."""

from __future__ import annotations

import hashlib
import re

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.config_logger import has_config_logger_enabled
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from tessera.model import linear
from tessera.model.config import ModelConfig
from tessera.model.cpu import cuda_missing, enable_cpu_compat
from tessera.model.implementations import report_once
from tessera.model.rope import patch_rope_without_copies
from tessera.model.spec import chameleon_block_spec, te_status
from tessera.model.swiglu import SwiGLU
from tessera.utils import torch_dtype


def recompute_settings(cfg: ModelConfig, layers_per_chunk: int) -> dict:
    """``model.recompute`` as megatron's TransformerConfig fields: selective recomputes core attention
    (megatron's default ``recompute_modules``); full recomputes whole layers, ``uniform`` in groups of
    ``recompute_num_layers`` (default 1), ``block`` the first ``recompute_num_layers`` of each stage
    (default all of them)."""
    if cfg.recompute == "none":
        return {"recompute_granularity": None, "recompute_method": None, "recompute_num_layers": None}
    if cfg.recompute == "selective":
        return {"recompute_granularity": "selective", "recompute_method": None, "recompute_num_layers": None}
    n = cfg.recompute_num_layers or (1 if cfg.recompute_method == "uniform" else layers_per_chunk)
    return {"recompute_granularity": "full", "recompute_method": cfg.recompute_method, "recompute_num_layers": n}


def rope_fusion_available() -> bool:
    """megatron's ``apply_rope_fusion`` for THD rows: Transformer Engine's fused RoPE kernel, on CUDA."""
    if not torch.cuda.is_available():
        return False
    from megatron.core.models.common.embeddings import rope_utils

    return rope_utils.fused_apply_rotary_pos_emb_thd is not None


def transformer_config(cfg: ModelConfig, *, sequence_parallel: bool = False, gradient_accumulation_fusion: bool = False,
                       deterministic_mode: bool = False, packed_sequences: bool = False,
                       **overrides) -> TransformerConfig:
    """megatron's TransformerConfig for ``cfg`` under the current parallel state.

    Training features the run config decides (not the model's shape): ``sequence_parallel`` (needs TP > 1),
    ``gradient_accumulation_fusion`` (the weight-gradient GEMM accumulates into DDP's fp32 main_grad: needs
    CUDA and apex's ``fused_weight_gradient_mlp_cuda``), ``deterministic_mode`` (megatron's),
    ``packed_sequences`` (document-masked THD rows: TE's fused RoPE where ``rope_fusion_available``, since
    megatron's unfused THD RoPE reads ``cu_seqlens`` on the host twice per call); activation recomputation
    comes from ``cfg.recompute``. On the CPU: weights initialised on the CPU, no CUDA fusions, fp32 or bf16
    as ``cfg.params_dtype`` says.
    """
    cuda = torch.cuda.is_available()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    vp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    cfg.validate(tp, pp, vp)
    if sequence_parallel and tp == 1:
        raise ValueError("sequence_parallel needs tensor parallelism (TP > 1)")
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
        # The spec builds our per-head QK-norm from cfg.qk_norm; megatron-core >= 0.18 refuses a spec with
        # q/k_layernorm unless this flag is set. build_model clears it once the layers exist: its only
        # other effect is a SUM over TP ranks of every q/k_layernorm grad in finalize_model_grads (right
        # for megatron's one shared [head_dim] weight, wrong for ours, split across TP with the heads).
        qk_layernorm=cfg.qk_norm,
        add_bias_linear=False,
        gated_linear_unit=True,  # SwiGLU: linear_fc1 = [gate; up]
        activation_func=F.silu,
        # megatron's MLP then applies the spec's activation module to the whole fc1 output: ours is
        # swiglu.SwiGLU (pure PyTorch, fewer temporaries than megatron's unfused GLU); no TE involved
        use_te_activation_func=True,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vp,
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not cuda,
        # The fused kernels below are CUDA (jit / apex / TE) paths.
        bias_dropout_fusion=cuda,
        apply_rope_fusion=packed_sequences and rope_fusion_available(),
        masked_softmax_fusion=cuda,
        gradient_accumulation_fusion=gradient_accumulation_fusion,
        persist_layer_norm=False,
        deterministic_mode=deterministic_mode,
        # megatron's torch.cuda.synchronize() after every batched pipeline send/recv works around a
        # batch_isend_irecv race that the torch this project requires (>= 2.6) does not have (its work
        # objects wait on the coalesced NCCL streams); it would stall the host per micro-batch
        batch_p2p_sync=False,
        **recompute_settings(cfg, cfg.num_layers // (pp * (vp or 1))),
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


class ChameleonGPTModel(GPTModel):
    """megatron-core's GPTModel with batch-first logits computed without transposing them.

    GPTModel runs its output layer on [s, b, h] and returns ``logits.transpose(0, 1).contiguous()``: a
    vocabulary-wide copy in the forward and another of the gradient in the backward (the output layer's
    backward makes the transposed gradient contiguous). Here the [s, b, h] hidden states are made
    batch-first BEFORE the output layer, a copy V/h times smaller, so the logits come out [b, s, V/TP]
    as they are. Same layer, same weights, same result layout; only the order in which the matmul visits
    the tokens differs (and with one TP rank the output layer is ``F.linear``, as the layers' linears:
    linear.single_rank_plain). Every case this does not cover (labels given, inference contexts,
    multi-token prediction, sequence parallelism, config logging) goes to megatron's ``_postprocess``.
    """

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, rotary_pos_emb, rotary_pos_cos,
                     rotary_pos_sin, mtp_in_postprocess=None, **kwargs):
        fast = (self.post_process and labels is None and not mtp_in_postprocess
                and self.config.mtp_num_layers is None and kwargs.get("inference_context") is None
                and kwargs.get("inference_params") is None and not self.output_layer.sequence_parallel
                and not has_config_logger_enabled(self.config))
        if not fast:
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, rotary_pos_emb,
                                        rotary_pos_cos, rotary_pos_sin, mtp_in_postprocess=mtp_in_postprocess,
                                        **kwargs)
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        hidden_states = hidden_states.transpose(0, 1).contiguous()
        # one TP rank: F.linear (linear.py), unless something hooks the layer's forward (megatron DDP's
        # overlapped parameter all-gather waits for the weight in a forward pre-hook) or a subclass
        # changes it (a LoRA adapter: tessera.model.lora)
        if (weight is None and linear.single_rank_plain(self.output_layer)
                and not self.output_layer._forward_pre_hooks
                and type(self.output_layer).forward is tensor_parallel.ColumnParallelLinear.forward):
            return F.linear(linear.row_major(hidden_states), self.output_layer.weight)
        logits, _ = self.output_layer(hidden_states, weight=weight,
                                      runtime_gather_output=kwargs.get("runtime_gather_output"))
        return logits


def _choose_transformer_engine(use_te: bool | None) -> tuple[bool, str]:
    """(use the TE spec?, why) for build_model's ``use_te``."""
    if use_te is None:
        status = te_status()
        return status.available, status.reason if status.available else f"Transformer Engine not used: {status.reason}"
    if use_te:
        from megatron.core.extensions.transformer_engine import HAVE_TE

        if not HAVE_TE:
            raise ValueError("build_model(use_te=True): Transformer Engine is not installed (or megatron-core "
                             "cannot load it)")
    return use_te, f"use_te={use_te} requested"


def build_model(
    cfg: ModelConfig,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vp_stage: int | None = None,
    init_seed: int | None = None,
    use_te: bool | None = None,
    **config_overrides,
) -> GPTModel:
    """The GPTModel chunk this rank holds. ``pre_process`` / ``post_process`` default to whether this
    (virtual) pipeline stage is the first / last. Needs ``initialize_parallel`` first.

    Forward: ``model(input_ids [b, s], position_ids [b, s], attention_mask=None (causal), labels=None)``
    -> logits ``[b, s, vocab_size / TP]`` on the last stage (hidden states [s, b, h] elsewhere).
    Decoder layers: ``model.decoder.layers[i]`` (``.self_attention.linear_qkv``, ``.q_layernorm``, ...).

    ``init_seed``: re-initialise the weights with ``init_layout_invariant`` so every TP x PP (x VP) layout
    holds the same model as one process (training). None keeps megatron's init, whose values depend on
    the layout (PP stages consume the RNG in another order); fine when weights are loaded afterwards.

    ``use_te``: the Transformer Engine layer spec (True) or megatron's local one (False); None uses TE
    when ``spec.te_status()`` says it can run (TE imports and CUDA is present). The first model a process
    materialises says which implementations it runs, on rank 0 (``implementations.report_once``).
    """
    enable_cpu_compat()
    if cuda_missing():
        patch_rope_without_copies()
    use_te, why = _choose_transformer_engine(use_te)
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
    model = ChameleonGPTModel(
        config=config,
        transformer_layer_spec=chameleon_block_spec(cfg, config, use_te=use_te, vp_stage=vp_stage),
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
    config.qk_layernorm = False  # see transformer_config: per-head norm weights are TP-sharded, never summed
    if config.use_te_activation_func:  # a spec without the activation module would get silu of [gate; up]
        for layer in model.decoder.layers:
            if not isinstance(getattr(layer.mlp, "activation_func", None), SwiGLU):
                raise ValueError("use_te_activation_func is set but the layer spec gives the MLP no SwiGLU module "
                                 "(tessera/model/spec.py)")
    # megatron's torch norms ignore params_dtype (Float16Module would cast them later): make every
    # parameter params_dtype now so a bf16 model is bf16 throughout (buffers such as RoPE's stay fp32).
    for p in model.parameters():
        if p.dtype != config.params_dtype:
            p.data = p.data.to(config.params_dtype)
    if pre_process:
        # megatron drops out embeddings with hidden_dropout; Chameleon's dropout is only on the
        # attention / MLP branches.
        model.embedding.embedding_dropout.p = 0.0
    if init_seed is not None:
        init_layout_invariant(model, init_seed)
    model.tessera_config = cfg  # the ModelConfig travels with the module (KV decoding reads swin_norm etc.)
    if not next(model.parameters()).is_meta:  # meta builds only count or adopt weights
        report_once(model, why)
    return model


# Every randomly initialised parameter: its global-name suffix, the TransformerConfig init method
# megatron uses for it, and its TP partition dim (megatron's column / row parallel split). Anything else
# must be a constant-initialised norm, or init_layout_invariant refuses the model.
_RANDOM_INIT = {
    "embedding.word_embeddings.weight": ("embedding_init_method", 0),
    "output_layer.weight": ("init_method", 0),
    "self_attention.linear_qkv.weight": ("init_method", 0),
    "mlp.linear_fc1.weight": ("init_method", 0),
    "self_attention.linear_proj.weight": ("output_layer_init_method", 1),
    "mlp.linear_fc2.weight": ("output_layer_init_method", 1),
}


def global_param_name(model: GPTModel, name: str) -> str:
    """``name`` with the chunk-local layer index replaced by the global one (PP / VP offsets)."""
    m = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
    if not m:
        return name
    layer = model.decoder.layers[int(m.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}.{m.group(2)}"


def _param_seed(seed: int, name: str) -> int:
    # a stable hash (Python's hash() of str is salted per process)
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") & (2**63 - 1)


@torch.no_grad()
def init_layout_invariant(model: GPTModel, seed: int) -> None:
    """Initialise ``model`` (one chunk of any TP x PP x VP layout) so it equals the same chunk of the
    1-process model initialised with ``seed``.

    Each random weight draws from its own generator seeded by (seed, global parameter name), so the
    values depend neither on which stage builds the layer nor on the build order. A TP-split weight
    draws its FULL tensor (megatron's init method, fp32) and keeps this rank's slice exactly as
    megatron's ``_initialize_affine_weight_cpu`` splits it (SwiGLU fc1 with stride 2: [gate_r; up_r]).
    Memory: one full parameter at a time, never the full model. The values differ between a CPU and a
    CUDA generator, but not between layouts on one device type. Norm weights keep their constants.
    """
    from megatron.core.utils import divide

    config = model.config
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    for name, p in model.named_parameters():
        gname = global_param_name(model, name)
        key = next((k for k in _RANDOM_INIT if gname == k or gname.endswith("." + k)), None)
        if key is None:
            if "layernorm" in gname or "layer_norm" in gname:
                continue  # ones / zeros by construction, the same in every layout
            raise ValueError(f"init_layout_invariant: no init rule for parameter {gname!r} "
                             f"(add it to tessera/model/chameleon.py _RANDOM_INIT)")
        method, dim = _RANDOM_INIT[key]
        split = getattr(p, "tensor_model_parallel", False) and tp > 1
        if split and getattr(p, "partition_dim", dim) != dim:
            raise ValueError(f"init_layout_invariant: {gname} is split on dim {p.partition_dim}, expected {dim}")
        stride = 2 if key == "mlp.linear_fc1.weight" and config.gated_linear_unit else 1
        shape = list(p.shape)
        if split:
            shape[dim] *= tp
        full = torch.empty(shape, dtype=torch.float32, device=p.device)
        gen = torch.Generator(device=p.device).manual_seed(_param_seed(seed, gname))
        getattr(config, method)(full, generator=gen)  # megatron's init_method_normal partials take generator=
        if split:
            pieces = torch.split(full, divide(p.shape[dim], stride), dim=dim)
            full = torch.cat(pieces[rank::tp], dim=dim)
        p.copy_(full.to(p.dtype))
