"""The demo's machinery: stage markers and re-runs, the SVG chart, metrics parsing, config overrides."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from tessera.config import ConfigError
from tessera.demo.cli import build_config
from tessera.demo.report import loss_series, read_metrics
from tessera.demo.stages import MARKER, Stage, StageRunner
from tessera.demo.svg import line_chart, nice_ticks


def test_done_stages_are_skipped_and_killed_ones_restart(tmp_path):
    calls = []

    def work(d):
        calls.append(d.name)
        (d / "out.txt").write_text("ok")
        return {"n": 1}

    runner = StageRunner(tmp_path, budget_s={"a": 100})
    info = runner.run(Stage("a", work))
    assert info["n"] == 1 and info["over_budget"] is False and (tmp_path / "a" / MARKER).is_file()
    assert runner.run(Stage("a", work)) == json.loads((tmp_path / "a" / MARKER).read_text())
    assert calls == ["a"]  # the second run was skipped

    # a killed attempt: outputs without a marker are cleared before a non-resumable stage reruns...
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "stale.txt").write_text("half")
    runner.run(Stage("b", work))
    assert not (tmp_path / "b" / "stale.txt").exists()
    # ...and kept for a resumable one (it continues from its own checkpoints)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "ckpt").write_text("step 5")
    runner.run(Stage("c", work, resumable=True))
    assert (tmp_path / "c" / "ckpt").read_text() == "step 5"


def test_a_failing_stage_leaves_no_marker(tmp_path):
    def boom(d):
        (d / "partial").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        StageRunner(tmp_path).run(Stage("s", boom))
    assert not (tmp_path / "s" / MARKER).exists()


def test_line_chart_is_valid_svg_with_scaled_points():
    svg = line_chart({"text CE": [(0, 5.0), (10, 3.0), (20, float("nan"))], "image CE": [(0, 6.0), (20, 4.0)]},
                     title="loss", width=400, height=200)
    root = ET.fromstring(svg)
    lines = [el for el in root.iter() if el.tag.endswith("polyline")]
    assert len(lines) == 2
    pts = [tuple(map(float, p.split(","))) for p in lines[0].get("points").split()]
    assert len(pts) == 2  # the NaN point is dropped
    assert pts[0][0] < pts[1][0] and pts[0][1] < pts[1][1]  # x grows rightwards, a falling loss goes down the page
    assert "no data" in line_chart({"x": []})
    assert nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]


def test_loss_series_reads_per_modality_losses(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 1, "loss": 5.0, "loss_text": 4.0, "loss_image": 6.0, "lr": 0.1},
            {"step": 2, "loss_text": 3.5, "loss_image": 5.5},
            {"step": 2, "eval/text_loss": 3.9, "eval/image_loss": 5.9}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"step\": 3, \"loss_te")
    s = loss_series(read_metrics(run))  # the cut last line (a killed run) is ignored
    assert s["train"] == {"text": [(1.0, 4.0), (2.0, 3.5)], "image": [(1.0, 6.0), (2.0, 5.5)]}
    assert s["eval"] == {"text": [(2.0, 3.9)], "image": [(2.0, 5.9)]}


def test_demo_config_overrides():
    cfg = build_config("fast", ["--train_docs", "123", "--train_overrides.train.steps", "7",
                                "--vq_overrides.train.lr", "0.01"])
    assert cfg.preset == "fast" and cfg.train_docs == 123
    assert cfg.train_overrides["train.steps"] == "7" and cfg.vq_overrides["train.lr"] == "0.01"
    with pytest.raises(ConfigError, match="nonsense"):
        build_config("full", ["--nonsense", "1"])
    with pytest.raises(ConfigError, match="unknown demo preset"):
        build_config("huge", [])
