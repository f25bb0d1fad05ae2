"""LoRA's memory: the plan's arithmetic (``tessera bench plan --lora-rank``) against the adapters a model
really gets, and the measured tensors of one LoRA and one full fine-tuning step (``tessera bench finetune``):
gradient buffers and optimizer state exist for the trainable parameters only, at megatron's bytes per
parameter under bf16 (4 for the fp32 gradient, 12 for the fp32 main copy and Adam's two moments)."""

from __future__ import annotations

import pytest

ALL = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "output_layer")


def test_plan_counts_the_adapters_a_model_gets(megatron_1proc):
    from tessera.bench.plan import ModelShape, lora_adapter_parameters
    from tessera.model.chameleon import build_model
    from tessera.model.config import get_preset
    from tessera.model.lora import LoRASpec, apply_lora, lora_linears

    cfg = get_preset("tiny")
    model = build_model(cfg)
    apply_lora(model, LoRASpec(8, 16.0, 0.0, ALL), seed=0)
    got = {}
    for name, m in lora_linears(model):
        leaf = name.rsplit(".", 1)[-1]
        got[leaf] = got.get(leaf, 0) + m.lora_a.numel() + m.lora_b.numel()
    assert lora_adapter_parameters(ModelShape.from_config(cfg), 8, ALL) == got
    # TP=2: column targets split B, row targets split A (per GPU)
    tp2 = lora_adapter_parameters(ModelShape.from_config(cfg), 8, ("linear_qkv", "linear_fc2"), tp=2)
    h, f, qkv_out = cfg.hidden_size, cfg.ffn_hidden_size, 64 + 2 * 32
    assert tp2 == {"linear_qkv": 2 * (8 * h + qkv_out * 8 / 2), "linear_fc2": 2 * (8 * f / 2 + h * 8)}


def test_7b_lora_fits_one_48gb_card_where_full_finetuning_does_not_fit_80gb():
    from tessera.bench.plan import Layout, format_lora, lora_memory_per_gpu, shape_for_preset

    m = shape_for_preset("chameleon-7b")
    mem = lora_memory_per_gpu(m, Layout.for_gpus(1, seq_length=4096), 16)
    assert mem["adapter_parameters_total"] == 32 * 16 * (4096 + 3 * 4096 + 4096 + 4096 + 4096 + 2 * 11008
                                                          + 11008 + 4096)
    # fused attention keeps a 4096-token micro-batch's activations small enough without recomputation
    assert mem["total"]["adam_none"] < 48e9 < 80e9 < mem["full_finetune_total"]["adam_full"]
    assert mem["total"]["adam_full"] < mem["total"]["adam_selective"] < mem["total"]["adam_none"]
    text = format_lora(mem)
    assert "LoRA total (recompute=none)" in text and "48 GB yes" in text


@pytest.mark.parametrize("case", ["full", "lora"])
def test_measured_state_bytes_follow_the_trainable_parameters(megatron_1proc, case):
    from tessera.bench.finetune import measure

    r = measure(case, "tiny", seq=32, micro_batch=2, rank=4, targets=ALL, precision="bf16", steps=1)
    n = r["trainable_parameters"]
    assert r["weight_bytes"] == 2 * r["parameters"]  # bf16 weights, frozen or not
    assert r["grad_buffer_bytes"] == 4 * n  # fp32 main_grad buffers only for what trains
    # fp32 main params + Adam's exp_avg and exp_avg_sq, plus torch's 4-byte step counter per tensor
    assert 12 * n <= r["optimizer_state_bytes"] <= 12 * n + 4 * 64
    if case == "lora":
        assert n == 2 * 4 * (64 + 128) + 2 * 4 * (64 + 64) + 2 * 4 * (64 + 320) + 2 * 4 * (160 + 64) + 4 * (64 + 256)
    else:
        assert n == r["parameters"]
    assert r["peak_step_bytes"] > 0


def test_bench_finetune_command_prints_the_table_and_writes_json(monkeypatch, tmp_path, capsys):
    import json

    import tessera.bench.finetune as bf
    from tessera.cli import main

    row = {"parameters": 100, "trainable_parameters": 100, "weight_bytes": 200, "grad_buffer_bytes": 400,
           "optimizer_state_bytes": 1200, "peak_step_bytes": 4096, "lora_rank": 0, "case": "full",
           "peak_basis": "test"}
    lora = {**row, "case": "lora", "lora_rank": 4, "trainable_parameters": 10, "grad_buffer_bytes": 40,
            "optimizer_state_bytes": 120, "peak_step_bytes": 2048}
    seen = {}

    def fake_run(preset, **kw):
        seen.update(preset=preset, **kw)
        return {"rows": [row, lora], "ratios": {"trainable_parameters": 0.1}}

    monkeypatch.setattr(bf, "run", fake_run)
    out = tmp_path / "ft.json"
    assert main(["bench", "finetune", "--preset", "tiny", "--lora-rank", "4", "--json", str(out)]) == 0
    assert seen["preset"] == "tiny" and seen["rank"] == 4
    printed = capsys.readouterr().out
    assert "trainable parameters" in printed and "optimizer state" in printed
    payload = json.loads(out.read_text())
    assert [r["case"] for r in payload["results"]["rows"]] == ["full", "lora"]
