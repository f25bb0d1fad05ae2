"""The demo's sizes and per-stage time budget: one typed config, two presets (``fast``, ``full``)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from tessera.config import ConfigError


@dataclass
class DemoConfig:
    preset: str = "full"
    seed: int = 0
    # corpus (tessera data synth)
    image_size: int = 64
    train_docs: int = 6000
    heldout_docs: int = 300
    shard_size: int = 1000
    # text tokenizer (tessera tokenizer train-text)
    text_vocab_size: int = 512
    # image tokenizer (tessera tokenizer train-image): a VQ preset plus dotted overrides
    vq_preset: str = "demo"
    vq_overrides: dict[str, str] = field(default_factory=dict)
    # pretokenize
    pretokenize_workers: int = 2  # one per core: the VQ encoder dominates
    # pretraining (tessera train): the config file plus dotted overrides
    train_config: str = "configs/demo.yaml"
    train_overrides: dict[str, str] = field(default_factory=dict)
    # evaluation: prompts from the held-out split
    eval_prompts: int = 32
    text_temperature: float = 0.0  # 0 = greedy
    image_temperature: float = 1.0
    image_top_k: int = 0
    cfg_scale: float = 3.0
    max_caption_tokens: int = 48
    report_documents: int = 8  # generated documents shown in the report per direction
    recon_images: int = 8  # VQ reconstructions shown
    # per-stage budget in seconds: a stage over budget is reported (not killed)
    budget_s: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ConfigError(f"demo.image_size must be >= 16, got {self.image_size}")
        if self.train_docs <= 0 or self.heldout_docs <= 0:
            raise ConfigError("demo.train_docs and demo.heldout_docs must be positive")
        if self.eval_prompts <= 0:
            raise ConfigError("demo.eval_prompts must be positive")


FULL = DemoConfig(
    preset="full",
    # the tokenizer preset's 600 bf16 steps took ~8 minutes here; fp32 convolutions are ~3x faster than bf16
    # autocast on this CPU, and 300 steps without the GAN loss fit the budget
    vq_overrides={"train.steps": "300", "train.disc_start": "100000", "train.ckpt_every": "100", "train.bf16": "false"},
    # sized to the train budget from the model engineer's ~1.7k tokens/s fp32 for the demo preset (not yet run end to end)
    train_overrides={"train.steps": "150", "data.seq_length": "512", "train.save_interval": "50"},
    budget_s={"synth": 60, "text_tokenizer": 30, "image_tokenizer": 240, "pretokenize": 90, "train": 600,
              "evaluate": 120, "report": 30},
)

FAST = DemoConfig(
    preset="fast",
    image_size=32,
    train_docs=300,
    heldout_docs=24,
    shard_size=150,
    text_vocab_size=320,
    pretokenize_workers=1,
    vq_preset="tiny",
    # a few VQ steps: the smoke run checks the plumbing, not the picture quality
    vq_overrides={"train.steps": "24", "train.batch_size": "8", "train.disc_start": "1000", "train.ckpt_every": "24",
                  "train.log_every": "8", "train.image_every": "24", "vq.kmeans_iters": "2",
                  "train.bf16": "false"},
    train_config="configs/demo.yaml",
    # the tiny model for a few steps: the smoke run checks the plumbing (data -> train -> checkpoint -> generate)
    train_overrides={"model.preset": "tiny", "model.seq_length": "128", "train.steps": "6", "train.save_interval": "6", "optim.warmup": "2",
                     "data.seq_length": "128", "parallel.micro_batch_size": "2", "parallel.global_batch_size": "4"},
    eval_prompts=4,
    max_caption_tokens=24,
    report_documents=4,
    recon_images=4,
    budget_s={"synth": 10, "text_tokenizer": 10, "image_tokenizer": 20, "pretokenize": 15, "train": 30,
              "evaluate": 20, "report": 5},
)

PRESETS: dict[str, DemoConfig] = {"full": FULL, "fast": FAST}


def demo_preset(name: str) -> DemoConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown demo preset {name!r}; known: {sorted(PRESETS)}")
    p = PRESETS[name]
    return replace(p, vq_overrides=dict(p.vq_overrides), train_overrides=dict(p.train_overrides), budget_s=dict(p.budget_s))
