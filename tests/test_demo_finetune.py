"""The demo's fine-tuning stage (tessera.demo.finetune): the question-answer builder's answers equal what
the corpus detector reads from the written pixels, the evaluation's prompts and candidates are exactly the
training documents' ids, and ranking scores a model that knows the answers perfectly and one that does not
at chance. The stage itself runs in the --fast demo (tests/test_demo.py)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_standins import ByteTokenizer, PatchColourTokenizer

from tessera.data.detect import detect
from tessera.data.raw import iter_documents
from tessera.data.synth import Scene, SceneObject
from tessera.demo.finetune import (
    CANDIDATES,
    EVAL_OFFSET,
    KINDS,
    TRAIN_OFFSET,
    answer_ranking_inputs,
    markdown_table,
    pick_questions,
    qa_pairs,
    scenes,
    score_model,
    write_qa_split,
)
from tessera.tokenizers.vocab import ImageSegment, Vocabulary


def _truth_from_pixels(image) -> dict[str, object]:
    """count, {shape: colour}, {colour: shape} as the detector reads them."""
    _, objs = detect(image)
    return {"count": len(objs), "colour_of": {o.shape: o.colour for o in objs},
            "shape_of": {o.colour: o.shape for o in objs}}


def _check_answer(truth: dict, kind: str, question: str, answer: str) -> None:
    if kind == "count":
        assert answer == ("one", "two")[truth["count"] - 1]
    elif kind == "colour":
        assert truth["colour_of"][question.removeprefix("What colour is the ").removesuffix("?")] == answer
    else:
        assert truth["shape_of"][question.removeprefix("What shape is the ").removesuffix(" one?")] == answer
    assert answer in CANDIDATES[kind]


def test_qa_answers_equal_what_the_detector_reads_from_the_written_images(tmp_path):
    n = 60
    path, rows = write_qa_split(tmp_path, "qa", scenes(0, TRAIN_OFFSET, n), 32, seed=0)
    docs = list(iter_documents([str(path)]))  # read back by the conversations reader pretokenize uses
    assert len(docs) == len(rows) > 2 * n  # one conversation per question, up to three an image
    for doc, row in zip(docs, rows, strict=True):
        user, assistant = doc.messages
        image, question = user.content
        assert isinstance(image, Image.Image) and question == row["question"] and assistant.content == [row["answer"]]
        _check_answer(_truth_from_pixels(image), row["kind"], question, row["answer"])
    per_image: dict[str, list[str]] = {}
    for r in rows:
        per_image.setdefault(r["image"], []).append(r["kind"])
    # one question of each kind an image answers; every image is asked how many shapes it holds
    assert len(per_image) == n and all(len(k) == len(set(k)) and "count" in k for k in per_image.values())
    assert {r["kind"] for r in rows} == set(KINDS)


def test_ambiguous_questions_are_never_asked():
    a, b = SceneObject("circle", "red", "small"), SceneObject("circle", "blue", "large")
    qs = qa_pairs(Scene((a, b), relation="left of"))
    # two circles: "What colour is the circle?" has no one answer; each colour names one shape
    assert [q.kind for q in qs] == ["count", "shape", "shape"] and qs[0].answer == "two"
    assert {q.question: q.answer for q in qs[1:]} == {"What shape is the red one?": "circle",
                                                     "What shape is the blue one?": "circle"}
    c = SceneObject("star", "red", "small")
    qs = qa_pairs(Scene((a, c), relation="above"))
    assert [q.kind for q in qs] == ["count", "colour", "colour"]  # both red: no shape question
    assert [q.kind for q in pick_questions(Scene((a, c), relation="above"), random.Random(0))] == ["count", "colour"]
    assert scenes(0, TRAIN_OFFSET, 5) != scenes(0, EVAL_OFFSET, 5)


def _pretokenized(tmp_path, path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from tessera.data.pretokenize import PretokenizeOptions, pretokenize

    pretokenize([str(path)], tmp_path / "tok", ByteTokenizer(), PatchColourTokenizer(),
                options=PretokenizeOptions(loss_on="assistant"), progress=False)
    ids = IndexedDataset(str(tmp_path / "tok" / "data"))
    mask = IndexedDataset(str(tmp_path / "tok" / "loss_mask"))
    return [np.asarray(ids[i]).tolist() for i in range(len(ids))], [np.asarray(mask[i]).tolist() for i in range(len(mask))]


def test_ranking_prompts_and_candidates_are_the_training_documents(tmp_path):
    vocab, text_tok, image_tok = Vocabulary(256, 512, 16), ByteTokenizer(), PatchColourTokenizer()
    path, rows = write_qa_split(tmp_path, "eval", scenes(0, EVAL_OFFSET, 8), 32, seed=1)
    docs, masks = _pretokenized(tmp_path, path)
    codes = {r["image"]: ImageSegment.from_tensor(image_tok.encode([Image.open(tmp_path / r["image"])])[0])
             for r in rows}
    inputs = answer_ranking_inputs(rows, codes, vocab, text_tok)
    seen = {k: 0 for k in KINDS}
    for row, doc, mask in zip(rows, docs, masks, strict=True):
        prefixes, cands, truth = inputs[row["kind"]]
        i = seen[row["kind"]]
        seen[row["kind"]] += 1
        target = cands[i][truth[i]]
        # the training document is prompt + true candidate + <eos>, and its loss mask selects the candidate
        assert doc == prefixes[i] + target + [vocab.eos_id]
        assert mask == [0] * len(prefixes[i]) + [1] * len(target) + [0]
        assert len(cands[i]) == len(CANDIDATES[row["kind"]]) and len({tuple(c) for c in cands[i]}) == len(cands[i])


def test_scores_an_oracle_perfectly_and_a_uniform_model_at_zero(tmp_path):
    vocab, text_tok, image_tok = Vocabulary(256, 512, 16), ByteTokenizer(), PatchColourTokenizer()
    _, rows = write_qa_split(tmp_path, "eval", scenes(0, EVAL_OFFSET, 10), 32, seed=1)
    codes = {r["image"]: ImageSegment.from_tensor(image_tok.encode([Image.open(tmp_path / r["image"])])[0])
             for r in rows}
    inputs = answer_ranking_inputs(rows, codes, vocab, text_tok)
    answers = {}  # prompt -> the true candidate: an oracle puts all its mass on it
    for k in KINDS:
        for p, c, t in zip(*inputs[k], strict=True):
            answers[tuple(p)] = c[t]

    def oracle(ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(ids.shape[0], ids.shape[1], vocab.padded_size)
        for r, row in enumerate(ids.tolist()):
            for plen in range(1, len(row)):
                if tuple(row[:plen]) in answers:
                    for j, tok in enumerate(answers[tuple(row[:plen])]):
                        out[r, plen - 1 + j, tok] = 50.0
        return out

    perfect = score_model(oracle, vocab, inputs)
    assert perfect["all"]["accuracy"] == 1.0 and perfect["all"]["n"] == len(rows)
    # a model with no preference: log p is -len * log V, so only a strictly shortest true answer wins
    flat = score_model(lambda ids: torch.zeros(*ids.shape, vocab.padded_size), vocab, inputs)
    shortest = [all(len(c[t]) < len(o) for j, o in enumerate(c) if j != t) for k in KINDS for c, t in
                zip(inputs[k][1], inputs[k][2], strict=True)]
    assert flat["all"]["accuracy"] == pytest.approx(sum(shortest) / len(rows))
    assert flat["all"]["accuracy"] < 0.5
    n = {k: len(inputs[k][0]) for k in KINDS}
    assert perfect["all"]["chance"] == pytest.approx(sum(n[k] / len(CANDIDATES[k]) for k in KINDS) / len(rows))
    table = markdown_table({"scores": {"pretrained": flat, "full": perfect, "lora": perfect}})
    assert "| full fine-tuning | 100.0% +- 0.0 |" in table and table.count("100.0% +- 0.0") == 8

