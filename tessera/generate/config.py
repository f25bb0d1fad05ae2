"""Typed generation settings (loadable from YAML / ``--section.key value`` like every Tessera config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tessera.config import ConfigError

Mode = Literal["interleaved", "text", "image"]


@dataclass
class SamplingParams:
    """One modality's sampling. ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 disable them."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def check(self, where: str) -> None:
        if self.temperature < 0:
            raise ConfigError(f"{where}.temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"{where}.top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"{where}.top_p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerationConfig:
    """``mode``: ``text`` never opens an image; ``image`` forces ``<boi>`` after the prompt and stops after
    that image; ``interleaved`` lets the model choose (``<boi>`` only where a whole image still fits).

    Classifier-free guidance (image tokens only, as in Chameleon): the conditional stream decodes
    beside an unconditional one (prompt reduced to ``<bos>``) and, when the prompt holds images and
    ``cfg_image_scale`` is set, an image-only one (prompt text dropped, prompt images kept). Image
    logits are ``u + g_img (i - u) + g_txt (c - i)`` (two streams: ``u + g (c - u)``) and every stream
    of a group receives the same sampled token. ``cfg_scale`` 1 with no image-only stream is plain
    conditional decoding, so it runs without the extra rows unless ``cfg_force`` asks for them.
    """

    mode: Mode = "interleaved"
    max_new_tokens: int = 512
    text: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.7, top_k=0, top_p=0.9))
    image: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=1.0, top_k=0, top_p=0.9))
    cfg_scale: float = 3.0  # g_txt: guidance by the prompt's text (Chameleon's text CFG)
    cfg_image_scale: float | None = None  # g_img: guidance by the prompt's images (adds a third stream)
    cfg_force: bool = False  # run the guidance rows even when the scales make them a no-op (tests)
    max_images: int = 0  # 0: no limit; else no <boi> after this many generated images
    seed: int = 0
    # Decoding precision: "auto" = bfloat16 (CPU fast path and GPU), "float32" for exact comparisons.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str | None = None  # default: where the model lives
    batch_size: int = 8  # prompts decoded together by generate_documents
    ignore_eos: bool = False  # never stop at <eos> (benchmarks: every row decodes max_new_tokens)

    def check(self) -> None:
        if self.mode not in ("interleaved", "text", "image"):
            raise ConfigError(f"generation.mode must be interleaved|text|image, got {self.mode!r}")
        if self.max_new_tokens <= 0:
            raise ConfigError(f"generation.max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.cfg_scale < 0 or (self.cfg_image_scale is not None and self.cfg_image_scale < 0):
            raise ConfigError("generation.cfg_scale / cfg_image_scale must be >= 0")
        if self.batch_size <= 0:
            raise ConfigError(f"generation.batch_size must be > 0, got {self.batch_size}")
        self.text.check("generation.text")
        self.image.check("generation.image")
