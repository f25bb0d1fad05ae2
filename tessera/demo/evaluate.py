"""The demo's evaluation: generate from held-out prompts and score the results with the corpus detector.

* text -> image: the prompt is a held-out caption; the model must draw it (image mode: ``<boi>`` forced
  after the caption). The detector reads colour / shape / size / layout back from the VQ-decoded image.
* image -> text: the prompt is a held-out image (through the VQ encoder); the model writes a caption
  (text mode, greedy by default), which ``parse_caption`` reads and the detector checks against the image.
* reference points: the VQ reconstruction of the same held-out images read by the detector (the best
  text -> image can score through this tokenizer) and the chance levels of uniform guessing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from tessera.demo.config import DemoConfig
from tessera.demo.stages import write_json_atomic
from tessera.progress import Progress

SCORE_KEYS = ("parsed", "colour", "shape", "colour_shape", "size", "layout", "exact")


def heldout_pairs(shards: list[str], limit: int) -> dict[str, list[tuple[str, Image.Image]]]:
    """Disjoint (caption, image) pairs from the held-out shards: the first ``limit`` are the
    text->image prompts, the next ``limit`` the image->text prompts."""
    from tessera.data.synth import caption_image_pairs

    pairs = caption_image_pairs(shards, limit=2 * limit)
    return {"t2i": pairs[:limit], "i2t": pairs[limit : 2 * limit]}


def mean_scores(rows: list[dict]) -> dict[str, Any]:
    agg: dict[str, Any] = {"n": len(rows)}
    for k in SCORE_KEYS:
        vals = [r[k] for r in rows if k in r]
        agg[k] = sum(vals) / len(vals) if vals else float("nan")
    # one-sided binomial standard error of the headline accuracy, so "far above chance" is checkable
    p = agg["colour_shape"]
    agg["colour_shape_stderr"] = math.sqrt(p * (1 - p) / len(rows)) if rows and p == p else float("nan")
    return agg


def _png(img: Image.Image, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path.name


def evaluate(cfg: DemoConfig, paths, d: Path) -> dict:
    import tessera.model as tmodel
    from tessera.data.detect import CHANCE, detect_scene, score_image_to_text, score_text_to_image
    from tessera.generate.config import GenerationConfig, SamplingParams
    from tessera.generate.engine import GenerationEngine
    from tessera.tokenizers.image import ImageTokenizer
    from tessera.tokenizers.text import TextTokenizer
    from tessera.tokenizers.vocab import ImageSegment, TextSegment, Vocabulary

    torch.manual_seed(cfg.seed)
    text_tok = TextTokenizer.load(paths.text_model)
    image_tok = ImageTokenizer.load(paths.image_tokenizer)
    model = tmodel.load(paths.run_dir)
    vocab = model.vocab or Vocabulary.load(paths.pretok_train)
    engine = GenerationEngine(model.module, vocab, context_length=model.config.seq_length)
    pairs = heldout_pairs(paths.shards("heldout"), cfg.eval_prompts)
    samples: dict[str, list[dict]] = {"t2i": [], "i2t": [], "recon": []}

    # ---- text -> image
    t2i = pairs["t2i"]
    prompts = [vocab.encode_document([TextSegment(c)], text_tok.encode, add_eos=False) for c, _ in t2i]
    gcfg = GenerationConfig(mode="image", max_new_tokens=vocab.image_span + 1, cfg_scale=cfg.cfg_scale,
                            image=SamplingParams(temperature=cfg.image_temperature, top_k=cfg.image_top_k, top_p=1.0),
                            seed=cfg.seed, batch_size=max(1, len(prompts)))
    stats_all: dict[str, Any] = {}
    with Progress("evaluate text->image", total=len(prompts), unit="prompts") as prog:
        seqs, st = engine.generate(prompts, gcfg) if prompts else ([], None)
        stats_all["t2i"] = st.as_dict() if st is not None else {}
        for i, ((caption, real), seq) in enumerate(zip(t2i, seqs, strict=True)):
            segs = vocab.decode_document(seq.prompt_ids + seq.new_ids, text_tok.decode, strict=False)
            images = [s for s in segs if isinstance(s, ImageSegment)]
            row: dict[str, Any] = {"caption": caption, "finish_reason": seq.finish_reason,
                                   "real": _png(real, d / "t2i" / f"{i:03d}_real.png")}
            if images:
                gen = image_tok.decode(torch.tensor([images[0].codes]))[0]
                row["image"] = _png(gen, d / "t2i" / f"{i:03d}_generated.png")
                row.update({k: v for k, v in score_text_to_image(caption, gen).items() if k in SCORE_KEYS})
            else:
                row.update({k: 0.0 for k in SCORE_KEYS})
                row["parsed"] = 1.0
            samples["t2i"].append(row)
            prog.update(1)

    # ---- image -> text
    i2t = pairs["i2t"]
    codes = image_tok.encode([img for _, img in i2t]) if i2t else torch.empty(0, vocab.image_tokens_per_image)
    prompts = [vocab.encode_document([ImageSegment.from_tensor(c)], text_tok.encode, add_eos=False) for c in codes]
    gcfg = GenerationConfig(mode="text", max_new_tokens=cfg.max_caption_tokens,
                            text=SamplingParams(temperature=cfg.text_temperature, top_k=0, top_p=1.0),
                            seed=cfg.seed, batch_size=max(1, len(prompts)))
    with Progress("evaluate image->text", total=len(prompts), unit="prompts") as prog:
        seqs, st = engine.generate(prompts, gcfg) if prompts else ([], None)
        stats_all["i2t"] = st.as_dict() if st is not None else {}
        for i, ((truth, real), seq) in enumerate(zip(i2t, seqs, strict=True)):
            segs = vocab.decode_document(seq.new_ids, text_tok.decode, strict=False)
            text = " ".join(s.text for s in segs if isinstance(s, TextSegment)).strip()
            row = {"truth": truth, "text": text, "finish_reason": seq.finish_reason,
                   "image": _png(real, d / "i2t" / f"{i:03d}_prompt.png")}
            row.update({k: v for k, v in score_image_to_text(real, text).items() if k in SCORE_KEYS})
            samples["i2t"].append(row)
            prog.update(1)

    # ---- the tokenizer's ceiling: what the detector reads from VQ reconstructions of real images
    reals = [img for _, img in t2i + i2t][: max(cfg.recon_images, cfg.eval_prompts)]
    recon = image_tok.decode(image_tok.encode(reals)) if reals else []
    captions = [c for c, _ in t2i + i2t]
    for i, (real, rec, cap) in enumerate(zip(reals, recon, captions, strict=False)):
        row = {"caption": cap, "real": _png(real, d / "recon" / f"{i:03d}_real.png"),
               "recon": _png(rec, d / "recon" / f"{i:03d}_recon.png"),
               "psnr": _psnr(real, rec), "detected": _scene_text(detect_scene(rec))}
        row.update({k: v for k, v in score_text_to_image(cap, rec).items() if k in SCORE_KEYS})
        samples["recon"].append(row)

    scores = {
        "text_to_image": mean_scores(samples["t2i"]),
        "image_to_text": mean_scores(samples["i2t"]),
        "vq_reconstruction": {**mean_scores(samples["recon"]),
                              "psnr": _mean([r["psnr"] for r in samples["recon"]])},
        "chance": dict(CHANCE),
        "headline": "colour_shape: colour AND shape of every described object right",
        "generation": stats_all,
    }
    write_json_atomic(d / "samples.json", samples)
    write_json_atomic(d / "scores.json", scores)
    write_json_atomic(paths.out / "scores.json", scores)
    return {"text_to_image_colour_shape": scores["text_to_image"]["colour_shape"],
            "image_to_text_colour_shape": scores["image_to_text"]["colour_shape"],
            "chance_colour_shape": CHANCE["colour_shape"], "prompts": {k: len(v) for k, v in pairs.items()}}


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
