"""`tessera demo --fast` end to end: every stage, the report, the scores, and the re-run skip."""

from __future__ import annotations

import importlib.util
import json
import os
import time

import pytest

from tessera.cli import main

# the demo pretrains through `tessera train`; until tessera/pretrain/ ships its CLI the end-to-end run cannot happen
pytestmark = pytest.mark.skipif(importlib.util.find_spec("tessera.pretrain.cli") is None,
                                reason="tessera train (tessera/pretrain/cli.py) does not exist yet")


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    t0 = time.perf_counter()
    assert main(["demo", "--fast", "--out", str(out)]) == 0
    return out, time.perf_counter() - t0


def test_fast_demo_runs_every_stage(demo_out):
    out, seconds = demo_out
    from tessera.demo.pipeline import STAGES

    for stage in STAGES:
        marker = json.loads((out / stage / "stage.json").read_text())
        assert marker["stage"] == stage
    # the run directory holds a real checkpoint and the tokenizers `tessera generate` looks for
    run = out / "train" / "run"
    assert (run / "checkpoints" / "latest").is_file()
    assert (run / "tokenizers" / "text.model").is_file() and (run / "tokenizers" / "image" / "config.json").is_file()
    assert seconds < 600


def test_fast_demo_scores_and_report(demo_out):
    out, _ = demo_out
    scores = json.loads((out / "scores.json").read_text())
    for direction in ("text_to_image", "image_to_text"):
        s = scores[direction]
        assert s["n"] == 4
        for k in ("colour", "shape", "colour_shape", "parsed"):
            assert 0.0 <= s[k] <= 1.0
    assert scores["chance"]["colour_shape"] == pytest.approx(1 / 36)
    # the detector reads (most of) the real held-out renders back through the tokenizer: a working ceiling
    assert scores["vq_reconstruction"]["n"] >= 4
    html = (out / "report.html").read_text()
    for needle in ("<svg", "Loss curves", "VQ reconstructions", "text &rarr; image", "image &rarr; text", "recall@1",
                   "data:image/png;base64,"):
        assert needle in html
    samples = json.loads((out / "evaluate" / "samples.json").read_text())
    assert len(samples["t2i"]) == len(samples["i2t"]) == 4
    # image -> text prompts end with the caption prefix, so every caption starts with it (never empty)
    assert all(r["text"].startswith("a") for r in samples["i2t"]) and scores["empty_captions"] == 0
    # likelihood ranking: 4 held-out pairs a direction, so 3 distractors each, chance 1/4
    for direction in ("image_to_text", "text_to_image"):
        r = scores["ranking"][direction]
        assert r["n"] == 4 and r["candidates"] == 4 and r["chance"] == 0.25 and 0.0 <= r["recall_at_1"] <= 1.0
        assert 1.0 <= r["mean_rank"] <= 4.0 and 0.0 <= r["pmi"]["recall_at_1"] <= 1.0
    assert scores["text_to_image"]["colour_shape_stderr"] >= 0.0
    # the VQ ceiling is measured as soon as the tokenizer exists
    ceiling = json.loads((out / "image_tokenizer" / "stage.json").read_text())["heldout_ceiling"]
    assert ceiling["n"] == 8 and 0.0 <= ceiling["colour_shape"] <= 1.0


def test_fast_demo_finetunes_and_reports_the_table(demo_out):
    from tessera.data.pretokenize import load_stats
    from tessera.model.checkpoint import read_checkpoint_meta, resolve_checkpoint

    out, _ = demo_out
    res = json.loads((out / "finetune" / "scores.json").read_text())
    n = res["data"]["eval_questions"]
    for model in ("pretrained", "full", "lora"):
        sc = res["scores"][model]
        assert sc["all"]["n"] == n > 0 and 0.0 <= sc["all"]["accuracy"] <= 1.0
        assert sc["count"]["chance"] == 0.5 and sc["colour"]["chance"] == sc["shape"]["chance"] == pytest.approx(1 / 6)
    # the training data: one conversation per question, targets only in the assistant turns
    stats = load_stats(out / "finetune" / "data")
    assert stats["loss_on"] == "assistant" and stats["conversations"] == res["data"]["train_conversations"]
    assert 0 < stats["target_tokens"] < stats["tokens"] / 10
    # the demo pads its vocabulary to a multiple of 128 (TP 1), and the QA data speaks the pretrained ids
    from tessera.tokenizers.vocab import Vocabulary

    base = Vocabulary.load(out / "pretokenize" / "train")
    assert base.pad_to_multiple_of == 128 and base.padded_size - base.size < 128
    assert Vocabulary.load(out / "finetune" / "data") == base
    # LoRA trained its adapters only, on the pretrained checkpoint it names
    meta = read_checkpoint_meta(resolve_checkpoint(out / "finetune" / "lora"))
    assert meta["lora"]["rank"] == res["settings"]["lora_rank"]
    assert meta["base"]["path"] == str(resolve_checkpoint(out / "train" / "run").resolve())
    assert 0 < res["trainable_parameters"]["lora"] < res["trainable_parameters"]["full"] / 2  # rank 16 of a 64-wide model
    html = (out / "report.html").read_text()
    assert "Fine-tuning: questions about held-out images" in html and "full fine-tuning" in html
    assert (out / "finetune" / "table.md").read_text().count("\n") == 7  # header, rule, 3 models, chance, n


def test_rerun_skips_finished_stages(demo_out, capsys):
    out, _ = demo_out
    before = {p: p.stat().st_mtime_ns for p in out.rglob("stage.json")}
    os.remove(out / "report" / "stage.json")  # only the report is redone
    t0 = time.perf_counter()
    assert main(["demo", "--fast", "--out", str(out)]) == 0
    assert time.perf_counter() - t0 < 60
    err = capsys.readouterr().err
    from tessera.demo.pipeline import STAGES

    assert err.count("done already") == len(STAGES) - 1
    after = {p: p.stat().st_mtime_ns for p in out.rglob("stage.json")}
    changed = [p.parent.name for p in after if after[p] != before.get(p)]
    assert changed == ["report"]


def test_stop_after_ends_the_run_there(tmp_path):
    from tessera.demo.pipeline import STAGES

    out = tmp_path / "out"
    assert main(["demo", "--fast", "--out", str(out), "--stop-after", "text_tokenizer"]) == 0
    assert [s for s in STAGES if (out / s / "stage.json").is_file()] == ["synth", "text_tokenizer"]
    assert main(["demo", "--fast", "--out", str(out), "--stop-after", "nope"]) == 2


def test_a_different_config_is_refused(demo_out, capsys):
    out, _ = demo_out
    assert main(["demo", "--fast", "--out", str(out), "--train_docs", "301"]) == 2
    assert "different demo config" in capsys.readouterr().err
