"""The demo's evaluation stage: the protocol of ``tessera.demo.protocol`` on the held-out split.

* text -> image and image -> text by generation, scored by the corpus detector, each with its
  standard error;
* text -> image and image -> text by likelihood ranking (recall@1 among distractors, with chance);
* the tokenizer's ceiling: what the detector reads from VQ reconstructions of the same real images
  (the best text -> image can score through this tokenizer), and the chance levels of guessing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from tessera.demo.config import DemoConfig
from tessera.demo.protocol import (
    SCORE_KEYS,
    EvalProtocol,
    corpus_caption_prompt,
    generate_captions,
    generate_images,
    mean_scores,
    rank_captions,
    rank_images,
)
from tessera.demo.stages import write_json_atomic
from tessera.progress import Progress


def protocol_of(cfg: DemoConfig) -> EvalProtocol:
    return EvalProtocol(prompts=cfg.eval_prompts, caption_prefix=cfg.caption_prefix,
                        max_caption_tokens=cfg.max_caption_tokens, text_temperature=cfg.text_temperature,
                        image_temperature=cfg.image_temperature, image_top_k=cfg.image_top_k, cfg_scale=cfg.cfg_scale,
                        distractors=cfg.rank_distractors, seed=cfg.seed)


def heldout_pairs(shards: list[str], limit: int) -> dict[str, list[tuple[str, Image.Image]]]:
    """Disjoint (caption, image) pairs from the held-out shards: the first ``limit`` are the
    text->image prompts, the next ``limit`` the image->text prompts."""
    from tessera.data.synth import caption_image_pairs

    pairs = caption_image_pairs(shards, limit=2 * limit)
    return {"t2i": pairs[:limit], "i2t": pairs[limit : 2 * limit]}


def reconstruction_rows(image_tok, pairs: list[tuple[str, Image.Image]]) -> list[dict]:
    """The detector's reading of each real image's VQ reconstruction against its caption (the ceiling)."""
    from tessera.data.detect import detect_scene, score_text_to_image

    recon = image_tok.decode(image_tok.encode([img for _, img in pairs])) if pairs else []
    rows = []
    for (cap, real), rec in zip(pairs, recon, strict=True):
        row: dict[str, Any] = {"caption": cap, "psnr": _psnr(real, rec), "detected": _scene_text(detect_scene(rec)),
                               "_real": real, "_recon": rec}
        row.update({k: v for k, v in score_text_to_image(cap, rec).items() if k in SCORE_KEYS})
        rows.append(row)
    return rows


def ceiling_scores(rows: list[dict]) -> dict:
    return {**mean_scores(rows), "psnr": _mean([r["psnr"] for r in rows])}


def code_entropy(image_tok, image_size: int, seed: int = 0, scenes: int = 8, renders: int = 32) -> float:
    """How much a language model must predict about an image beyond its caption, through this tokenizer:
    for each of ``scenes`` random scenes, ``renders`` renderings differing only in the corpus' sub-pixel
    jitter are encoded, and the entropy (nats) of the code at each grid position is summed over the grid
    (an upper bound on the codes' entropy given the scene); the mean over the scenes."""
    import random
    from collections import Counter
    from dataclasses import replace

    from tessera.data.synth import JITTER, random_scene, render_scene

    rng = random.Random(seed)
    total = 0.0
    for _ in range(scenes):
        scene = random_scene(rng)
        images = [render_scene(replace(scene, jitter=tuple(rng.uniform(-JITTER, JITTER) for _ in range(4))), image_size)
                  for _ in range(renders)]
        codes = image_tok.encode(images)
        for column in codes.T.tolist():
            total -= sum(c / renders * math.log(c / renders) for c in Counter(column).values())
    return total / scenes


def _png(img: Image.Image, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path.name


def evaluate(cfg: DemoConfig, paths, d: Path) -> dict:
    import tessera.model as tmodel
    from tessera.data.detect import CHANCE, score_image_to_text, score_text_to_image
    from tessera.generate.engine import GenerationEngine
    from tessera.tokenizers.image import ImageTokenizer
    from tessera.tokenizers.text import TextTokenizer
    from tessera.tokenizers.vocab import Vocabulary

    torch.manual_seed(cfg.seed)
    proto = protocol_of(cfg)
    text_tok = TextTokenizer.load(paths.text_model)
    image_tok = ImageTokenizer.load(paths.image_tokenizer)
    model = tmodel.load(paths.run_dir)
    vocab = model.vocab or Vocabulary.load(paths.pretok_train)
    engine = GenerationEngine(model.module, vocab, context_length=model.config.seq_length)
    pairs = heldout_pairs(paths.shards("heldout"), proto.prompts)
    t2i, i2t = pairs["t2i"], pairs["i2t"]
    samples: dict[str, list[dict]] = {"t2i": [], "i2t": [], "recon": []}
    stats: dict[str, Any] = {}

    # ---- by generation
    with Progress("evaluate text->image", total=len(t2i), unit="prompts") as prog:
        images, stats["t2i"] = generate_images(engine, vocab, text_tok, image_tok, [c for c, _ in t2i], proto)
        for i, ((caption, real), gen) in enumerate(zip(t2i, images, strict=True)):
            row: dict[str, Any] = {"caption": caption, "real": _png(real, d / "t2i" / f"{i:03d}_real.png")}
            if gen is not None:
                row["image"] = _png(gen, d / "t2i" / f"{i:03d}_generated.png")
                row.update({k: v for k, v in score_text_to_image(caption, gen).items() if k in SCORE_KEYS})
            else:
                row.update({k: 0.0 for k in SCORE_KEYS})
                row["parsed"] = 1.0
            samples["t2i"].append(row)
            prog.update(1)

    i2t_codes = image_tok.encode([img for _, img in i2t]).tolist() if i2t else []
    prompt = corpus_caption_prompt(vocab, text_tok, proto.caption_prefix)
    with Progress("evaluate image->text", total=len(i2t), unit="prompts") as prog:
        texts, reasons, stats["i2t"] = generate_captions(engine, vocab, text_tok, i2t_codes, proto, prompt)
        for i, ((truth, real), text, why) in enumerate(zip(i2t, texts, reasons, strict=True)):
            row = {"truth": truth, "text": text, "finish_reason": why,
                   "image": _png(real, d / "i2t" / f"{i:03d}_prompt.png")}
            row.update({k: v for k, v in score_image_to_text(real, text).items() if k in SCORE_KEYS})
            samples["i2t"].append(row)
            prog.update(1)

    # ---- by likelihood (the same held-out pairs; distractors from the same direction's pool)
    t2i_codes = image_tok.encode([img for _, img in t2i]).tolist() if t2i else []
    ranking = {
        "image_to_text": rank_captions(model.logits, vocab, text_tok, i2t_codes, [c for c, _ in i2t], proto),
        "text_to_image": rank_images(model.logits, vocab, text_tok, t2i_codes, [c for c, _ in t2i], proto),
    }

    # ---- the tokenizer's ceiling on the same real images
    for i, row in enumerate(reconstruction_rows(image_tok, t2i + i2t)):
        row["real"] = _png(row.pop("_real"), d / "recon" / f"{i:03d}_real.png") if i < cfg.recon_images else None
        recon = row.pop("_recon")
        row["recon"] = _png(recon, d / "recon" / f"{i:03d}_recon.png") if i < cfg.recon_images else None
        samples["recon"].append(row)

    scores = {
        "text_to_image": mean_scores(samples["t2i"]),
        "image_to_text": mean_scores(samples["i2t"]),
        "ranking": ranking,
        "vq_reconstruction": ceiling_scores(samples["recon"]),
        "chance": dict(CHANCE),
        "protocol": {"caption_prompt": f"<bos> <boi> codes <eoi> {proto.caption_prefix!r}",
                     "image_prompt": "<bos> caption <boi> (forced)", "distractors": proto.distractors,
                     "text_temperature": proto.text_temperature, "image_temperature": proto.image_temperature,
                     "cfg_scale": proto.cfg_scale},
        "headline": "colour_shape: colour AND shape of every described object right",
        "generation": stats,
        "empty_captions": sum(1 for r in samples["i2t"] if not r["text"]),
    }
    write_json_atomic(d / "samples.json", samples)
    write_json_atomic(d / "scores.json", scores)
    write_json_atomic(paths.out / "scores.json", scores)
    return {"text_to_image_colour_shape": scores["text_to_image"]["colour_shape"],
            "image_to_text_colour_shape": scores["image_to_text"]["colour_shape"],
            "caption_recall_at_1": ranking["image_to_text"]["recall_at_1"],
            "image_recall_at_1": ranking["text_to_image"]["recall_at_1"],
            "image_recall_at_1_pmi": ranking["text_to_image"]["pmi"]["recall_at_1"],
            "vq_ceiling_colour_shape": scores["vq_reconstruction"]["colour_shape"],
            "chance_colour_shape": CHANCE["colour_shape"], "chance_recall_at_1": ranking["image_to_text"]["chance"],
            "prompts": {k: len(v) for k, v in pairs.items()}}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _psnr(a: Image.Image, b: Image.Image) -> float:
    import numpy as np

    x = np.asarray(a.convert("RGB").resize(b.size), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return 10 * math.log10(255.0**2 / max(mse, 1e-12))


def _scene_text(scene) -> str:
    if scene is None:
        return "(nothing detected)"
    from tessera.data.synth import caption

    return caption(scene)
