"""A training step's device side, in process: every tensor it builds lives on the model's device.

The CPU has one real device, so the step is given another: ``meta``. The host batches (the mock dataset,
a woven-iterator-like batch, the vocabulary's modality table) start on the CPU; a small LM on ``meta``
stands in for the GPT chunk; a ``TorchDispatchMode`` records the device of every tensor each op
produces. Any tensor left on (or created on) the host shows up as ``cpu`` in the record, or makes a
meta op fail: removing one ``.to(device)`` from the batch mover, the modality lookup, the loss, the
statistics or the monitors fails these tests.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

META = torch.device("meta")


class DeviceRecorder(TorchDispatchMode):
    """The devices of every tensor any aten op produced while active and not ``paused`` (op name -> devices).
    Host byte tensors are not recorded: they are RNG states (``torch.cuda.get_rng_state`` is a CPU
    ByteTensor on every machine), which evaluation saves and restores around its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, set[str]] = {}
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not self.paused and not (t.device.type == "cpu" and t.dtype == torch.uint8):
                self.seen.setdefault(str(func), set()).add(t.device.type)
        return out

    def host_side(self, fn):
        """``fn`` with recording paused: data loading builds host batches by design."""
        def wrapped(*args, **kwargs):
            self.paused = True
            try:
                return fn(*args, **kwargs)
            finally:
                self.paused = False
        return wrapped

    def off_device(self, device: str = "meta") -> dict[str, set[str]]:
        return {op: devs for op, devs in self.seen.items() if devs != {device}}


class TinyLM(torch.nn.Module):
    """Stands in for a GPT chunk (first and last stage): embedding + positions -> logits [b, s, V]."""

    pre_process = post_process = True

    def __init__(self, vocab: int, device: torch.device = META) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 8, device=device)
        self.out = torch.nn.Linear(8, vocab, bias=False, device=device)

    def forward(self, tokens, position_ids, attention_mask):
        assert attention_mask is None
        return self.out(self.emb(tokens) + position_ids[..., None].to(self.emb.weight.dtype))


def _cfg():
    from tessera.model.config import get_preset
    from tessera.pretrain.config import TrainConfig

    cfg = TrainConfig(model=get_preset("tiny"))
    cfg.parallel.micro_batch_size, cfg.parallel.global_batch_size = 2, 4
    cfg.data.seq_length, cfg.train.eval_steps = 16, 1
    return cfg


def _modality(vocab: int) -> torch.Tensor:
    table = torch.full((vocab,), 2)
    table[:100], table[100:200] = 0, 1
    return table


def _woven_like(cfg, seed: int) -> dict[str, torch.Tensor]:
    """A host batch with the woven iterator's keys (``source`` is not for the model and must not move)."""
    from tessera.pretrain.mock import train_mock_batch

    b = train_mock_batch(cfg, seed, 0)
    b["loss_mask"][0, :3] = 0
    b["source"] = torch.zeros(cfg.parallel.micro_batch_size, dtype=torch.long)
    return b


def test_training_step_tensors_stay_on_the_models_device(megatron_1proc, monkeypatch):
    """Batches, loss, statistics, both monitors and the packed step reduction are all built on the device;
    the all-reduces get device tensors (the read to the host is where a meta tensor stops)."""
    from tessera.pretrain.monitors import max_attention_logit
    from tessera.pretrain.step import BatchMover, ForwardStep, reduce_step

    cfg = _cfg()
    vocab = cfg.model.vocab_size
    model = TinyLM(vocab)
    mover = BatchMover(META, inputs=True, labels=True, modality=_modality(vocab))
    host = [_woven_like(cfg, 1), _woven_like(cfg, 2)]
    assert all(t.device.type == "cpu" for b in host for t in b.values())
    reduced = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, op=None, **_: reduced.append((t.device, op)))
    rec = DeviceRecorder()
    with rec:
        micro = mover.all(host)
        step = ForwardStep(z_loss_weight=1e-4, image_loss_weight=0.5, monitor=True)
        it, outs = iter(micro), []
        for _ in micro:
            out, loss_fn = step(it, model)
            loss, stats = loss_fn(out)
            loss.backward()
            outs.append(stats)
        q, k = torch.randn(16, 2, 4, 8, device=META), torch.randn(16, 2, 2, 8, device=META)
        attn = max_attention_logit(q, k, 0.3)
        sumsq = sum(p.grad.float().square().sum() for p in model.parameters())
        with pytest.raises((NotImplementedError, RuntimeError)):  # the one host read: meta has no data
            reduce_step(outs, sumsq, stop=False, device=META, attn_max=attn, monitor=True)
    assert set(micro[0]) == {"tokens", "position_ids", "labels", "loss_mask", "label_modality"}  # not "source"
    assert all(t.device == META for b in micro for t in b.values())
    assert all(v.device == META for o in outs for v in o.values())
    assert attn.device == META and model.emb.weight.grad.device == META
    assert [d for d, _ in reduced] == [META, META]  # the SUM of stats + norm + stop flag, the MAX of the monitor
    assert rec.seen and not rec.off_device(), rec.off_device()


def test_stage_roles_decide_what_moves():
    from tessera.pretrain.step import BatchMover

    b = {"tokens": torch.zeros(1, 4, dtype=torch.long), "position_ids": torch.zeros(1, 4, dtype=torch.long),
         "labels": torch.zeros(1, 4, dtype=torch.long), "loss_mask": torch.ones(1, 4)}
    first = BatchMover(META, inputs=True, labels=False, modality=torch.zeros(8, dtype=torch.long))
    last = BatchMover(META, inputs=False, labels=True, modality=torch.zeros(8, dtype=torch.long))
    middle = BatchMover(META, inputs=False, labels=False)
    assert set(first(b)) == {"tokens", "position_ids"} and first.modality is None
    assert set(last(b)) == {"labels", "loss_mask", "label_modality"}
    assert middle(b) == {}


class _Stop(Exception):
    pass


def test_heldout_evaluation_runs_on_the_models_device(megatron_1proc):
    """Evaluator.run moves the held-out batches (mock dataset here) and builds its sums on the device: a
    one-stage schedule stand-in runs the evaluator's forward step on meta and stops before the all-reduce."""
    from tessera.pretrain.evaluate import Evaluator
    from tessera.pretrain.metrics import CE_KEYS

    cfg = _cfg()
    model = TinyLM(cfg.model.vocab_size)
    seen = []

    def schedule(*, forward_step_func, data_iterator, model, num_microbatches, forward_only, **_):
        assert forward_only
        outs = []
        for _ in range(num_microbatches):
            out, loss_fn = forward_step_func(data_iterator, model[0])
            outs.append(loss_fn(out)[1])
        seen.extend(outs)
        raise _Stop

    ev = Evaluator(cfg, [model], n_micro=2, dp_rank=0, dp_size=1, modality=_modality(cfg.model.vocab_size),
                   device=META, forward_backward_func=schedule)
    rec = DeviceRecorder()
    # the held-out source builds host batches (data loading)
    ev._sets = {name: rec.host_side(batches) for name, batches in ev._sets.items()}
    with rec, pytest.raises(_Stop):
        ev.run()
    assert len(seen) == 2 and set(CE_KEYS) <= set(seen[0])
    assert all(v.device == META for o in seen for v in o.values())
    assert rec.seen and not rec.off_device(), rec.off_device()
    assert model.training  # run() restored the mode even though the schedule raised


class ShapeRecorder(TorchDispatchMode):
    """(dtype, shape) of every tensor any aten op produced while active."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[torch.dtype, tuple[int, ...]]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.seen |= {(t.dtype, tuple(t.shape)) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)}
        return out


def test_bf16_logits_go_to_the_loss_without_an_fp32_copy(megatron_1proc):
    """Float16Module(fp32_output=False) + the loss's in-place backward (the training path) against the path it
    replaces (fp32 logits out of Float16Module, out-of-place backward), same bf16 weights and batches: the
    same loss and statistics, gradients within bf16 rounding; and no fp32 [b, s, V] tensor is ever made."""
    import dataclasses

    from megatron.core.transformer.module import Float16Module

    from tessera.model.chameleon import build_model
    from tessera.model.config import get_preset
    from tessera.pretrain.step import ForwardStep, model_kwargs

    mcfg = dataclasses.replace(get_preset("tiny"), params_dtype="bfloat16")
    chunk = build_model(mcfg, init_seed=3)
    wrapped = Float16Module(chunk.config, chunk)
    cfg = _cfg()
    batch = {k: v for k, v in _woven_like(cfg, 5).items() if k != "source"}
    batch["label_modality"] = _modality(mcfg.vocab_size)[batch["labels"]]
    logits_shape = (*batch["labels"].shape, mcfg.vocab_size)

    def run(kwargs, inplace):
        chunk.zero_grad(set_to_none=True)
        step = ForwardStep(z_loss_weight=1e-4, image_loss_weight=0.5, monitor=True, model_kwargs=kwargs,
                           inplace_backward=inplace)
        rec = ShapeRecorder()
        with rec:
            out, loss_fn = step(iter([batch]), wrapped)
            loss, stats = loss_fn(out)
            before = out.detach().clone()
            loss.backward()
        overwritten = not torch.equal(out.detach(), before)  # the backward wrote the gradient over the logits
        return out.dtype, overwritten, loss, stats, {n: p.grad.float() for n, p in chunk.named_parameters()}, rec.seen

    old_dtype, old_inplace, old_loss, old_stats, old_grads, old_seen = run({}, False)  # fp32 logits (the default)
    new_dtype, new_inplace, new_loss, new_stats, new_grads, new_seen = run(model_kwargs(True), True)
    assert old_dtype == torch.float32 and new_dtype == torch.bfloat16
    assert new_inplace and not old_inplace
    assert (torch.float32, logits_shape) in old_seen  # the copy the recorder would see
    assert (torch.float32, logits_shape) not in new_seen
    # the fused cross-entropy upcasts bf16 tiles to fp32 itself (exact), so the forward is the same computation
    assert float(new_loss.detach()) == pytest.approx(float(old_loss.detach()), rel=1e-6)
    for k in ("ce", "z", "ce_text", "ce_image", "logit_norm"):
        assert float(new_stats[k]) == pytest.approx(float(old_stats[k]), rel=1e-6), k
    for n, g in old_grads.items():
        assert torch.allclose(new_grads[n], g, rtol=2e-2, atol=1e-4), n  # bf16 rounding of the logits' gradient
    assert any(g.abs().max() > 0 for g in new_grads.values())


# ---- the optimizer step: one host read, megatron's numerics ----------------------------------------
def _model_with_grads(bf16: bool, seed: int = 7):
    """Tiny model chunks in megatron DDP + megatron's optimizer (what the trainer builds), with the gradients
    of one 2-micro-batch step on the mock dataset computed through megatron's schedule."""
    import dataclasses

    from megatron.core.pipeline_parallel import get_forward_backward_func

    from tessera.pretrain.optimizer import get_optimizer
    from tessera.pretrain.scale import wire_schedule
    from tessera.pretrain.step import BatchMover, ForwardStep, model_kwargs
    from tessera.pretrain.trainer import _build_model_chunks

    cfg = _cfg()
    cfg.optim.clip_grad = 0.05  # small: the clipping path runs
    cfg.model = dataclasses.replace(cfg.model, params_dtype="bfloat16" if bf16 else "float32")
    cfg.train.seed = seed
    chunks, ddps = _build_model_chunks(cfg, bf16)
    opt = get_optimizer(cfg.optim, ddps, bf16)
    wire_schedule(chunks, ddps, opt)
    for p in opt.param_groups:
        p["lr"] = 1e-2
    micro = BatchMover("cpu").all([_woven_like(cfg, 11), _woven_like(cfg, 12)])
    for d in ddps:
        d.zero_grad_buffer()
    opt.zero_grad()
    get_forward_backward_func()(forward_step_func=ForwardStep(z_loss_weight=1e-4, model_kwargs=model_kwargs(bf16)),
                                data_iterator=iter(micro), model=ddps, num_microbatches=2, seq_length=16,
                                micro_batch_size=2, forward_only=False)
    return chunks, opt


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_update_with_the_packed_norm_equals_megatrons_step(megatron_1proc, bf16):
    """prepare_grads + grad_sumsq (read with the step's statistics) + apply_update == opt.step(): the same
    grad norm and bitwise the same parameters and Adam state (1 process: the sum has one term)."""
    from tessera.pretrain.optimizer import apply_update, grad_sumsq

    ref_chunks, ref_opt = _model_with_grads(bf16)
    ok, ref_norm, _ = ref_opt.step()
    chunks, opt = _model_with_grads(bf16)
    assert not opt.prepare_grads()
    norm = float(grad_sumsq(opt, torch.device("cpu"))) ** 0.5
    assert apply_update(opt, norm) and ok
    assert norm == ref_norm and norm > 0.05  # clipped
    for (n, a), (_, b) in zip(ref_chunks[0].named_parameters(), chunks[0].named_parameters(), strict=True):
        assert torch.equal(a, b), n
    ref_state, state = ref_opt.state_dict(), opt.state_dict()
    for key in ("state",) if not bf16 else ("optimizer",):
        a = ref_state[key] if not bf16 else ref_state[key]["state"]
        b = state[key] if not bf16 else state[key]["state"]
        assert a.keys() == b.keys() and all(torch.equal(a[i][m], b[i][m]) for i in a for m in ("exp_avg", "exp_avg_sq"))


def test_host_sync_counter_counts_reads_and_restores_torch():
    from tessera.syncs import HOST_READS, HostSyncCounter

    before = {n: getattr(torch.Tensor, n) for n in HOST_READS}
    t, v = torch.tensor(2.5), torch.ones(3)
    opt = torch.optim.Adam([torch.nn.Parameter(torch.ones(2))], lr=0.1, foreach=False)
    opt.param_groups[0]["params"][0].grad = torch.ones(2)
    with HostSyncCounter("cpu") as syncs:
        t.item(), v.tolist(), float(t), int(t), bool(t), v.numpy(), [0, 1][torch.tensor(1)]  # noqa: B018
        if t > 2:
            pass
        opt.step()  # reads its host-side step counter: not a device sync anywhere
        f"{t:.1f}"  # noqa: B018 - format reads the value (through .item)
    assert syncs.count == 9, syncs.calls
    assert {n: getattr(torch.Tensor, n) for n in HOST_READS} == before
    t.item()
    assert syncs.count == 9  # outside the region nothing is counted


# ---- weight decay -------------------------------------------------------------------------------
def test_norms_and_biases_are_not_weight_decayed(megatron_1proc):
    """Every norm weight and bias (the per-head QK-norm ones are 2-D) sits in a weight-decay-0 group once
    megatron's scheduler has set the groups' decay; with zero gradients an AdamW step leaves them exactly
    as they were and shrinks every other weight by a factor 1 - lr x wd."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from tessera.pretrain.optimizer import get_optimizer, no_weight_decay
    from tessera.pretrain.trainer import _build_model_chunks

    cfg = _cfg()
    cfg.optim.weight_decay = 0.1
    chunks, ddps = _build_model_chunks(cfg, bf16=False)
    opt = get_optimizer(cfg.optim, ddps, bf16=False)
    OptimizerParamScheduler(opt, init_lr=0.0, max_lr=1e-2, min_lr=1e-2, lr_warmup_steps=0, lr_decay_steps=10,
                            lr_decay_style="constant", start_wd=0.1, end_wd=0.1, wd_incr_steps=10,
                            wd_incr_style="constant")
    names = {id(p): n for n, p in chunks[0].named_parameters()}
    decay = {names[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    lr = {names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
    exempt = {n for n in decay if "norm" in n or n.endswith(".bias")}
    assert {"decoder.layers.0.self_attention.q_layernorm.weight", "decoder.layers.1.self_attention.k_layernorm.bias",
            "decoder.final_layernorm.weight", "decoder.layers.0.input_layernorm.weight"} <= exempt
    assert chunks[0].decoder.layers[0].self_attention.q_layernorm.weight.dim() == 2  # what megatron's rule misses
    assert {n: w for n, w in decay.items() if n in exempt} == dict.fromkeys(exempt, 0.0)
    assert {n: w for n, w in decay.items() if n not in exempt} == {n: 0.1 for n in decay if n not in exempt}
    assert len(decay) > len(exempt) > 0

    before = {n: p.detach().clone() for n, p in chunks[0].named_parameters()}
    for d in ddps:
        d.zero_grad_buffer()  # zero gradients: Adam's own update is 0, only decay moves a weight
    opt.zero_grad()
    opt.step()
    for n, p in chunks[0].named_parameters():
        if n in exempt:
            assert torch.equal(p, before[n]), n
        else:
            assert torch.allclose(p, before[n] * (1 - lr[n] * 0.1), rtol=1e-6, atol=0), n  # AdamW's decoupled decay

    te_names = ["decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", "decoder.layers.0.mlp.linear_fc1.weight"]
    assert [no_weight_decay(torch.ones(4, 4), n) for n in te_names] == [True, False]
