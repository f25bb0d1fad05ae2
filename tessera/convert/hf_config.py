"""transformers ``ChameleonConfig`` (config.json) <-> Tessera ``ModelConfig`` fields.

Unknown keys are rejected by name: a key we do not understand may change the model's maths
(e.g. a rope scaling or biases), and converting silently would give a model that is quietly wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tessera.convert.errors import ConvertError
from tessera.convert.io import read_json

# Keys that do not change the maths (bookkeeping of transformers / generation).
_BOOKKEEPING = {
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "_name_or_path",
    "initializer_range", "use_cache", "image_token_id", "model_parallel_size", "attention_dropout",
    "output_attentions", "output_hidden_states", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder",
    "id2label", "label2id", "problem_type", "tokenizer_class", "sep_token_id", "decoder_start_token_id",
    "qk_layernorm", "max_length", "tie_encoder_decoder", "pruned_heads", "torchscript", "_attn_implementation",
    "attn_implementation",
}
_MATH = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "bos_token_id",
    "eos_token_id", "pad_token_id", "tie_word_embeddings", "rope_parameters", "rope_theta", "rope_scaling",
    "attention_bias", "mlp_bias", "swin_norm", "vq_config", "vocabulary_map",
}
# transformers 4.x wrote every PretrainedConfig default into nested configs (the hub's chameleon-7b
# vq_config carries "temperature", "bad_words_ids", ...): generation / bookkeeping, not model maths.
GENERIC_PRETRAINED_KEYS = {
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "torch_dtype", "dtype",
    "use_bfloat16", "tf_legacy_loss", "pruned_heads", "chunk_size_feed_forward", "is_encoder_decoder",
    "is_decoder", "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder", "max_length",
    "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "architectures",
    "finetuning_task", "id2label", "label2id", "tokenizer_class", "prefix", "bos_token_id", "pad_token_id",
    "eos_token_id", "sep_token_id", "decoder_start_token_id", "task_specific_params", "problem_type",
    "_name_or_path", "_commit_hash", "_attn_implementation_autoset", "_attn_implementation_internal",
    "transformers_version", "model_type", "attn_implementation", "_attn_implementation", "gradient_checkpointing",
    "output_router_logits", "use_cache",
}
KNOWN_HF_KEYS = _BOOKKEEPING | _MATH | (GENERIC_PRETRAINED_KEYS - {"tie_word_embeddings"})

# vq_config: transformers' names plus the taming-transformers aliases its conversion script keeps.
KNOWN_VQ_KEYS = {
    "embed_dim", "num_embeddings", "double_latent", "latent_channels", "resolution", "in_channels",
    "base_channels", "channel_multiplier", "num_res_blocks", "attn_resolutions", "dropout", "attn_type",
    "initializer_range", "model_type", "out_channels", "transformers_version", "dtype", "torch_dtype",
    "ch", "out_ch", "n_embed", "ch_mult", "double_z", "z_channels", "beta",
} | GENERIC_PRETRAINED_KEYS


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    cfg = read_json(path)
    if cfg.get("model_type", "chameleon") != "chameleon":
        raise ConvertError(f"{path}: model_type is {cfg.get('model_type')!r}, expected 'chameleon'")
    unknown = sorted(set(cfg) - KNOWN_HF_KEYS)
    if unknown:
        raise ConvertError(f"{path}: unknown config key(s) {unknown}; refusing to guess what they change")
    vq = cfg.get("vq_config") or {}
    unknown_vq = sorted(set(vq) - KNOWN_VQ_KEYS)
    if unknown_vq:
        raise ConvertError(f"{path}: unknown vq_config key(s) {unknown_vq}")
    for key, ok in (
        ("hidden_act", lambda v: v in (None, "silu")),
        ("attention_bias", lambda v: not v),
        ("mlp_bias", lambda v: not v),
        ("tie_word_embeddings", lambda v: not v),
        ("rope_scaling", lambda v: v is None),
    ):
        if key in cfg and not ok(cfg[key]):
            raise ConvertError(f"{path}: {key}={cfg[key]!r} is not supported by Tessera's Chameleon model")
    rp = cfg.get("rope_parameters") or {}
    if rp.get("rope_type", "default") != "default":
        raise ConvertError(f"{path}: rope_parameters.rope_type={rp.get('rope_type')!r} is not supported")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
            raise ConvertError(f"{path}: {key} must be a positive integer, got {cfg.get(key)!r}")
    return cfg


def rope_theta(cfg: dict) -> float:
    rp = cfg.get("rope_parameters") or {}
    return float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def num_kv_heads(cfg: dict) -> int:
    kv = cfg.get("num_key_value_heads")
    return int(kv) if kv else int(cfg["num_attention_heads"])


def model_fields_from_hf(cfg: dict, padded_vocab: int, params_dtype: str) -> dict[str, Any]:
    """The ``ModelConfig`` fields for a transformers Chameleon config."""
    heads, groups = int(cfg["num_attention_heads"]), num_kv_heads(cfg)
    return {
        "num_layers": int(cfg["num_hidden_layers"]),
        "hidden_size": int(cfg["hidden_size"]),
        "ffn_hidden_size": int(cfg["intermediate_size"]),
        "num_attention_heads": heads,
        "num_query_groups": None if groups == heads else groups,
        "vocab_size": padded_vocab,
        "seq_length": int(cfg.get("max_position_embeddings", 4096)),
        "rotary_base": rope_theta(cfg),
        "norm_epsilon": float(cfg.get("rms_norm_eps", 1e-5)),
        "qk_norm": True,
        "swin_norm": bool(cfg.get("swin_norm", False)),
        "params_dtype": params_dtype,
    }


def hf_fields_from_model(mc: Any) -> dict[str, Any]:
    """The language-model part of a transformers Chameleon config for a Tessera ``ModelConfig``."""
    return {
        "hidden_size": mc.hidden_size,
        "intermediate_size": mc.ffn_hidden_size,
        "num_hidden_layers": mc.num_layers,
        "num_attention_heads": mc.num_attention_heads,
        "num_key_value_heads": mc.num_query_groups or mc.num_attention_heads,
        "max_position_embeddings": mc.seq_length,
        "rope_parameters": {"rope_theta": float(mc.rotary_base), "rope_type": "default"},
        "rms_norm_eps": float(mc.norm_epsilon),
        "swin_norm": bool(mc.swin_norm),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
    }
