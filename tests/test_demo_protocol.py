"""The evaluation protocol (tessera.demo.protocol): likelihood scoring against hand-computed values,
ranking with an oracle and a know-nothing model, the caption prompt, and the several-seed table."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tessera.demo import protocol as P
from tessera.tokenizers.vocab import Vocabulary


class FakeTextTok:
    """Words <-> piece ids: one piece per word (like the demo's BPE on its closed vocabulary)."""

    WORDS = ("a", "large", "small", "red", "blue", "circle", "square", "on", "the", "left", "right")

    def encode(self, text: str) -> list[int]:
        return [self.WORDS.index(w) for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.WORDS[i] for i in ids)


VOCAB = Vocabulary(num_text_tokens=len(FakeTextTok.WORDS), num_image_codes=16, image_tokens_per_image=4,
                   pad_to_multiple_of=8)
TOK = FakeTextTok()


def bigram_logits(table: torch.Tensor):
    """logits[b, s] = table[ids[b, s]]: a model whose next-token distribution depends on the last token."""
    def fn(ids: torch.Tensor) -> torch.Tensor:
        return table[ids]
    return fn


def test_continuation_logprobs_match_a_hand_computed_bigram_and_ignore_padding():
    g = torch.Generator().manual_seed(0)
    V = VOCAB.padded_size
    table = torch.randn(V, V, generator=g)
    logp = torch.log_softmax(table[:, : VOCAB.size], dim=-1)  # normalised over the real ids only
    prefixes = [[1, 7, 8], [1, 9], [1, 7, 8, 9, 10]]
    conts = [[9, 10, 2], [11], [12, 13]]
    want = [sum(logp[seq[k - 1], seq[k]].item() for k in range(len(p), len(p) + len(c)))
            for p, c in zip(prefixes, conts, strict=True) for seq in [p + c]]
    for bs in (1, 2, 8):  # right padding of shorter rows never changes a row's scores (causal)
        got = P.continuation_logprobs(bigram_logits(table), prefixes, conts, VOCAB.pad_id, VOCAB.size, bs)
        assert got.tolist() == pytest.approx(want, abs=1e-5)


CAPTIONS = ["a large red circle on the left", "a small blue square on the right", "a large blue circle on the left",
            "a small red square on the left", "a large red square on the right", "a small blue circle on the right"]
CODES = [[i, i + 1, i + 2, i + 3] for i in range(len(CAPTIONS))]  # a distinct image per caption


def oracle_logits(ids: torch.Tensor) -> torch.Tensor:
    """Knows which caption goes with which image: +8 on the true document's next token, in both
    directions (caption after its image, image after its caption)."""
    docs = []
    for cap, codes in zip(CAPTIONS, CODES, strict=True):
        img = P.image_ids(VOCAB, codes)
        docs.append([VOCAB.bos_id, *img, *P.text_ids(VOCAB, TOK, cap), VOCAB.eos_id])
        docs.append([VOCAB.bos_id, *P.text_ids(VOCAB, TOK, cap), *img, VOCAB.eos_id])
    out = torch.zeros(*ids.shape, VOCAB.padded_size)
    for b in range(ids.shape[0]):
        row = ids[b].tolist()
        for j in range(len(row)):
            for d in docs:
                if row[: j + 1] == d[: j + 1] and j + 1 < len(d):
                    out[b, j, d[j + 1]] += 8.0
    return out


def test_ranking_with_an_oracle_is_perfect_and_with_a_know_nothing_model_at_zero():
    proto = P.EvalProtocol(distractors=3, seed=1)
    caps = P.rank_captions(oracle_logits, VOCAB, TOK, CODES, CAPTIONS, proto)
    imgs = P.rank_images(oracle_logits, VOCAB, TOK, CODES, CAPTIONS, proto)
    for r in (caps, imgs):
        assert r["n"] == len(CAPTIONS) and r["candidates"] == 4 and r["chance"] == 0.25
        assert r["recall_at_1"] == 1.0 and r["mean_rank"] == 1.0
        assert r["pmi"]["recall_at_1"] == 1.0
    # a model with the same score for every candidate ranks none strictly first: ties are misses
    flat = P.rank_captions(lambda ids: torch.zeros(*ids.shape, VOCAB.padded_size), VOCAB, TOK, CODES, CAPTIONS, proto)
    assert flat["recall_at_1"] == 0.0 and flat["mean_rank"] == 4.0


def test_pmi_ranking_discounts_what_is_likely_without_the_condition():
    # image 0 is likely whatever the caption (a "plain white image"); the caption raises only the true image
    prefixes = [[1, 7]]
    cands = [[[20], [21]]]  # candidate 0: the typical image, candidate 1: the true one

    def fn(ids):
        out = torch.zeros(*ids.shape, VOCAB.padded_size)
        out[..., 20] = 5.0  # the typical candidate is likely everywhere
        out[..., 21] = 3.0
        return out

    r = P.rank_continuations(fn, prefixes, cands, [1], VOCAB.pad_id, VOCAB.size, baselines=[[0.0, -4.0]])
    assert r["recall_at_1"] == 0.0  # raw likelihood prefers the typical candidate
    assert r["pmi"]["recall_at_1"] == 1.0  # log p(c | prefix) - log p(c): the condition's effect wins


def test_rank_captions_never_uses_the_same_sentence_as_a_distractor():
    caps = [CAPTIONS[0], CAPTIONS[0], CAPTIONS[1]]  # two images share a caption
    proto = P.EvalProtocol(distractors=5)
    r = P.rank_captions(oracle_logits, VOCAB, TOK, CODES[:3], caps, proto)
    assert r["candidates"] == 2  # the only other sentence; the same caption never counts against itself


def test_caption_prompt_ends_with_the_prefix_and_caption_text_reads_prompt_plus_generation():
    prompt = P.corpus_caption_prompt(VOCAB, TOK, "a")(CODES[0])
    assert prompt[0] == VOCAB.bos_id and prompt[1] == VOCAB.boi_id and prompt[-2] == VOCAB.eoi_id
    assert prompt[-1:] == P.text_ids(VOCAB, TOK, "a")
    gen = P.text_ids(VOCAB, TOK, "large red circle") + [VOCAB.eos_id] + P.text_ids(VOCAB, TOK, "left")
    assert P.caption_from_ids(VOCAB, TOK, prompt + gen) == "a large red circle"
    assert P.caption_from_ids(VOCAB, TOK, prompt[:-1] + [VOCAB.eos_id]) == ""
    with pytest.raises(ValueError, match="does not start with"):
        P.rank_captions(oracle_logits, VOCAB, TOK, CODES[:2], ["large red circle on the left", CAPTIONS[1]],
                        P.EvalProtocol(distractors=1))


def test_mean_scores_carry_binomial_standard_errors():
    rows = [{"colour_shape": 1.0}] * 3 + [{"colour_shape": 0.0}]
    s = P.mean_scores(rows, keys=("colour_shape",))
    assert s["colour_shape"] == 0.75 and s["colour_shape_stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    st = P.seed_summary([0.5, 0.6, float("nan"), 0.7])
    assert st["n"] == 3 and st["mean"] == pytest.approx(0.6) and st["std"] == pytest.approx(0.1)


def test_seeds_table_from_each_seed_directory(tmp_path, monkeypatch):
    from tessera.config import ConfigError
    from tessera.demo import pipeline, seeds
    from tessera.demo.config import demo_preset

    def fake_demo(cfg, out, stop_after=None):
        out.mkdir(parents=True)
        v = 0.1 * (cfg.seed + 1)
        (out / "scores.json").write_text(json.dumps({
            "text_to_image": {"colour_shape": v}, "image_to_text": {"colour_shape": 2 * v},
            "ranking": {"image_to_text": {"recall_at_1": v, "chance": 0.0625},
                        "text_to_image": {"recall_at_1": v, "pmi": {"recall_at_1": v}}},
            "chance": {"colour_shape": 1 / 36}}))
        (out / "train").mkdir()
        (out / "train" / "stage.json").write_text(json.dumps({"seconds": 100.0, "cpu_seconds": 180.0}))
        (out / "finetune").mkdir()
        (out / "finetune" / "stage.json").write_text(json.dumps({"seconds": 50.0, "cpu_seconds": 90.0}))
        (out / "finetune" / "scores.json").write_text(json.dumps({"scores": {
            m: {"all": {"accuracy": acc + v, "chance": 0.25}} for m, acc in (("pretrained", 0.2), ("full", 0.5))}}))
        return {}

    monkeypatch.setattr(pipeline, "run_demo", fake_demo)
    report = seeds.run_seeds(demo_preset("fast"), [0, 1, 2], tmp_path, command="tessera demo --seeds 0,1,2")
    s = report["summary"]
    assert s["t2i_colour_shape"]["mean"] == pytest.approx(0.2) and s["t2i_colour_shape"]["std"] == pytest.approx(0.1)
    assert s["i2t_colour_shape"]["max"] == pytest.approx(0.6)
    # every stage counts towards the time, the fine-tuning one included, and its accuracies are tabled
    assert s["quiet_estimate_s"]["mean"] == pytest.approx(270.0 / report["machine"]["cores"])
    assert s["wall_s"]["mean"] == pytest.approx(150.0)
    assert s["ft_full_all"]["mean"] == pytest.approx(0.7) and s["ft_pretrained_all"]["min"] == pytest.approx(0.3)
    assert s["ft_lora_all"]["n"] == 0  # no LoRA scores: no row
    md = (tmp_path / "seeds.md").read_text()
    assert "fine-tuning QA all: full fine-tuning" in md and "LoRA" not in md and "/ 25.0% |" in md
    assert "20.0% +- 10.0" in md and report["machine"]["cpu"] in md
    assert json.loads((tmp_path / "seeds.json").read_text())["seeds"]["2"]["t2i_colour_shape"] == pytest.approx(0.3)
    with pytest.raises(ConfigError):
        seeds.parse_seeds("0,0")
    with pytest.raises(ConfigError):
        seeds.parse_seeds("zero")


def test_seed_override_is_one_demo_not_an_abbreviation_of_seeds():
    from tessera.cli import build_parser
    from tessera.demo.cli import build_config

    args, extra = build_parser().parse_known_args(["demo", "--seed", "3", "--out", "x"])
    assert args.seeds is None and extra == ["--seed", "3"]
    assert build_config("fast", extra).seed == 3
    args, extra = build_parser().parse_known_args(["demo", "--seeds", "0,1,2"])
    assert args.seeds == "0,1,2" and extra == []


def test_code_entropy_sums_per_position_entropy_over_jittered_renderings():
    from collections import Counter

    from tessera.demo.evaluate import code_entropy

    class Constant:  # every image the same codes: nothing to predict
        def encode(self, images):
            return torch.zeros(len(images), 64, dtype=torch.long)

    seen: list[list[bytes]] = []

    class PerImage:  # a distinct code per distinct picture at every position: all of the jitter shows
        def encode(self, images):
            keys = [im.tobytes() for im in images]
            seen.append(keys)
            ids = {k: i for i, k in enumerate(dict.fromkeys(keys))}
            return torch.tensor([[ids[k]] * 64 for k in keys])

    assert code_entropy(Constant(), 32, scenes=3, renders=8) == 0.0
    got = code_entropy(PerImage(), 32, scenes=3, renders=8)
    want = sum(-64 * sum(c / 8 * math.log(c / 8) for c in Counter(keys).values()) for keys in seen) / 3
    assert got == pytest.approx(want) and got > 64 * math.log(4)  # the renderings do differ
