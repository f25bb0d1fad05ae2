"""Training observability: TensorBoard + metrics.jsonl + progress line, MFU, the logit-drift monitors
(output-logit norm, max attention logit) against references, held-out evaluation against a manual
forward, evaluation leaving training untouched, and TP=2 reporting the TP=1 figures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

TINY = ["configs/demo.yaml", "--model.preset", "tiny", "--optim.warmup", "1", "--data.seq_length", "32",
        "--parallel.micro_batch_size", "2", "--parallel.global_batch_size", "4"]


def _train(run, *extra, nproc=1, env=None):
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    cmd = [sys.executable, *launcher, "-m", "tessera.pretrain.trainer", *TINY, "--train.run_dir", str(run), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()], r.stdout


# ---- monitors, in process -------------------------------------------------------------------------
@pytest.fixture
def tiny_model(megatron_1proc):
    from tessera.model.chameleon import build_model
    from tessera.model.config import get_preset

    torch.manual_seed(0)
    cfg = get_preset("tiny")  # 4 query heads in 2 K/V groups: the probe must handle GQA
    return build_model(cfg), cfg


@pytest.mark.parametrize("chunk", [300, 1 << 24])
def test_logit_norm_sums_match_torch(megatron_1proc, monkeypatch, chunk):
    from tessera.pretrain import monitors

    monkeypatch.setattr(monitors, "_CHUNK_ELEMENTS", chunk)  # 300: one token per chunk
    logits = torch.randn(2, 5, 256) * 3
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    total, count = monitors.logit_norm_sums(logits, mask)
    ref = torch.linalg.vector_norm(logits, dim=-1)[mask.bool()]
    assert float(count) == 8
    assert float(total) / float(count) == pytest.approx(float(ref.mean()), rel=1e-6)


def test_logit_norm_through_the_schedule_equals_the_models_logits(tiny_model):
    """step_stats in the loss function of megatron's schedule, reduced like a training step, gives the
    mean L2 norm of the logits the model produces for the same batches."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from tessera.model.loss import language_model_loss
    from tessera.pretrain.device import training_device
    from tessera.pretrain.metrics import step_stats
    from tessera.pretrain.step import reduce_step

    model, cfg = tiny_model
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, cfg.vocab_size, (2, 17), generator=g) for _ in range(2)]

    def forward_step(it, m):
        t = next(it)
        pos = torch.arange(16).expand(2, 16)
        out = m(t[:, :-1], pos, None)

        def loss_fn(logits):
            lo = language_model_loss(logits, t[:, 1:], torch.ones(2, 16), cfg.z_loss_weight)
            return lo.total, step_stats(lo, logits, torch.ones(2, 16))
        return out, loss_fn

    out = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
                                      num_microbatches=2, seq_length=16, micro_batch_size=2, forward_only=True)
    got = reduce_step(out, torch.zeros(()), stop=False, device=training_device()).stats
    with torch.no_grad():
        norms = [torch.linalg.vector_norm(model(t[:, :-1], torch.arange(16).expand(2, 16), None).float(), dim=-1)
                 for t in batches]
    assert got["logit_norm"] == pytest.approx(float(torch.cat(norms).mean()), rel=1e-5)


def _manual_max_logit(q, k, scale):
    """max over b, heads, j <= i of scale * q_i . k_j; q [s, b, np, hn], k [s, b, ng, hn] (megatron layout)."""
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    scores = torch.einsum("ibhd,jbhd->bhij", q.double(), k.double()) * scale
    causal = torch.ones(q.shape[0], q.shape[0], dtype=torch.bool).tril()
    return float(scores.masked_fill(~causal, -math.inf).max())


@pytest.mark.parametrize("chunk", [1, 1 << 24])
def test_max_attention_logit_masks_gqa_and_chunks(monkeypatch, chunk):
    from tessera.pretrain import monitors

    monkeypatch.setattr(monitors, "_CHUNK_ELEMENTS", chunk)  # 1: one head per baddbmm
    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(12, 3, 4, 8, generator=g), torch.randn(12, 3, 2, 8, generator=g)
    assert float(monitors.max_attention_logit(q, k, 0.3)) == pytest.approx(_manual_max_logit(q, k, 0.3), rel=1e-6)
    # an explicit megatron mask (True = masked out), per batch element: the max must skip masked pairs
    kk = k.repeat_interleave(2, dim=2)
    scores = torch.einsum("ibhd,jbhd->bhij", q.double(), kk.double()) * 0.3
    mask = torch.rand(3, 1, 12, 12, generator=g) > 0.5
    bi, _, i, j = (int(x) for x in torch.unravel_index(scores.argmax(), scores.shape))
    mask[bi, 0, i, j] = True  # hide the largest score
    want = float(scores.masked_fill(mask, -math.inf).max())
    assert float(monitors.max_attention_logit(q, k, 0.3, attention_mask=mask)) == pytest.approx(want, rel=1e-6)
    assert want < float(scores.max())  # the mask did hide the largest score


def test_max_attention_logit_equals_manual_and_leaves_numerics_alone(tiny_model):
    from tessera.pretrain.monitors import AttentionLogitProbe

    model, cfg = tiny_model
    seen = []
    cores = [layer.self_attention.core_attention for layer in model.decoder.layers]
    hooks = [c.register_forward_pre_hook(lambda mod, args: seen.append((args[0].detach(), args[1].detach())))
             for c in cores]
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    pos = torch.arange(24).expand(2, 24)
    with torch.no_grad():
        plain = model(tokens, pos, None)
        seen.clear()
        probe = AttentionLogitProbe([model])
        assert len(probe.modules) == cfg.num_layers
        probe.arm(True)
        probed = model(tokens, pos, None)
        got = float(probe.value())
        # once per layer per arming: a second (different) forward does not move the recorded value
        model(tokens.flip(1), pos, None)
        assert float(probe.value()) == got
        probe.arm(False)
        model(tokens, pos, None)
        assert probe.value() is None
        probe.close()
    for h in hooks:
        h.remove()
    assert torch.equal(plain, probed)  # the probe only reads q and k
    scale = 1.0 / math.sqrt(cfg.head_dim)
    want = max(_manual_max_logit(q, k, scale) for q, k in seen[: cfg.num_layers])
    assert got == pytest.approx(want, rel=1e-5)


# ---- evaluation, in process ---------------------------------------------------------------------
def _eval_cfg(vocab_size):
    from tessera.model.config import get_preset
    from tessera.pretrain.config import TrainConfig

    cfg = TrainConfig(model=get_preset("tiny"))
    cfg.model.vocab_size = vocab_size
    cfg.parallel.micro_batch_size, cfg.parallel.global_batch_size = 2, 4
    cfg.data.seq_length, cfg.train.eval_steps = 16, 2
    return cfg


def test_eval_equals_manual_forward_and_restores_rng(tiny_model):
    from megatron.core import tensor_parallel

    from tessera.pretrain.evaluate import Evaluator

    model, mcfg = tiny_model
    cfg = _eval_cfg(mcfg.vocab_size)
    modality = torch.full((mcfg.vocab_size,), 2)  # 0-99 text, 100-199 image, the rest special
    modality[:100], modality[100:200] = 0, 1
    g = torch.Generator().manual_seed(11)
    held = {}
    for step in range(2):
        held[step] = []
        for _ in range(2):
            t = torch.randint(0, 220, (2, 17), generator=g)
            mask = torch.ones(2, 16)
            mask[0, :3] = 0
            held[step].append({"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": mask,
                               "position_ids": torch.arange(16).expand(2, 16)})
    # the batch source draws from the global RNG, as a data pipeline might: run() must still restore it
    ev = Evaluator(cfg, [model], n_micro=2, dp_rank=0, dp_size=1, modality=modality,
                   batches=lambda s: (torch.rand(1), held[s])[1])
    model.train()
    rng = torch.get_rng_state()
    tracker = {k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()}
    got = ev.run()
    assert model.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, tracker[k]) for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items())

    ce, labels, masks = [], [], []
    model.eval()
    with torch.no_grad():
        for b in (b for s in range(2) for b in held[s]):
            logits = model(b["tokens"], b["position_ids"], None).float()
            ce.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["labels"].reshape(-1), reduction="none"))
            labels.append(b["labels"].reshape(-1))
            masks.append(b["loss_mask"].reshape(-1).bool())
    model.train()
    ce, labels, masks = torch.cat(ce), torch.cat(labels), torch.cat(masks)
    assert got["eval_tokens"] == masks.sum()
    assert got["eval_loss"] == pytest.approx(float(ce[masks].mean()), rel=1e-5)
    assert got["eval_ppl"] == pytest.approx(math.exp(float(ce[masks].mean())), rel=1e-5)
    for code, name in ((0, "text"), (1, "image"), (2, "special")):
        sel = masks & (modality[labels] == code)
        assert got[f"eval_ce_{name}"] == pytest.approx(float(ce[sel].mean()), rel=1e-5)
        assert got[f"eval_ppl_{name}"] == pytest.approx(math.exp(float(ce[sel].mean())), rel=1e-5)


def test_mock_heldout_is_deterministic_and_not_the_training_stream(tiny_model):
    from tessera.pretrain.evaluate import Evaluator
    from tessera.pretrain.mock import heldout_mock_batch, train_mock_batch

    model, mcfg = tiny_model
    cfg = _eval_cfg(mcfg.vocab_size)
    ev = Evaluator(cfg, [model], n_micro=2, dp_rank=0, dp_size=1)
    first, second = ev.run(), ev.run()
    assert first == second and "eval_ce_text" not in first  # no vocabulary: no modalities
    assert not torch.equal(heldout_mock_batch(cfg, 1, 0)["tokens"], train_mock_batch(cfg, 1, 0)["tokens"])


def test_mfu_uses_the_shared_flops_per_token_and_a_datasheet_peak():
    import dataclasses

    from tessera.bench.plan import ModelShape
    from tessera.bench.plan import flops_per_token as plan_flops
    from tessera.model.config import get_preset
    from tessera.model.flops import flops_per_token, gpu_key, gpu_peak_flops
    from tessera.pretrain.config import TrainConfig
    from tessera.pretrain.metrics import TrainLogger, peak_flops_per_device

    cfg = TrainConfig(model=get_preset("tiny"))
    cfg.train.peak_flops = 2e12
    log = TrainLogger(cfg, "/nonexistent", world_size=4, enabled=False)
    fpt = flops_per_token(cfg.model, cfg.data.seq_length)
    m34 = get_preset("chameleon-34b")  # GQA: kv heads != query heads
    assert fpt == plan_flops(ModelShape.from_config(cfg.model), cfg.data.seq_length)  # bench plan's = the trainer's
    assert flops_per_token(m34, 4096) == plan_flops(ModelShape.from_config(m34), 4096)
    assert log.flops_per_token == fpt
    assert log.mfu(1000.0) == pytest.approx(1000.0 * fpt / (4 * 2e12))
    # the model the run built (vocabulary from the data) decides FLOPs/token, not the config's preset
    big_vocab = dataclasses.replace(cfg.model, vocab_size=4096)
    assert TrainLogger(cfg, "/x", 1, enabled=False, model=big_vocab).flops_per_token > fpt

    # datasheet dense peaks by device name and precision
    assert [gpu_key(n) for n in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200",
                                 "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe", "NVIDIA GH200 480GB",
                                 "NVIDIA B200", "Tesla V100-SXM2-16GB")] == [
        "h100", "h100-pcie", "h100-nvl", "h200", "a100", "a100", "gh200", "b200", None]
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == (989e12, "H100 SXM datasheet dense bf16 peak (989 TFLOP/s)")
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "fp32", tf32=True)[0] == 495e12
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "fp32", tf32=False)[0] == 67e12
    assert gpu_peak_flops("NVIDIA B200", "fp32") is None and gpu_peak_flops("Tesla V100", "bf16") is None
    # the CPU: no MFU unless train.peak_flops says what to divide by
    assert peak_flops_per_device(None, "fp32", torch.device("cpu"))[0] is None
    assert peak_flops_per_device(5e11, "bf16", torch.device("cpu"))[0] == 5e11
    cfg.train.peak_flops = None
    no_peak = TrainLogger(cfg, "/x", 1, enabled=False)
    no_peak.start_step()
    assert "mfu" not in no_peak.end_step() and no_peak.mfu(1e6) is None


def test_tokens_per_s_is_averaged_over_a_window_of_steps(monkeypatch):
    from tessera.model.config import get_preset
    from tessera.pretrain import metrics
    from tessera.pretrain.config import TrainConfig

    cfg = TrainConfig(model=get_preset("tiny"))
    cfg.train.peak_flops = 1e12
    monkeypatch.setattr(metrics, "TOKENS_WINDOW", 3)
    log = metrics.TrainLogger(cfg, "/x", 1, enabled=False)
    clock = iter([0.0, 1.0, 1.0, 2.0, 2.0, 6.0, 6.0, 7.0])  # steps of 1, 1, 4, 1 s
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    recs = []
    for _ in range(4):
        log.start_step()
        recs.append(log.end_step())
    tokens = cfg.parallel.global_batch_size * cfg.data.seq_length
    assert [r["step_seconds"] for r in recs] == [1.0, 1.0, 4.0, 1.0]
    # total tokens / total seconds over the last 3 steps: the 4 s step weighs as a 4 s step, not as 1/4
    assert [r["tokens_per_s"] for r in recs] == pytest.approx([tokens, tokens, 3 * tokens / 6, 3 * tokens / 6])
    assert recs[-1]["mfu"] == pytest.approx(recs[-1]["tokens_per_s"] * log.flops_per_token / 1e12)


# ---- a real run: pretokenized train + held-out data ---------------------------------------------
@pytest.fixture(scope="module")
def pretok(tiny_pretok):
    """The session's tiny pretokenized corpus (conftest.tiny_pretok)."""
    return tiny_pretok


@pytest.fixture(scope="module")
def obs_run(pretok, tmp_path_factory):
    run = tmp_path_factory.mktemp("obs") / "run"
    recs, stdout = _train(run, "--train.steps", "3", "--train.log_interval", "2", "--train.eval_interval", "2",
                          "--train.eval_steps", "1", "--train.peak_flops", "1e12", "--data.path", str(pretok["train"]),
                          "--data.eval_path", str(pretok["heldout"]), "--train.monitor_interval", "2",
                          env={"TESSERA_COUNT_SYNCS": "1"})
    return run, recs, stdout


def test_one_host_sync_per_step(obs_run):
    """TESSERA_COUNT_SYNCS=1 counts the reads a step's device region makes (tessera.syncs): one per
    step, monitor steps included (the attention max rides in the same read; evaluation and checkpoints
    are outside the region)."""
    _, recs, _ = obs_run
    assert [r["host_syncs"] for r in recs] == [1, 1, 1]
    assert all("max_attn_logit" in r for r in recs)  # monitor steps 1, 2 (interval), 3 (last)


def test_run_writes_tensorboard_scalars(obs_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, recs, _ = obs_run
    ea = EventAccumulator(str(run / "tensorboard"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    want = {"train/loss", "train/ce_text", "train/ce_image", "train/z_loss", "train/lr", "train/grad_norm",
            "train/bad_steps", "train/bad_steps_total", "monitors/logit_norm", "monitors/max_attn_logit", "perf/tokens_per_s", "perf/mfu",
            "eval/loss", "eval/ppl", "eval/ce_text", "eval/ppl_text", "eval/ce_image", "eval/ppl_image"}
    assert want <= tags, want - tags
    assert [e.step for e in ea.Scalars("train/loss")] == [1, 2, 3]
    assert [e.value for e in ea.Scalars("train/loss")] == pytest.approx([r["loss"] for r in recs], rel=1e-6)
    # eval every 2 steps and once at the end; monitors at steps 1, every monitor_interval (2), last
    assert [e.step for e in ea.Scalars("eval/ce_image")] == [2, 3]
    assert [e.step for e in ea.Scalars("monitors/max_attn_logit")] == [1, 2, 3]


def test_run_jsonl_keys_mfu_and_progress_line(obs_run):
    import dataclasses

    import yaml

    from tessera.model.config import get_preset
    from tessera.model.flops import flops_per_token

    run, recs, stdout = obs_run
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:  # the keys the demo report reads, every step
        assert {"loss", "ce_text", "ce_image", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(r)
        assert r["loss"] == pytest.approx(r["ce"] + r["z"], rel=1e-5)  # image_loss_weight 1
    # MFU = tokens/s x FLOPs/token (tessera.model.flops) / (1 device x train.peak_flops); the trainer sized the
    # vocabulary to the data's, which the saved config records beside the request (left as asked)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    vocab = saved["resolved"]["model"]["vocab_size"]
    assert saved["model"]["vocab_size"] == get_preset("tiny").vocab_size != vocab
    assert saved["resolved"]["precision"] == "fp32" and saved["resolved"]["data_parallel_size"] == 1
    fpt = flops_per_token(dataclasses.replace(get_preset("tiny"), vocab_size=vocab), 32)
    for i, r in enumerate(recs):
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * fpt / 1e12, rel=1e-9)
        # averaged over the steps so far (fewer than the window): tokens / seconds
        assert r["tokens_per_s"] == pytest.approx((i + 1) * 4 * 32 / sum(x["step_seconds"] for x in recs[: i + 1]),
                                                  rel=1e-9)
    assert "eval_ce_text" in recs[1] and "eval_ce_text" in recs[2] and "eval_loss" not in recs[0]
    assert recs[1]["eval_ppl_text"] == pytest.approx(math.exp(recs[1]["eval_ce_text"]))
    lines = [x for x in stdout.splitlines() if x.startswith("step ")]
    assert [x.split()[1] for x in lines] == ["1/3", "2/3", "3/3"]
    for x in lines:
        for word in ("loss", "ce text", "image", "lr", "grad", "tok/s", "MFU", "elapsed", "eta"):
            assert word in x, (word, x)
    assert sum(x.startswith("eval step") for x in stdout.splitlines()) == 2


# ---- evaluation leaves training alone; TP=2, PP=2, DP=2 report the 1-process figures -------------
@pytest.mark.slow
def test_eval_does_not_perturb_training(pretok, tmp_path):
    """Dropout on, real train + held-out data: evaluating every step must not change the training losses
    (RNG, data position and train mode untouched)."""
    common = ("--train.steps", "3", "--model.hidden_dropout", "0.1", "--model.attention_dropout", "0.1",
              "--train.eval_steps", "2", "--data.path", str(pretok["train"]), "--data.eval_path", str(pretok["heldout"]))
    with_eval, _ = _train(tmp_path / "a", *common, "--train.eval_interval", "1")
    without, _ = _train(tmp_path / "b", *common, "--train.eval_interval", "0")
    assert [r["loss"] for r in with_eval] == [r["loss"] for r in without]
    assert with_eval[-1]["eval_loss"] == without[-1]["eval_loss"]


LAYOUT_COMMON = ("--train.steps", "2", "--train.eval_interval", "1", "--train.eval_steps", "1")


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("one") / "run", *LAYOUT_COMMON)[0]


@pytest.mark.slow
@pytest.mark.parametrize("layout", [("--parallel.tp", "2"), ("--parallel.pp", "2"), ()], ids=["tp2", "pp2", "dp2"])
def test_two_processes_report_the_one_process_monitors_and_eval(one_process_run, tmp_path, layout):
    """Same figures for any layout: the reductions count every token once, and the attention probe
    reads the step's first global micro-batch (DP rank 0)."""
    ref = one_process_run
    got, _ = _train(tmp_path / "two", *LAYOUT_COMMON, *layout, nproc=2)
    for key in ("loss", "ce", "z", "logit_norm", "max_attn_logit", "eval_loss"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in ref], rel=1e-5, abs=1e-6), key


def test_resumed_logger_replaces_the_rows_past_the_checkpoint_in_tensorboard(tmp_path):
    """A run killed after step 5 with its checkpoint at step 3 logs steps 4, 5 again: TensorBoard must show
    the new values once (SummaryWriter purge_step), as metrics.jsonl is trimmed by the resume code."""
    import io

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tessera.model.config import get_preset
    from tessera.pretrain.config import TrainConfig
    from tessera.pretrain.metrics import TrainLogger

    cfg = TrainConfig(model=get_preset("tiny"))
    cfg.train.steps = 6

    def rec(step, loss):
        return {"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 1.0, "bad_steps": int(step in (2, 6))}

    first = TrainLogger(cfg, tmp_path, world_size=1, enabled=True, stream=io.StringIO())
    for step in range(1, 6):
        first.log(rec(step, float(step)))
    first.close()
    second = TrainLogger(cfg, tmp_path, world_size=1, enabled=True, stream=io.StringIO(), first_step=3)
    for step in (4, 5, 6):
        second.log(rec(step, 10.0 + step))
    second.close()
    ea = EventAccumulator(str(tmp_path / "tensorboard"))
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0),
                                                                    (5, 15.0), (6, 16.0)]
    # skipped steps so far: step 2 (read back from the first process's metrics.jsonl), then step 6
    assert [(e.step, e.value) for e in ea.Scalars("train/bad_steps_total")][-3:] == [(4, 1.0), (5, 1.0), (6, 2.0)]
