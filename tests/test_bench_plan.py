"""`tessera bench plan` arithmetic: exact parameter counts, FLOPs and memory against hand computations."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tessera.bench.plan import (
    CPU_KERNELS,
    Kernels,
    Layout,
    ModelShape,
    PlanError,
    activation_bytes_per_layer,
    activation_terms,
    count_parameters,
    flops_per_token,
    memory_per_gpu,
    plan,
    recompute_working_bytes,
    shape_for_preset,
    stage_layer_bytes,
    stage_parameters,
)
from tessera.config import ConfigError


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
    """The paper's setting: GeLU MLP with ffn 4h, multi-head attention, no QK-norm, no RoPE, dropout on."""
    return ModelShape(num_layers=4, hidden_size=h, ffn_hidden_size=4 * h, num_attention_heads=a,
                      num_query_groups=a, head_dim=h // a, vocab_size=1024, seq_length=s, qk_norm=False,
                      gated_mlp=False, hidden_dropout=0.1, attention_dropout=0.1, rope=False)


UNFUSED = Kernels(attention="unfused")  # megatron's DotProductAttention: the paper's s x s softmax


@pytest.mark.parametrize("t", [1, 2, 8])
def test_activations_reduce_to_korthikanti_table_2(t):
    m = _korthikanti_shape()
    s, b, h, a = m.seq_length, 2, m.hidden_size, m.num_attention_heads
    sbh, sb = s * b * h, s * b
    lay = Layout(tp=t, micro_batch=b, seq_length=s, precision="bf16")
    # the paper leaves out the norms' per-token statistics (fp32 1/rms: 4 B per token per norm): + 8sb
    # no parallelism / tensor parallel without sequence parallel: sbh (10 + 24/t + 5as/(ht))
    assert activation_bytes_per_layer(m, lay, "none", UNFUSED) == pytest.approx(
        sbh * (10 + 24 / t + 5 * a * s / (h * t)) + 8 * sb)
    # tensor + sequence parallel: sbh/t (34 + 5as/h)
    sp = dataclasses.replace(lay, sequence_parallel=t > 1)
    assert activation_bytes_per_layer(m, sp, "none", UNFUSED) == pytest.approx(sbh / t * (34 + 5 * a * s / h) + 8 * sb / t)
    # selective recomputation: 34 sbh / t ; full recomputation: 2 sbh / t
    assert activation_bytes_per_layer(m, sp, "selective", UNFUSED) == pytest.approx(34 * sbh / t + 8 * sb / t)
    assert activation_bytes_per_layer(m, sp, "full", UNFUSED) == pytest.approx(2 * sbh / t)
    # on the flash path (the configs' GPU kernels) the s x s terms are gone: the fp32 log-sum-exp remains, and
    # Transformer Engine's contiguous copy of V
    assert activation_bytes_per_layer(m, sp, "none") == pytest.approx(36 * sbh / t + 8 * sb / t + 4 * a * sb / t)
    assert activation_bytes_per_layer(m, sp, "none", Kernels(v_copy=False)) == pytest.approx(
        34 * sbh / t + 8 * sb / t + 4 * a * sb / t)


def test_swiglu_gqa_qknorm_rope_terms_by_hand():
    m = shape_for_preset("chameleon-34b")  # SwiGLU, 8 KV groups, QK-norm, RoPE, swin norm, no dropout
    s, b, t = 4096, 1, 8
    h, f, kv, a, g, hd = 8192, 22016, 1024, 64, 8, 128
    lay = Layout(tp=t, seq_length=s, sequence_parallel=True, precision="bf16")
    x = s * b
    terms = activation_terms(m, lay, "none")
    assert terms == pytest.approx({
        "norms": 2 * (2 * x * h + 4 * x) / t,  # fused norms: bf16 input + fp32 1/rms
        "linear_inputs": 2 * 2 * x * h / t,  # QKV and fc1 inputs (sequence-parallel shards)
        "qkv": 2 * x * (h + 2 * kv) / t,  # the QKV output stays whole (V and K's norm input are views)
        # one KV group per TP rank: megatron's query reshape is a view, no copy
        "qk_norm": (2 * x * (h + kv) + 2 * 4 * x * (a + g)) / t,  # LayerNorm outputs + fp32 mean, 1/std
        "rope": 2 * x * (h + kv) / t + 4 * 2 * s * hd,  # rotated q, k + megatron's cos / sin per call
        "attention_output": 2 * x * h / t,
        "core_attention": (4 * x * a + 2 * x * kv) / t,  # flash: fp32 log-sum-exp; TE's copy of V
        "mlp": 3 * 2 * x * f / t,  # [gate; up] and their SwiGLU product
    })
    assert "core_attention" not in activation_terms(m, lay, "selective")
    # two KV groups per TP rank: the query is copied out of the grouped layout, and the norm keeps the copy
    assert activation_terms(m, dataclasses.replace(lay, tp=4), "none")["query_copy"] == 2 * x * h / 4
    # the CPU's composite norm keeps an fp32 copy of its input and the fp32 normalised tensor
    cpu = activation_terms(m, dataclasses.replace(lay, tp=1, sequence_parallel=False), "none", CPU_KERNELS)
    assert cpu["norms"] == 2 * (8 * x * h + 4 * x)


def test_memory_per_gpu_by_hand():
    m = shape_for_preset("chameleon-7b")
    lay = Layout.for_gpus(64, tp=4, pp=2, micro_batch=1, global_batch=128, sequence_parallel=True,
                          distributed_optimizer=True, recompute="selective")
    assert (lay.dp, lay.microbatches) == (8, 16)
    mem = memory_per_gpu(m, lay)
    h, V, L = 4096, 65536, 32
    per_layer = 4 * h * h + 3 * h * 11008 + 4 * h + 2 * h  # matmuls, QK-norm w+b (split by TP), 2 norms
    split = 4 * h * h + 3 * h * 11008 + 4 * h
    stage0 = (L // 2) * (split // 4 + 2 * h) + V * h // 4
    stage1 = (L // 2) * (split // 4 + 2 * h) + V * h // 4 + h
    assert per_layer == split + 2 * h
    assert mem["params_per_gpu_by_stage"] == [stage0, stage1]
    # 1F1B: stage 0 holds pp=2 micro-batches of its 16 layers = 32 layers' worth (+ the embedding's ids and,
    # with TP, its out-of-vocabulary-slice mask), and a recomputation's working set in the backward
    x = 4096
    layer = activation_bytes_per_layer(m, lay, "selective")
    # selective: the recomputed attention's log-sum-exp, TE's V copy and output
    working = 4 * x * 32 / 4 + 2 * x * h / 4 + 2 * x * h / 4
    act0 = 2 * (16 * layer + 9 * x) + working
    # the last stage: final norm, output-layer input, bf16 logits, the loss's per-token vectors; its backward
    # frees them before any layer's recomputation runs
    last = (2 * x * h + 4 * x + 2 * x * h) / 4 + 2 * x * V / 4 + 32 * x
    act1 = max(16 * layer + last, 16 * layer + working)
    assert mem["activations_by_stage"]["selective"] == pytest.approx([act0, act1])
    # bf16 weights, fp32 main grads, fp32 master + Adam moments sharded over DP = 8
    totals = [(2 + 4 + 12 / 8) * n + a for n, a in zip([stage0, stage1], [act0, act1], strict=True)]
    assert mem["config_total"] == pytest.approx(max(totals))
    assert mem["busiest_stage"] == totals.index(max(totals))
    assert mem["total"]["distopt_selective"] == pytest.approx(max(totals))
    assert mem["optimizer_adam"] == 12 * mem["params_per_gpu"]
    # fp32: 4 B weights, and the optimizer keeps only m + v (the master weights are the model's)
    fp32 = memory_per_gpu(m, dataclasses.replace(lay, precision="fp32", distributed_optimizer=False))
    n = fp32["params_per_gpu"]
    assert (fp32["weights"], fp32["grads"], fp32["optimizer"]) == (4 * n, 4 * n, 8 * n)


def test_pipeline_chunks_in_flight_follow_megatrons_schedules():
    from tessera.bench.plan import chunks_in_flight

    # 1F1B: stage i runs p - i - 1 warm-up forwards, then one more before each backward
    lay = Layout(pp=4, dp=1, global_batch=8)
    assert [chunks_in_flight(lay, i) for i in range(4)] == [(4, False), (3, False), (2, False), (1, False)]
    # fewer micro-batches than that: every forward first
    assert chunks_in_flight(Layout(pp=4, dp=1, global_batch=2), 0) == (2, True)
    # interleaved (v chunks): (p - i - 1) x 2 + (v - 1) x p warm-up chunk forwards (megatron's
    # get_pp_rank_microbatches); stage 0's 11 chunks of 4 layers are Korthikanti's L (1 + (p - 1)/(p v)) = 44
    vp = Layout(pp=4, vp=2, dp=1, global_batch=16)
    assert [chunks_in_flight(vp, i)[0] for i in range(4)] == [11, 9, 7, 5]
    m = shape_for_preset("chameleon-7b")  # 32 layers: 4 per chunk
    assert chunks_in_flight(Layout(pp=2, vp=2, dp=1, global_batch=2), 0) == (4, True)
    acts = memory_per_gpu(m, dataclasses.replace(vp, seq_length=4096, distributed_optimizer=True))["activations_by_stage"]
    layer = activation_bytes_per_layer(m, dataclasses.replace(vp, seq_length=4096))
    assert acts["none"][1] == pytest.approx(9 * 4 * layer)


def test_full_recompute_methods():
    m = shape_for_preset("chameleon-7b")
    lay = Layout(tp=2, pp=2, dp=1, seq_length=4096, sequence_parallel=True, recompute="full")  # 16 layers a stage
    none, full = (activation_bytes_per_layer(m, lay, r) for r in ("none", "full"))
    assert full == 2 * 4096 * 4096 / 2  # the layer input (a sequence-parallel shard)
    assert stage_layer_bytes(m, lay) == 16 * full  # uniform, groups of 1
    assert stage_layer_bytes(m, dataclasses.replace(lay, recompute_num_layers=4)) == 4 * full
    block = dataclasses.replace(lay, recompute_method="block", recompute_num_layers=10)
    assert stage_layer_bytes(m, block) == pytest.approx(10 * full + 6 * none)
    # the backward recomputes one group at a time: its full activations are the working set
    assert recompute_working_bytes(m, dataclasses.replace(lay, recompute_num_layers=4)) == pytest.approx(4 * none)
    assert recompute_working_bytes(m, block) == pytest.approx(none)


def test_stage_parameters_add_up():
    m = shape_for_preset("chameleon-34b")
    for tp, pp in [(1, 1), (8, 1), (8, 4), (4, 8)]:
        norms = m.num_layers * 2 * m.hidden_size + m.hidden_size  # replicated across TP
        assert sum(stage_parameters(m, tp, pp)) * tp == count_parameters(m) + (tp - 1) * norms


def test_plan_tokens_per_second_and_gpu_days():
    m = shape_for_preset("chameleon-7b")
    p = plan(m, Layout.for_gpus(1024, tp=2, pp=1, micro_batch=2, global_batch=1024), mfu=0.5, gpu="a100")
    assert p["tokens_per_s"] == pytest.approx(0.5 * 312e12 * 1024 / flops_per_token(m))
    b = p["budgets"]["4.4T (one epoch, Chameleon Table 1)"]
    assert b["gpu_days"] == pytest.approx(4.4e12 / p["tokens_per_s"] * 1024 / 86400)


@pytest.mark.parametrize("kw, msg", [
    (dict(gpus=9, tp=3), "heads"),
    (dict(gpus=10, tp=1, pp=5, vp=2), "num_layers"),
    (dict(gpus=8, global_batch=12, micro_batch=1), "global batch"),
    (dict(gpus=8, sequence_parallel=True), "sequence parallelism needs tp > 1"),
])
def test_bad_layouts_fail_clearly(kw, msg):
    with pytest.raises(PlanError, match=msg):
        plan(shape_for_preset("chameleon-7b"), Layout.for_gpus(**kw))
    with pytest.raises(ConfigError, match="not divisible by tp\\*pp"):
        Layout.for_gpus(10, tp=4)


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
    """--config reads the config as the trainer does (its checks, its ParallelLayout); flags and --section.key
    overrides change it; the JSON gives the total under exactly the config's settings."""
    from tessera.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text("model:\n  preset: chameleon-34b\n  seq_length: 2048\n  recompute: full\n"
                   "parallel:\n  tp: 8\n  pp: 4\n  micro_batch_size: 2\n  global_batch_size: 512\n"
                   "  sequence_parallel: true\n"
                   "data:\n  seq_length: 2048\nprecision: bf16\n")
    out = tmp_path / "plan.json"
    assert main(["bench", "plan", "--config", str(cfg), "--gpus", "128", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    lay = res["layout"]
    assert (lay["tp"], lay["pp"], lay["dp"], lay["micro_batch"], lay["global_batch"], lay["seq_length"]) == \
        (8, 4, 4, 2, 512, 2048)
    assert lay["sequence_parallel"] and not lay["distributed_optimizer"] and lay["recompute"] == "full"
    assert res["parameters"] == 34_294_308_864 and res["model"] == "chameleon-34b"
    mem = res["memory"]
    stage = mem["stages"][mem["busiest_stage"]]
    assert mem["config_total"] == stage["total"] == pytest.approx(max(mem["total"]["adam_full"], stage["total"]))
    assert mem["config_total_gib"] == pytest.approx(mem["config_total"] / 2**30)
    # an override turns the distributed optimizer on: the optimizer term shrinks DP-fold
    assert main(["bench", "plan", "--config", str(cfg), "--gpus", "128", "--json", str(out),
                 "--parallel.distributed_optimizer", "true"]) == 0
    dist = json.loads(out.read_text())["results"]["memory"]
    assert dist["optimizer"] == pytest.approx(mem["optimizer"] / 4)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  preset: chameleon-7b\n  hidden_size: many\n")
    capsys.readouterr()
    assert main(["bench", "plan", "--config", str(bad), "--gpus", "8"]) == 2
    err = capsys.readouterr().err
    assert "hidden_size" in err and err.count("\n") == 1
    assert main(["bench", "plan", "--config", str(cfg), "--gpus", "128", "--tp", "1", "--pp", "1"]) == 2
    assert "sequence_parallel needs tensor parallelism" in capsys.readouterr().err
    assert main(["bench", "plan", "--preset", "chameleon-7b", "--parallel.tp", "2"]) == 2
    assert "need --config" in capsys.readouterr().err


@pytest.mark.parametrize("config", ["configs/chameleon-7b.yaml", "configs/chameleon-34b.yaml"])
def test_shipped_configs_fit_72_gb(config, tmp_path):
    """The shipped GPU configs, under their own settings on the smallest whole-node job (the distributed
    optimizer's share only shrinks with more GPUs), stay under 90% of an 80 GB GPU by the validated plan."""
    from tessera.cli import main

    out = tmp_path / "plan.json"
    assert main(["bench", "plan", "--config", config, "--json", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    lay = res["layout"]
    assert lay["gpus"] % 8 == 0 and lay["distributed_optimizer"] and lay["sequence_parallel"]
    assert lay["precision"] == "bf16"
    assert res["memory"]["config_total"] < 72e9


def test_layout_from_train_config_is_the_trainers():
    """The trainer's layout object from a config: its checks (one-line errors naming the keys) and what the
    plan reads from it."""
    from tessera.pretrain.config import load_train_config
    from tessera.pretrain.layout import ParallelLayout

    cfg = load_train_config("configs/chameleon-7b.yaml")
    lay = ParallelLayout.from_train_config(cfg, 16)
    assert (lay.tp, lay.pp, lay.dp, lay.world_size, lay.microbatches, lay.seq_length) == (2, 1, 8, 16, 128, 4096)
    assert lay.sequence_parallel and lay.distributed_optimizer and lay.recompute == "none" and lay.precision == "bf16"
    assert ParallelLayout.from_train_config(cfg, 16, precision="fp32").param_bytes == 4
    with pytest.raises(ConfigError, match="world size 3 is not divisible by parallel.tp x parallel.pp = 2"):
        ParallelLayout.from_train_config(cfg, 3)
    sp1 = load_train_config("configs/chameleon-7b.yaml", ["--parallel.tp", "1"])
    with pytest.raises(ConfigError, match="parallel.sequence_parallel needs tensor parallelism"):
        ParallelLayout.from_train_config(sp1, 8)
    full = load_train_config("configs/chameleon-7b.yaml", ["--model.recompute", "full", "--model.recompute_method",
                                                           "block", "--model.recompute_num_layers", "40"])
    with pytest.raises(ConfigError, match="recompute_num_layers 40"):
        ParallelLayout.from_train_config(full, 8)
