"""The full demo's sizing pieces: CPU-time accounting per stage, the VQ's foreground-weighted loss,
the demo presets agreeing with each other (image size, codes per image, model layout)."""

from __future__ import annotations

import time

import torch

from tessera.demo.config import demo_preset
from tessera.demo.stages import Stage, StageRunner


def test_stage_marker_records_cpu_seconds_and_load(tmp_path):
    def busy(d):
        t = time.process_time()
        x = 0
        while time.process_time() - t < 0.2:  # burn ~0.2 s of CPU in this process
            x += 1
        return {}

    info = StageRunner(tmp_path).run(Stage("busy", busy))
    assert info["cpu_seconds"] >= 0.15
    assert info["seconds"] >= 0.15
    assert "load_avg_start" in info and "load_avg_end" in info


def test_foreground_weight_marks_objects_not_background():
    from tessera.tokenizers.image_train import foreground_weight

    for bg in (1.0, -1.0, 0.0):  # white, black, gray backgrounds in [-1, 1]
        x = torch.full((2, 3, 16, 16), bg)
        x[0, 0, 4:8, 4:8] = -bg if bg else 1.0  # a flat object far from the background colour
        w = foreground_weight(x, 8.0)
        assert w.shape == (2, 1, 16, 16)
        assert torch.allclose(w[0, 0, 4:8, 4:8], torch.tensor(9.0))  # 1 + fg_weight on the object
        assert torch.allclose(w[0, 0, 0], torch.tensor(1.0)) and torch.allclose(w[1], torch.tensor(1.0))


def test_fg_weight_zero_is_the_plain_loss(tmp_path):
    from tessera.tokenizers.image_train import load_train_config

    assert load_train_config(preset="tiny").train.fg_weight == 0.0  # other presets keep the unweighted loss
    assert load_train_config(preset="demo").train.fg_weight > 0


def test_full_preset_image_size_matches_the_demo_vq():
    from tessera.tokenizers.image import VQConfig
    from tessera.tokenizers.image_train import load_train_config

    full = demo_preset("full")
    vq = VQConfig.preset(full.vq_preset)
    assert vq.image_size == full.image_size and vq.tokens_per_image == 64
    # the demo's own overrides resolve (what stage_image_tokenizer does)
    tcfg = load_train_config(preset=full.vq_preset, overrides={"vq.image_size": str(full.image_size),
                                                               **full.vq_overrides})
    assert tcfg.vq.tokens_per_image == 64 and not tcfg.train.bf16


def test_full_preset_train_overrides_validate():
    from tessera.demo.pipeline import resolve_path
    from tessera.pretrain.config import load_train_config, validate_layout

    full = demo_preset("full")
    argv = [x for k, v in full.train_overrides.items() for x in (f"--{k}", v)]
    cfg = load_train_config(resolve_path(full.train_config), argv)
    assert validate_layout(cfg, 1) == 1
    assert cfg.data.seq_length <= cfg.model.seq_length and cfg.precision == "bf16"
    assert cfg.train.steps > cfg.optim.warmup
