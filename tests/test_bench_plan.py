"""`tessera bench plan` arithmetic: exact parameter counts, FLOPs and memory against hand computations."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tessera.bench.plan import (
    Layout,
    ModelShape,
    PlanError,
    activation_bytes_per_layer,
    count_parameters,
    flops_per_token,
    memory_per_gpu,
    plan,
    shape_for_preset,
    stage_parameters,
)


@pytest.mark.parametrize("preset", ["tiny", "demo", "chameleon-7b", "chameleon-34b"])
def test_parameter_count_equals_the_models_exact_count(preset):
    from tessera.model import count_parameters as model_count
    from tessera.model import get_preset

    assert count_parameters(shape_for_preset(preset)) == model_count(get_preset(preset))


def test_chameleon_parameter_counts_match_transformers():
    assert count_parameters(shape_for_preset("chameleon-7b")) == 7_013_666_816
    assert count_parameters(shape_for_preset("chameleon-34b")) == 34_294_308_864


def test_flops_per_token_by_hand():
    m = shape_for_preset("chameleon-7b")
    h, f, L, V, s = 4096, 11008, 32, 65536, 4096
    matmul = L * (4 * h * h + 3 * h * f) + V * h  # qkv + proj, SwiGLU fc1 (2f) + fc2, output layer
    assert flops_per_token(m) == 6 * matmul + 12 * L * s * h
    # GQA shrinks K and V: 34B has 8 groups of 128
    m34 = shape_for_preset("chameleon-34b")
    h, f, L, kv = 8192, 22016, 48, 8 * 128
    matmul = L * (h * (h + 2 * kv) + h * h + 3 * h * f) + V * h
    assert flops_per_token(m34) == 6 * matmul + 12 * L * s * h


def _korthikanti_shape(h=1024, a=16, s=2048) -> ModelShape:
    """The paper's setting: GeLU MLP with ffn 4h, multi-head attention, no QK-norm, dropout on."""
    return ModelShape(num_layers=4, hidden_size=h, ffn_hidden_size=4 * h, num_attention_heads=a,
                      num_query_groups=a, head_dim=h // a, vocab_size=1024, seq_length=s, qk_norm=False,
                      gated_mlp=False, hidden_dropout=0.1, attention_dropout=0.1)


@pytest.mark.parametrize("t", [1, 2, 8])
def test_activations_reduce_to_korthikanti_table_2(t):
    m = _korthikanti_shape()
    s, b, h, a = m.seq_length, 2, m.hidden_size, m.num_attention_heads
    sbh = s * b * h
    # no parallelism / tensor parallel without sequence parallel: sbh (10 + 24/t + 5as/(ht))
    assert activation_bytes_per_layer(m, s, b, t, sequence_parallel=False) == pytest.approx(
        sbh * (10 + 24 / t + 5 * a * s / (h * t)))
    # tensor + sequence parallel: sbh/t (34 + 5as/h)
    sp = activation_bytes_per_layer(m, s, b, t, sequence_parallel=True)
    assert sp == pytest.approx(sbh / t * (34 + 5 * a * s / h) if t > 1 else sbh * (34 + 5 * a * s / h))
    # selective recomputation: 34 sbh / t ; full recomputation: 2 sbh / t
    assert activation_bytes_per_layer(m, s, b, t, True, "selective") == pytest.approx(34 * sbh / t)
    assert activation_bytes_per_layer(m, s, b, t, True, "full") == pytest.approx(2 * sbh / t)


def test_swiglu_gqa_qknorm_terms_by_hand():
    m = shape_for_preset("chameleon-34b")  # SwiGLU, 8 KV groups, QK-norm, no dropout
    s, b, t = 4096, 1, 8
    h, f, kv, a = 8192, 22016, 1024, 64
    replicated = 8 * s * b * h  # norms 4sbh + QKV input 2sbh + fc1 input 2sbh (no dropout masks)
    split = (2 * h + 4 * kv + 2 * h + 2 * h + 2 * kv + 6 * f) * s * b  # Q, K+V, proj in, QK-norm in, SwiGLU
    assert activation_bytes_per_layer(m, s, b, t, True, "selective") == pytest.approx((replicated + split) / t)
    assert activation_bytes_per_layer(m, s, b, t, True, "none") == pytest.approx(
        (replicated + split + 2 * a * s * s * b) / t)  # softmax output only: attention dropout is 0


def test_memory_per_gpu_by_hand():
    m = shape_for_preset("chameleon-7b")
    lay = Layout(gpus=64, tp=4, pp=2, micro_batch=1, global_batch=128)
    mem = memory_per_gpu(m, lay)
    h, V, L = 4096, 65536, 32
    per_layer = 4 * h * h + 3 * h * 11008 + 4 * h + 2 * h  # matmuls, QK-norm w+b (split by TP), 2 norms
    split = 4 * h * h + 3 * h * 11008 + 4 * h
    stage0 = (L // 2) * (split // 4 + 2 * h) + V * h // 4
    stage1 = (L // 2) * (split // 4 + 2 * h) + V * h // 4 + h
    assert per_layer == split + 2 * h
    assert mem["params_per_gpu_by_stage"] == [stage0, stage1]
    n = stage1
    assert mem["weights_bf16"] == 2 * n and mem["grads_fp32"] == 4 * n and mem["optimizer_fp32"] == 12 * n
    assert mem["optimizer_fp32_distributed"] == pytest.approx(12 * n / 8)  # DP = 64 / (4 * 2)
    # 1F1B: stage 0 holds pp=2 micro-batches of its 16 layers = 32 layers' worth (+ embedding dropout mask)
    s = 4096
    act0 = 32 * activation_bytes_per_layer(m, s, 1, 4, True, "selective") + 2 * s * h / 4
    act1 = 16 * activation_bytes_per_layer(m, s, 1, 4, True, "selective") + 4 * s * V / 4
    assert mem["activations_by_stage"]["selective"] == pytest.approx([act0, act1])
    assert mem["total"]["distopt_selective"] == pytest.approx(6 * n + 12 * n / 8 + max(act0, act1))


def test_stage_parameters_add_up():
    m = shape_for_preset("chameleon-34b")
    for tp, pp in [(1, 1), (8, 1), (8, 4), (4, 8)]:
        norms = m.num_layers * 2 * m.hidden_size + m.hidden_size  # replicated across TP
        assert sum(stage_parameters(m, tp, pp)) * tp == count_parameters(m) + (tp - 1) * norms


def test_plan_tokens_per_second_and_gpu_days():
    m = shape_for_preset("chameleon-7b")
    p = plan(m, Layout(gpus=1024, tp=2, pp=1, micro_batch=2, global_batch=1024), mfu=0.5, gpu="a100")
    assert p["tokens_per_s"] == pytest.approx(0.5 * 312e12 * 1024 / flops_per_token(m))
    b = p["budgets"]["4.4T (one epoch, Chameleon Table 1)"]
    assert b["gpu_days"] == pytest.approx(4.4e12 / p["tokens_per_s"] * 1024 / 86400)


@pytest.mark.parametrize("kw, msg", [
    (dict(gpus=10, tp=4), "not divisible by tp\\*pp"),
    (dict(gpus=9, tp=3), "heads"),
    (dict(gpus=10, tp=1, pp=5, vp=2), "num_layers"),
    (dict(gpus=8, global_batch=12, micro_batch=1), "global batch"),
])
def test_bad_layouts_fail_clearly(kw, msg):
    with pytest.raises(PlanError, match=msg):
        plan(shape_for_preset("chameleon-7b"), Layout(**kw))


def test_plan_cli_writes_json(tmp_path, capsys):
    from tessera.cli import main

    out = tmp_path / "plan.json"
    assert main(["bench", "plan", "--preset", "chameleon-34b", "--gpus", "64", "--tp", "8", "--pp", "4",
                 "--micro-batch", "1", "--global-batch", "64", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "34,294,308,864" in printed and "GPU-days" in printed
    data = json.loads(out.read_text())
    assert data["benchmark"] == "plan" and data["results"]["parameters"] == 34_294_308_864
    assert data["results"]["layout"]["dp"] == 2
    assert {"cpu_model", "cpu_cores", "torch_version", "gpu_name"} <= set(data["machine"])
    capsys.readouterr()
    assert main(["bench", "plan", "--preset", "chameleon-7b", "--gpus", "8", "--dp", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tessera bench: error: --dp 4 disagrees") and err.count("\n") == 1


def test_shape_from_config_reads_the_model_config():
    from tessera.model import get_preset

    cfg = dataclasses.replace(get_preset("chameleon-34b"))
    m = ModelShape.from_config(cfg)
    assert (m.num_query_groups, m.head_dim, m.kv_width) == (8, 128, 1024)


def test_plan_from_a_training_config(tmp_path, capsys):
    from tessera.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text("model:\n  preset: chameleon-34b\n  seq_length: 2048\n"
                   "parallel:\n  tp: 8\n  pp: 4\n  micro_batch_size: 2\n  global_batch_size: 512\n")
    out = tmp_path / "plan.json"
    assert main(["bench", "plan", "--config", str(cfg), "--gpus", "128", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    assert res["layout"]["tp"] == 8 and res["layout"]["pp"] == 4 and res["layout"]["dp"] == 4
    assert res["layout"]["micro_batch"] == 2 and res["layout"]["global_batch"] == 512
    assert res["layout"]["seq_length"] == 2048 and res["parameters"] == 34_294_308_864
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  preset: chameleon-7b\n  hidden_size: many\n")
    capsys.readouterr()
    assert main(["bench", "plan", "--config", str(bad), "--gpus", "8"]) == 2
    err = capsys.readouterr().err
    assert "hidden_size" in err and err.count("\n") == 1
