"""The demo's sizes and per-stage time budget: one typed config, two presets (``fast``, ``full``)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from tessera.config import ConfigError


@dataclass
class DemoConfig:
    preset: str = "full"
    seed: int = 0
    # corpus (tessera data synth)
    image_size: int = 32
    train_docs: int = 6000
    heldout_docs: int = 300
    shard_size: int = 1000
    doc_mix: dict[str, float] = field(default_factory=dict)  # document kind -> weight; empty = synth.DOC_KINDS
    # text tokenizer (tessera tokenizer train-text)
    text_vocab_size: int = 512
    # image tokenizer (tessera tokenizer train-image): a VQ preset plus dotted overrides
    vq_preset: str = "demo"
    vq_overrides: dict[str, str] = field(default_factory=dict)
    # pretokenize
    pretokenize_workers: int = 2  # one per core: the VQ encoder dominates
    # the vocabulary's padded size (tessera data pretokenize --make-vocab-size-divisible-by): the demo trains
    # with TP 1, so 128 (1,032 ids -> 1,152) instead of the default 1,024 (-> 2,048) shrinks the output layer
    # and the softmax by 44%
    make_vocab_size_divisible_by: int = 128
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
    # image -> text prompts end with this text after the image (tessera.demo.protocol): every caption of
    # the grammar starts with it, so a caption is the natural continuation
    caption_prefix: str = "a"
    rank_distractors: int = 15  # likelihood ranking: the true caption / image among this many others
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
        if self.doc_mix:
            from tessera.data.synth import check_mix

            try:
                self.doc_mix = check_mix({k: float(v) for k, v in self.doc_mix.items()})
            except ValueError as exc:
                raise ConfigError(f"demo.doc_mix: {exc}") from None
        if self.rank_distractors < 1:
            raise ConfigError(f"demo.rank_distractors must be >= 1, got {self.rank_distractors}")


FULL = DemoConfig(
    preset="full",
    # 32 px: the detector reads colour, shape, size and layout back perfectly at 32 px, and an image is then
    # 8 x 8 = 64 codes (the `demo` VQ preset), so the LM's sequences and the VQ's convolutions are 4x cheaper
    # than at 64 px. Sizes below are from measured runs (docs/benchmarks.md, "The demo").
    image_size=32,
    # enough documents that 1200 steps see each one ~3.5 times: at 6000 documents and ~4 passes the held-out
    # image loss had already stopped following the training loss
    train_docs=16000,
    # every document teaches one direction: caption then image (text -> image) or image then caption
    # (image -> text); documents that end with their image no longer teach "no caption". Drawing the named
    # colour and shape is learned from the few codes where an object starts, reading them back from every
    # caption word, so text -> image gets more of the documents (the measured mixes: docs/benchmarks.md)
    doc_mix={"caption_image": 0.65, "image_caption": 0.35},
    # the `demo` VQ preset (patch encoder: codes the language model can predict), foreground-weighted loss
    # (keeps the palette colours), no GAN; the shapes' ceiling is bought with steps
    vq_overrides={"train.steps": "3200", "train.ckpt_every": "400"},
    # the `demo` model preset (4 x 256; 3.81M params at the 1,152-entry vocabulary) in bf16 where the CPU has
    # native bf16 (the cost per step of each precision: docs/benchmarks.md, "The demo"): 16 x 256 tokens per
    # step, 1200 steps ~ 4.9M tokens.
    # lr 7e-4: of 4e-3 / 2e-3 / 1e-3 / 5e-4, text -> image rose at every step down (image -> text peaked at 1e-3);
    # 7e-4 between the best two gave seed 0 more of both than 5e-4 (docs/benchmarks.md, "The demo")
    train_overrides={"train.steps": "1200", "data.seq_length": "256", "parallel.micro_batch_size": "8",
                     "parallel.global_batch_size": "16", "optim.lr": "7e-4", "optim.min_lr": "7e-5",
                     "optim.warmup": "20", "train.save_interval": "200", "train.eval_interval": "200",
                     "precision": "bf16"},
    # images: low temperature + classifier-free guidance give the clean, typical picture the caption names
    # generation is cheap: 128 prompts each way keep the accuracies' standard error near 3-4 points
    eval_prompts=128,
    image_temperature=0.5,
    image_top_k=0,
    # guidance 1.5: on the seed-0 model of this recipe 1 / 1.5 / 2 / 3 / 4 measured 57 / 63 / 61 / 50 / 34% text
    # -> image (stronger guidance overshoots once the conditional model is good)
    cfg_scale=1.5,
    # per stage on a quiet 2-core machine: the estimate in docs/benchmarks.md ("The demo") plus ~30%
    budget_s={"synth": 30, "text_tokenizer": 15, "image_tokenizer": 400, "pretokenize": 60, "train": 950,
              "evaluate": 60, "finetune": 260, "report": 15},
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
              "evaluate": 20, "finetune": 90, "report": 5},
)

PRESETS: dict[str, DemoConfig] = {"full": FULL, "fast": FAST}


def demo_preset(name: str) -> DemoConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown demo preset {name!r}; known: {sorted(PRESETS)}")
    p = PRESETS[name]
    return replace(p, vq_overrides=dict(p.vq_overrides), train_overrides=dict(p.train_overrides), budget_s=dict(p.budget_s),
                   doc_mix=dict(p.doc_mix))
