"""Interleaved documents in, interleaved documents out: prompt segments -> ids -> engine -> segments,
decoded images and the files ``tessera generate`` writes (document.json, PNGs, document.html)."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from tessera.generate.config import GenerationConfig
from tessera.generate.engine import GenerationEngine, GenerationError, GenerationStats, TokenCallback
from tessera.generate.tokenizers import Tokenizers
from tessera.tokenizers.vocab import ImageSegment, Segment, TextSegment, Vocabulary
from tessera.utils import atomic_dir

# What a prompt may hold: text, a PIL image (goes through the VQ encoder), or ready segments.
PromptPart = str | TextSegment | ImageSegment | Image.Image


@dataclass
class GeneratedDocument:
    """A prompt and its continuation. ``segments`` = prompt segments followed by generated ones;
    ``images[k]`` is the picture of the k-th ``ImageSegment`` in ``segments`` (prompt images as given,
    generated ones decoded by the VQ decoder)."""

    segments: list[Segment]
    images: list[Image.Image]
    num_prompt_segments: int
    prompt_ids: list[int]
    new_ids: list[int]
    finish_reason: str
    stats: dict = field(default_factory=dict)

    @property
    def prompt_segments(self) -> list[Segment]:
        return self.segments[: self.num_prompt_segments]

    @property
    def generated_segments(self) -> list[Segment]:
        return self.segments[self.num_prompt_segments :]

    @property
    def generated_text(self) -> str:
        return "".join(s.text for s in self.generated_segments if isinstance(s, TextSegment))

    @property
    def generated_images(self) -> list[Image.Image]:
        n_prompt = sum(isinstance(s, ImageSegment) for s in self.prompt_segments)
        return self.images[n_prompt:]

    # ---- files -------------------------------------------------------------------------------
    def to_json(self, image_names: Sequence[str], extra: dict | None = None) -> dict[str, Any]:
        """The data pipeline's raw document format (``{"segments": [{"text"}, {"image"}], "source"}``)."""
        segs: list[dict] = []
        k = 0
        for s in self.segments:
            if isinstance(s, TextSegment):
                segs.append({"text": s.text})
            else:
                segs.append({"image": image_names[k]})
                k += 1
        doc = {
            "segments": segs,
            "source": "tessera generate",
            "prompt_segments": self.num_prompt_segments,
            "finish_reason": self.finish_reason,
            "prompt_tokens": len(self.prompt_ids),
            "new_tokens": len(self.new_ids),
            "stats": self.stats,
        }
        doc.update(extra or {})
        return doc

    def to_html(self, image_names: Sequence[str], title: str = "tessera generate") -> str:
        parts = [
            "<!doctype html>",
            '<html><head><meta charset="utf-8">',
            f"<title>{html.escape(title)}</title>",
            "<style>body{font-family:sans-serif;max-width:52em;margin:2em auto;line-height:1.5}"
            ".prompt{background:#eef;border-left:4px solid #99c;padding:.2em .6em}"
            ".gen{padding:.2em .6em}img{image-rendering:pixelated;width:256px;border:1px solid #ccc;margin:.3em 0}"
            ".meta{color:#666;font-size:.85em}pre{white-space:pre-wrap;margin:0;font-family:inherit}</style>",
            "</head><body>",
            f"<h1>{html.escape(title)}</h1>",
        ]
        k = 0
        for n, s in enumerate(self.segments):
            cls = "prompt" if n < self.num_prompt_segments else "gen"
            if isinstance(s, TextSegment):
                parts.append(f'<div class="{cls}"><pre>{html.escape(s.text)}</pre></div>')
            else:
                name = html.escape(image_names[k])
                parts.append(f'<div class="{cls}"><img src="{name}" alt="image {k}"></div>')
                k += 1
        tps = self.stats.get("tokens_per_s")
        meta = f"{len(self.new_ids)} new tokens, finished by {html.escape(self.finish_reason)}"
        if tps:
            meta += f", {tps:.1f} tokens/s"
        parts.append(f'<p class="meta">Shaded: prompt. {meta}.</p></body></html>')
        return "\n".join(parts) + "\n"

    def save(self, out_dir: str | Path, extra: dict | None = None) -> Path:
        """Write ``document.json``, ``0.png``, ``1.png``, ... and ``document.html`` into ``out_dir``.

        Written into a temporary sibling directory and renamed at the end, so an interrupted save never
        leaves a directory that looks complete (an older result at ``out_dir`` is replaced whole)."""
        out_dir = Path(out_dir)
        with atomic_dir(out_dir) as tmp:
            names = [f"{k}.png" for k in range(len(self.images))]
            for name, im in zip(names, self.images, strict=True):
                im.save(tmp / name, format="PNG")
            (tmp / "document.json").write_text(json.dumps(self.to_json(names, extra), indent=2, ensure_ascii=False))
            (tmp / "document.html").write_text(self.to_html(names))
        return out_dir


def _normalise_prompt(
    parts: Sequence[PromptPart], tokenizers: Tokenizers
) -> tuple[list[Segment], list[Image.Image]]:
    """Prompt parts -> segments (PIL images through the VQ encoder, in one batch) + their pictures."""
    if isinstance(parts, (str, Image.Image, TextSegment, ImageSegment)):
        parts = [parts]
    pil_idx = [k for k, p in enumerate(parts) if isinstance(p, Image.Image)]
    codes: dict[int, ImageSegment] = {}
    if pil_idx:
        if tokenizers.image is None:
            raise GenerationError("the prompt holds images but no image tokenizer was given")
        enc = tokenizers.image.encode([parts[k] for k in pil_idx])
        codes = {k: ImageSegment.from_tensor(enc[j]) for j, k in enumerate(pil_idx)}
    segments: list[Segment] = []
    pictures: list[Image.Image] = []
    decode_needed: list[int] = []
    for k, p in enumerate(parts):
        if isinstance(p, str):
            segments.append(TextSegment(p))
        elif isinstance(p, TextSegment):
            segments.append(p)
        elif isinstance(p, Image.Image):
            segments.append(codes[k])
            pictures.append(p.convert("RGB"))
        elif isinstance(p, ImageSegment):
            segments.append(p)
            decode_needed.append(len(pictures))
            pictures.append(None)  # type: ignore[arg-type]
        else:
            raise GenerationError(f"prompt part {k}: unsupported type {type(p).__name__} (str, PIL image or segment)")
    if decode_needed:
        img_segs = [s for s in segments if isinstance(s, ImageSegment)]
        if tokenizers.image is None:
            raise GenerationError("the prompt holds image codes but no image tokenizer was given to draw them")
        drawn = tokenizers.image.decode([list(img_segs[j].codes) for j in decode_needed])
        for j, im in zip(decode_needed, drawn, strict=True):
            pictures[j] = im
    return segments, pictures


def encode_prompt(segments: Sequence[Segment], tokenizers: Tokenizers, vocab: Vocabulary) -> list[int]:
    """``<bos>`` + the prompt's tokens (no ``<eos>``: the model continues the document)."""
    for s in segments:
        if isinstance(s, ImageSegment) and len(s.codes) != vocab.image_tokens_per_image:
            raise GenerationError(
                f"prompt image has {len(s.codes)} codes; the model's vocabulary expects {vocab.image_tokens_per_image}"
            )
    return vocab.encode_document(segments, tokenizers.text.encode, add_bos=True, add_eos=False)


class Generator:
    """A model + tokenizers ready to generate; build once and call in a loop (the demo's scoring).

    ``model`` is a ``tessera.model.TesseraModel`` (``.module``, ``.vocab``, ``.config``)."""

    def __init__(self, model: Any, tokenizers: Tokenizers, config: GenerationConfig | None = None) -> None:
        cfg = config or GenerationConfig()
        vocab = getattr(model, "vocab", None) or tokenizers.vocab
        if vocab is None:
            raise GenerationError("checkpoint has no vocabulary (vocab.json): cannot map tokens to text/images")
        tokenizers.check(vocab)
        mcfg = getattr(model, "config", None)
        context = getattr(mcfg, "seq_length", None) or getattr(model.module, "max_sequence_length", None)
        self.model, self.tokenizers, self.vocab = model, tokenizers, vocab
        self.engine = GenerationEngine(
            model.module, vocab, context_length=int(context), dtype=cfg.dtype, device=cfg.device,
            swin_norm=getattr(mcfg, "swin_norm", None),
        )
        self.dtype = cfg.dtype

    def generate(
        self,
        prompts: Sequence[Sequence[PromptPart]],
        config: GenerationConfig,
        on_token: TokenCallback | None = None,
        progress: Any = None,
    ) -> list[GeneratedDocument]:
        vocab = self.vocab
        seg_lists, pics, ids = [], [], []
        for p in prompts:
            segs, pictures = _normalise_prompt(p, self.tokenizers)
            seg_lists.append(segs)
            pics.append(pictures)
            ids.append(encode_prompt(segs, self.tokenizers, vocab))
        docs: list[GeneratedDocument] = []
        for start in range(0, len(ids), config.batch_size):
            batch = ids[start : start + config.batch_size]
            cb = None
            if on_token is not None:
                cb = (lambda off: (lambda g, t: on_token(off + g, t)))(start)
            results, stats = self.engine.generate(batch, config, on_token=cb, progress=progress)
            docs.extend(self._documents(results, stats, seg_lists[start:], pics[start:]))
        return docs

    def chat(
        self,
        conversations: Sequence[Sequence[Any]],
        config: GenerationConfig,
        on_token: TokenCallback | None = None,
        progress: Any = None,
    ) -> list[GeneratedDocument]:
        """The assistant's next turn for each conversation (transformers-style messages: dicts with ``role``
        and ``content``, images as PIL images or ``ImageSegment`` codes), through the chat template that
        training data is written with (``tessera.data.chat.format_chat``, ending with the open assistant
        turn). Decoding stops at the template's END (``finish_reason`` "stop"); the document's generated
        segments are the reply without it. Its prompt segments are the messages' contents in order."""
        from tessera.data.chat import ChatTemplate, format_chat, normalise_messages

        vocab, tok = self.vocab, self.tokenizers
        template = ChatTemplate.for_vocabulary(vocab, tok.text)
        seg_lists, pics, ids = [], [], []
        for messages in conversations:
            parts = [c for m in normalise_messages(messages) for c in m.content]
            segs, pictures = _normalise_prompt(parts, tok) if parts else ([], [])
            images = iter(s for s in segs if isinstance(s, ImageSegment))
            # the images as codes (encoded once, above), in the messages' order
            msgs = [{"role": m.role, "content": [c if isinstance(c, str) else next(images) for c in m.content]}
                    for m in normalise_messages(messages)]
            seg_lists.append(segs)
            pics.append(pictures)
            ids.append(format_chat(msgs, vocab, tok.text, template=template, add_generation_prompt=True))
        stop = template.stop_ids
        docs: list[GeneratedDocument] = []
        for start in range(0, len(ids), config.batch_size):
            cb = None
            if on_token is not None:
                cb = (lambda off: (lambda g, t: on_token(off + g, t)))(start)
            results, stats = self.engine.generate(ids[start : start + config.batch_size], config, on_token=cb,
                                                  progress=progress, stop=stop)
            docs.extend(self._documents(results, stats, seg_lists[start:], pics[start:], stop=stop))
        return docs

    def _documents(self, results, stats: GenerationStats, seg_lists, pics,
                   stop: Sequence[int] | None = None) -> list[GeneratedDocument]:
        vocab, tok = self.vocab, self.tokenizers
        gen_segs = []
        for r in results:
            ids = r.new_ids[:-1] if r.new_ids and r.new_ids[-1] == vocab.eos_id else r.new_ids
            if r.finish_reason == "stop" and stop:
                ids = r.new_ids[: len(r.new_ids) - len(stop)]
            # ``open_prefix``: an image the prompt opened (image mode's forced <boi>) continues in new_ids.
            gen_segs.append(vocab.decode_document(r.open_prefix + ids, tok.text.decode, strict=False))
        codes = [list(s.codes) for segs in gen_segs for s in segs if isinstance(s, ImageSegment)]
        drawn: list[Image.Image] = []
        if codes:
            if tok.image is None:
                raise GenerationError("the model generated images but no image tokenizer was given to decode them")
            drawn = tok.image.decode(codes)
        docs, k = [], 0
        shared = stats.as_dict()
        for r, segs, prompt_segs, prompt_pics in zip(results, gen_segs, seg_lists, pics, strict=False):
            n_img = sum(isinstance(s, ImageSegment) for s in segs)
            docs.append(
                GeneratedDocument(
                    segments=list(prompt_segs) + list(segs),
                    images=list(prompt_pics) + drawn[k : k + n_img],
                    num_prompt_segments=len(prompt_segs),
                    prompt_ids=r.prompt_ids,
                    new_ids=r.new_ids,
                    finish_reason=r.finish_reason,
                    stats=dict(shared),
                )
            )
            k += n_img
        return docs


def generate_document(
    model: Any,
    tokenizers: Tokenizers,
    prompt_segments: Sequence[PromptPart],
    config: GenerationConfig | None = None,
    on_token: TokenCallback | None = None,
) -> GeneratedDocument:
    """Continue one interleaved prompt. ``model``: a ``TesseraModel`` or a ``Generator`` (reuse one
    ``Generator`` in loops: it keeps the decoding weights). ``on_token(0, token_id)`` streams tokens."""
    config = config or GenerationConfig()
    gen = model if isinstance(model, Generator) else Generator(model, tokenizers, config)
    return gen.generate([prompt_segments], config, on_token=on_token)[0]


def generate_chat(
    model: Any,
    tokenizers: Tokenizers,
    conversations: Sequence[Sequence[Any]],
    config: GenerationConfig | None = None,
    on_token: TokenCallback | None = None,
) -> list[GeneratedDocument]:
    """The assistant's reply to each conversation (``Generator.chat``); ``doc.generated_text`` is the reply."""
    config = config or GenerationConfig()
    gen = model if isinstance(model, Generator) else Generator(model, tokenizers, config)
    return gen.chat(conversations, config, on_token=on_token)


def generate_documents(
    model: Any,
    tokenizers: Tokenizers,
    prompts: Sequence[Sequence[PromptPart]],
    config: GenerationConfig | None = None,
    on_token: TokenCallback | None = None,
) -> list[GeneratedDocument]:
    """Batched ``generate_document``: ``config.batch_size`` prompts decode together."""
    config = config or GenerationConfig()
    gen = model if isinstance(model, Generator) else Generator(model, tokenizers, config)
    return gen.generate(prompts, config, on_token=on_token)


__all__ = [
    "GeneratedDocument",
    "Generator",
    "encode_prompt",
    "generate_chat",
    "generate_document",
    "generate_documents",
]
