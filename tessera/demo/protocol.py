"""The evaluation protocol of the synthetic corpus: one set of functions for any model that reads and
writes its captions and images (the pretrained demo model, a fine-tuned one).

Two kinds of score, each reported with its binomial standard error (docs/benchmarks.md, "The demo"):

* by generation: text -> image draws an image for a held-out caption (``<boi>`` forced after it,
  classifier-free guidance); image -> text writes a caption for a held-out image. The image -> text
  prompt is the image followed by ``caption_prefix`` (the first word of every caption of the grammar),
  so a caption is the natural continuation: without it the model may legitimately end the document
  after the image, as every text -> image document of the corpus does. The detector
  (``tessera.data.detect``) scores both against the corpus' ground truth.
* by likelihood, independent of sampling: for each held-out image the true caption is ranked among
  ``distractors`` captions of other held-out images by log p(caption | image), and for each caption
  the true image among ``distractors`` other images by log p(image | caption); recall@1 has the
  chance level 1 / (distractors + 1).

A model that is prompted differently (a chat template after fine-tuning) passes its own
``caption_prompt``; ``rank_continuations`` ranks any candidate continuations (e.g. one-word answers).
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

SCORE_KEYS = ("parsed", "colour", "shape", "colour_shape", "size", "layout", "exact")

# ids of an image's codes (vocabulary ids, without <boi>/<eoi>) -> the prompt's ids
CaptionPrompt = Callable[[Sequence[int]], list[int]]
# input ids [b, s] -> logits [b, s, V] (e.g. ``TesseraModel.logits``)
LogitsFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EvalProtocol:
    prompts: int = 128  # held-out prompts per direction
    caption_prefix: str = "a"  # image -> text: the text the prompt ends with ("" = none)
    max_caption_tokens: int = 48
    text_temperature: float = 0.0  # 0 = greedy
    image_temperature: float = 0.5
    image_top_k: int = 0
    cfg_scale: float = 3.0
    distractors: int = 15  # likelihood ranking: candidates = 1 true + this many
    rank_batch_size: int = 64  # sequences per forward pass
    seed: int = 0


def stderr(p: float, n: int) -> float:
    """Binomial standard error of an accuracy ``p`` measured on ``n`` items."""
    return math.sqrt(p * (1 - p) / n) if n > 0 and p == p else float("nan")


def mean_scores(rows: Sequence[dict], keys: Sequence[str] = SCORE_KEYS) -> dict[str, Any]:
    """Per-key means over rows and, for each, its standard error (``KEY_stderr``)."""
    agg: dict[str, Any] = {"n": len(rows)}
    for k in keys:
        vals = [float(r[k]) for r in rows if k in r]
        agg[k] = sum(vals) / len(vals) if vals else float("nan")
        agg[f"{k}_stderr"] = stderr(agg[k], len(vals))
    return agg


# ---- prompts ----------------------------------------------------------------------------------
def image_ids(vocab, codes: Sequence[int] | torch.Tensor) -> list[int]:
    """``<boi>`` + the codes as vocabulary ids + ``<eoi>``."""
    return [vocab.boi_id, *vocab.image_codes_to_ids(torch.as_tensor(codes, dtype=torch.long)).tolist(), vocab.eoi_id]


def text_ids(vocab, text_tok, text: str) -> list[int]:
    return vocab.text_piece_to_id(text_tok.encode(text)) if text else []


def corpus_caption_prompt(vocab, text_tok, prefix: str = "a") -> CaptionPrompt:
    """The pretrained model's caption prompt: ``<bos>`` image, then ``prefix`` (the corpus' image ->
    caption documents are exactly this followed by the rest of the caption and ``<eos>``)."""
    tail = text_ids(vocab, text_tok, prefix)

    def build(codes: Sequence[int]) -> list[int]:
        return [vocab.bos_id, *image_ids(vocab, codes), *tail]

    return build


def caption_from_ids(vocab, text_tok, ids: Sequence[int]) -> str:
    """The text after the last image in ``ids`` (prompt tail + generated), up to ``<eos>`` or ``<boi>``."""
    last = max((k for k, t in enumerate(ids) if t == vocab.eoi_id), default=-1)
    text: list[int] = []
    for t in ids[last + 1 :]:
        if t in (vocab.eos_id, vocab.boi_id):
            break
        if vocab.text_offset <= t < vocab.image_offset:
            text.append(t)
    return text_tok.decode(vocab.id_to_text_piece(text)).strip()


# ---- generation -------------------------------------------------------------------------------
def generate_images(engine, vocab, text_tok, image_tok, captions: Sequence[str], proto: EvalProtocol,
                    ) -> tuple[list[Image.Image | None], dict]:
    """One image per caption (``<bos>`` caption, then the forced image); None where none was made."""
    from tessera.generate.config import GenerationConfig, SamplingParams

    if not captions:
        return [], {}
    prompts = [[vocab.bos_id, *text_ids(vocab, text_tok, c)] for c in captions]
    gcfg = GenerationConfig(mode="image", max_new_tokens=vocab.image_span + 1, cfg_scale=proto.cfg_scale,
                            image=SamplingParams(temperature=proto.image_temperature, top_k=proto.image_top_k,
                                                 top_p=1.0),
                            seed=proto.seed, batch_size=len(prompts))
    seqs, stats = engine.generate(prompts, gcfg)
    out: list[Image.Image | None] = []
    for seq in seqs:
        ids = seq.open_prefix + seq.new_ids
        codes = [t - vocab.image_offset for t in ids if vocab.image_offset <= t < vocab.size]
        out.append(image_tok.decode(torch.tensor([codes]))[0] if len(codes) == vocab.image_tokens_per_image else None)
    return out, stats.as_dict()


def generate_captions(engine, vocab, text_tok, codes: Sequence[Sequence[int]], proto: EvalProtocol,
                      caption_prompt: CaptionPrompt) -> tuple[list[str], list[str], dict]:
    """(captions, finish reasons, stats): greedy text after ``caption_prompt(image)``; the caption is
    the prompt's text after the image plus what the model wrote."""
    from tessera.generate.config import GenerationConfig, SamplingParams

    if not len(codes):
        return [], [], {}
    prompts = [caption_prompt(c) for c in codes]
    gcfg = GenerationConfig(mode="text", max_new_tokens=proto.max_caption_tokens,
                            text=SamplingParams(temperature=proto.text_temperature, top_k=0, top_p=1.0),
                            seed=proto.seed, batch_size=len(prompts))
    seqs, stats = engine.generate(prompts, gcfg)
    texts = [caption_from_ids(vocab, text_tok, s.prompt_ids + s.new_ids) for s in seqs]
    return texts, [s.finish_reason for s in seqs], stats.as_dict()


# ---- likelihood ranking -----------------------------------------------------------------------
@torch.no_grad()
def continuation_logprobs(logits_fn: LogitsFn, prefixes: Sequence[Sequence[int]],
                          continuations: Sequence[Sequence[int]], pad_id: int, vocab_size: int,
                          batch_size: int = 64) -> torch.Tensor:
    """log p(continuation | prefix) summed over the continuation's tokens, one float64 per pair,
    normalised over the first ``vocab_size`` ids (the real vocabulary, not its padding)."""
    seqs = [list(p) + list(c) for p, c in zip(prefixes, continuations, strict=True)]
    out = torch.empty(len(seqs), dtype=torch.float64)
    for b0 in range(0, len(seqs), batch_size):
        chunk = seqs[b0 : b0 + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        for r, s in enumerate(chunk):
            ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
        logp = F.log_softmax(logits_fn(ids)[..., :vocab_size].float(), dim=-1).cpu()
        for r in range(len(chunk)):
            i = b0 + r
            start, end = len(prefixes[i]), len(seqs[i])
            targets = ids[r, start:end]
            out[i] = logp[r, start - 1 : end - 1].gather(-1, targets[:, None]).double().sum()
    return out


def _recall(scores: torch.Tensor, candidates: Sequence[Sequence[Any]], true_index: Sequence[int]) -> dict[str, Any]:
    hits, ranks, k = [], [], 0
    for cands, t in zip(candidates, true_index, strict=True):
        sc = scores[k : k + len(cands)]
        k += len(cands)
        better = int((sc > sc[t]).sum()) + int((sc == sc[t]).sum()) - 1  # others at or above the true one
        hits.append(float(better == 0))
        ranks.append(1 + better)
    n = len(hits)
    r1 = sum(hits) / n if n else float("nan")
    return {"recall_at_1": r1, "recall_at_1_stderr": stderr(r1, n), "mean_rank": sum(ranks) / n if n else float("nan")}


def rank_continuations(logits_fn: LogitsFn, prefixes: Sequence[Sequence[int]],
                       candidates: Sequence[Sequence[Sequence[int]]], true_index: Sequence[int], pad_id: int,
                       vocab_size: int, batch_size: int = 64,
                       baselines: Sequence[Sequence[float]] | None = None) -> dict[str, Any]:
    """For each prefix rank its candidates by log-likelihood. recall@1 counts the true candidate
    strictly above every other (a tie is a miss); ``mean_rank`` is 1 for perfect.

    ``baselines`` (per prefix, per candidate: the candidate's log-likelihood WITHOUT the prefix's
    condition) adds ``pmi``: the same ranking by log p(c | prefix) - log p(c), i.e. by how much the
    condition raises each candidate; a likely-anyway candidate (a plain white image) no longer wins."""
    flat_p = [p for p, cands in zip(prefixes, candidates, strict=True) for _ in cands]
    flat_c = [c for cands in candidates for c in cands]
    scores = continuation_logprobs(logits_fn, flat_p, flat_c, pad_id, vocab_size, batch_size)
    sizes = {len(c) for c in candidates}
    out = {**_recall(scores, candidates, true_index), "candidates": max(sizes) if sizes else 0,
           "chance": 1 / max(sizes) if sizes else float("nan"), "n": len(candidates)}
    if baselines is not None:
        base = torch.tensor([b for bs in baselines for b in bs], dtype=torch.float64)
        out["pmi"] = _recall(scores - base, candidates, true_index)
    return out


def _unconditional(logits_fn: LogitsFn, prefix: Sequence[int], items: Sequence[Sequence[int]], vocab,
                   batch_size: int) -> list[float]:
    """log p(item | prefix) for one shared (condition-free) prefix, once per item."""
    return continuation_logprobs(logits_fn, [prefix] * len(items), items, vocab.pad_id, vocab.size, batch_size).tolist()


def _distractors(n: int, i: int, k: int, same: Callable[[int, int], bool], rng: random.Random) -> list[int]:
    """Up to ``k`` indices other than ``i``, none ``same`` as ``i`` nor as each other."""
    pool = [j for j in range(n) if j != i and not same(i, j)]
    rng.shuffle(pool)
    picked: list[int] = []
    for j in pool:
        if len(picked) == k:
            break
        if not any(same(j, q) for q in picked):
            picked.append(j)
    return picked


def rank_captions(logits_fn: LogitsFn, vocab, text_tok, codes: Sequence[Sequence[int]], captions: Sequence[str],
                  proto: EvalProtocol, caption_prompt: CaptionPrompt | None = None) -> dict[str, Any]:
    """image -> text by likelihood: image ``i``'s true caption ``captions[i]`` among ``proto.distractors``
    captions of other images (never the same sentence). The scored continuation is the caption after
    the prompt's own text, then ``<eos>``."""
    rng = random.Random(proto.seed)
    prompt = caption_prompt or corpus_caption_prompt(vocab, text_tok, proto.caption_prefix)
    prefix_text = proto.caption_prefix if caption_prompt is None else ""
    tails = [_caption_tail(vocab, text_tok, c, prefix_text) for c in captions]
    # the same caption without the image: <bos>, the prompt's text, the caption
    uncond = _unconditional(logits_fn, [vocab.bos_id, *text_ids(vocab, text_tok, prefix_text)], tails, vocab,
                            proto.rank_batch_size)
    prefixes, cands, truth, base = [], [], [], []
    for i in range(len(codes)):
        others = _distractors(len(codes), i, proto.distractors, lambda a, b: captions[a] == captions[b], rng)
        order = [i, *others]
        rng.shuffle(order)
        prefixes.append(prompt(codes[i]))
        cands.append([tails[j] for j in order])
        base.append([uncond[j] for j in order])
        truth.append(order.index(i))
    return rank_continuations(logits_fn, prefixes, cands, truth, vocab.pad_id, vocab.size, proto.rank_batch_size, base)


def _caption_tail(vocab, text_tok, caption: str, prefix: str) -> list[int]:
    """The caption's ids after the prompt's ``prefix`` text, then ``<eos>`` (the caption is tokenised
    whole, as in the corpus, and must start with the prefix's ids)."""
    ids, head = text_ids(vocab, text_tok, caption), text_ids(vocab, text_tok, prefix)
    if ids[: len(head)] != head:
        raise ValueError(f"caption {caption!r} does not start with the prompt's prefix {prefix!r}")
    return [*ids[len(head) :], vocab.eos_id]


def rank_images(logits_fn: LogitsFn, vocab, text_tok, codes: Sequence[Sequence[int]], captions: Sequence[str],
                proto: EvalProtocol) -> dict[str, Any]:
    """text -> image by likelihood: caption ``i``'s true image among ``proto.distractors`` images of
    other captions (never one with the same caption); scored over the codes and ``<eoi>``."""
    rng = random.Random(proto.seed + 1)
    images = [image_ids(vocab, c)[1:] for c in codes]  # codes + <eoi>
    # the same image without the caption: <bos> <boi> (the unconditional stream of guidance)
    uncond = _unconditional(logits_fn, [vocab.bos_id, vocab.boi_id], images, vocab, proto.rank_batch_size)
    prefixes, cands, truth, base = [], [], [], []
    for i in range(len(codes)):
        others = _distractors(len(codes), i, proto.distractors, lambda a, b: captions[a] == captions[b], rng)
        order = [i, *others]
        rng.shuffle(order)
        prefixes.append([vocab.bos_id, *text_ids(vocab, text_tok, captions[i]), vocab.boi_id])
        cands.append([images[j] for j in order])
        base.append([uncond[j] for j in order])
        truth.append(order.index(i))
    return rank_continuations(logits_fn, prefixes, cands, truth, vocab.pad_id, vocab.size, proto.rank_batch_size, base)


# ---- several training seeds -------------------------------------------------------------------
def seed_summary(values: Sequence[float]) -> dict[str, float]:
    """mean, sample standard deviation (the spread between seeds), min, max and count."""
    vals = [float(v) for v in values if v == v]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals)}
