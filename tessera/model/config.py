"""The model's typed config, the named presets, and the parallel-layout checks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tessera.config import ConfigError

PARAMS_DTYPES = ("float32", "bfloat16")
RECOMPUTE = ("none", "selective", "full")  # megatron's activation recomputation granularities (+ none)
RECOMPUTE_METHODS = ("uniform", "block")


@dataclass
class ModelConfig:
    """A Chameleon-style decoder. ``vocab_size`` is the PADDED embedding size (divisible by 128 * TP)."""

    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 160
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # None = multi-head attention (one K/V head per Q head)
    vocab_size: int = 256
    seq_length: int = 64
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    qk_norm: bool = True  # per-head LayerNorm (weight + bias) on Q and K before RoPE
    swin_norm: bool = False  # Chameleon-34B: h = x + norm(attn(x)); out = h + norm(mlp(h))
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    z_loss_weight: float = 1e-5
    init_method_std: float = 0.02
    params_dtype: str = "float32"
    # megatron's activation recomputation: selective = core attention only; full = whole layers, in groups of
    # recompute_num_layers (uniform, default 1) or the first recompute_num_layers of each stage (block,
    # default all). How the weights are computed with, not what they are: a resume may change it.
    recompute: str = "none"
    recompute_method: str = "uniform"
    recompute_num_layers: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size", "seq_length"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size {self.hidden_size} is not divisible by model.num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.num_query_groups is not None and (
            self.num_query_groups <= 0 or self.num_attention_heads % self.num_query_groups
        ):
            raise ConfigError(
                f"model.num_query_groups {self.num_query_groups} must divide model.num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.params_dtype not in PARAMS_DTYPES:
            raise ConfigError(f"model.params_dtype {self.params_dtype!r} is not one of {list(PARAMS_DTYPES)}")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.recompute not in RECOMPUTE:
            raise ConfigError(f"model.recompute {self.recompute!r} is not one of {list(RECOMPUTE)}")
        if self.recompute_method not in RECOMPUTE_METHODS:
            raise ConfigError(f"model.recompute_method {self.recompute_method!r} is not one of {list(RECOMPUTE_METHODS)}")
        if self.recompute_num_layers is not None and self.recompute != "full":
            raise ConfigError(f"model.recompute_num_layers is for model.recompute: full (got recompute: {self.recompute})")
        if self.recompute_num_layers is not None and self.recompute_num_layers < 1:
            raise ConfigError(f"model.recompute_num_layers must be >= 1, got {self.recompute_num_layers}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    def validate(self, tp: int = 1, pp: int = 1, vp: int | None = None) -> None:
        """Raise ``ConfigError`` if this model cannot be split ``tp`` x ``pp`` (x ``vp`` virtual stages)."""
        if tp < 1 or pp < 1 or (vp is not None and vp < 1):
            raise ConfigError(f"parallel sizes must be >= 1, got tp={tp} pp={pp} vp={vp}")
        if self.num_attention_heads % tp:
            raise ConfigError(
                f"model.num_attention_heads {self.num_attention_heads} is not divisible by tensor parallel size {tp}"
            )
        if self.kv_groups % tp:
            raise ConfigError(
                f"model.num_query_groups {self.kv_groups} is not divisible by tensor parallel size {tp} "
                "(each TP rank needs whole K/V heads)"
            )
        if self.ffn_hidden_size % tp:
            raise ConfigError(f"model.ffn_hidden_size {self.ffn_hidden_size} is not divisible by tensor parallel size {tp}")
        stages = pp * (vp or 1)
        if self.num_layers % stages:
            what = f"pipeline parallel size {pp}" + (f" x virtual stages {vp}" if vp else "")
            raise ConfigError(f"model.num_layers {self.num_layers} is not divisible by {what} = {stages}")
        if vp is not None and vp > 1 and pp == 1:
            raise ConfigError("virtual pipeline stages (vp > 1) need pipeline parallel size > 1")
        per_stage = self.num_layers // stages
        if self.recompute == "full" and self.recompute_num_layers is not None:
            if self.recompute_num_layers > per_stage:
                raise ConfigError(f"model.recompute_num_layers {self.recompute_num_layers} exceeds the {per_stage} "
                                  "layers of a pipeline stage")
            if self.recompute_method == "uniform" and per_stage % self.recompute_num_layers:
                raise ConfigError(f"model.recompute_num_layers {self.recompute_num_layers} does not divide the "
                                  f"{per_stage} layers of a pipeline stage (recompute_method: uniform)")
        if self.vocab_size % (128 * tp):
            raise ConfigError(
                f"model.vocab_size {self.vocab_size} is not divisible by 128 * tensor parallel size = {128 * tp}; "
                "pad the vocabulary (Vocabulary.padded_size)"
            )


PRESETS: dict[str, ModelConfig] = {
    # CPU tests: GQA (4 heads, 2 groups) so TP=2 splits whole K/V heads; 2 layers so PP=2 has one each.
    "tiny": ModelConfig(
        num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, num_query_groups=2,
        vocab_size=256, seq_length=64,
    ),
    # The CPU demo's model (`tessera demo`; its training time: docs/benchmarks.md, "The demo"): 4.27M params
    # at this 2048-entry vocabulary (valid for TP up to 8), which mock-data and benchmark runs use. A run on
    # data takes the data's padded size: the demo pads its 1,032 ids to 1,152 (3.81M params) and trains in bf16.
    "demo": ModelConfig(
        num_layers=4, hidden_size=256, ffn_hidden_size=704, num_attention_heads=4, num_query_groups=None,
        vocab_size=2048, seq_length=512, params_dtype="bfloat16",
    ),
    # Chameleon paper / transformers ChameleonConfig: 7B uses QK-norm, dropout 0.1 and z-loss, no norm reordering.
    "chameleon-7b": ModelConfig(
        num_layers=32, hidden_size=4096, ffn_hidden_size=11008, num_attention_heads=32, num_query_groups=None,
        vocab_size=65536, seq_length=4096, hidden_dropout=0.1, attention_dropout=0.0, params_dtype="bfloat16",
    ),
    # 34B: GQA with 8 KV groups and Swin-style norm reordering instead of dropout.
    "chameleon-34b": ModelConfig(
        num_layers=48, hidden_size=8192, ffn_hidden_size=22016, num_attention_heads=64, num_query_groups=8,
        vocab_size=65536, seq_length=4096, swin_norm=True, params_dtype="bfloat16",
    ),
}


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of a named preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
