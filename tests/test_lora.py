"""LoRA on megatron's parallel linears (tessera.model.lora): a fresh adapter leaves the model unchanged,
merged == unmerged logits, only adapters train, the factors split as the layer they adapt (TP=2 with and
without sequence parallelism, PP=2 through megatron's schedule: the 1-process loss and adapter gradients),
and adapter checkpoints reshard across TP."""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

ALL = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "output_layer")
TINY = dict(num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, num_query_groups=2,
            vocab_size=256, seq_length=16, z_loss_weight=1e-2)
MICRO, MBS, SEQ = 2, 2, 16


def _randomize_b(model, seed=0, scale=0.1):
    """B away from its zero start (so the adapters change the output and A gets gradients)."""
    from tessera.model.lora import lora_linears

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_linears(model):
            m.lora_b.copy_(scale * torch.randn(m.lora_b.shape, generator=g))


def _batch(seed=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY["vocab_size"], (MICRO * MBS, SEQ + 1), generator=g)
    mask = (torch.rand(MICRO * MBS, SEQ, generator=g) > 0.2).float()
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), mask


def _model(megatron_1proc, **kw):
    from tessera.model import ModelConfig, build_model

    return build_model(ModelConfig(**{**TINY, **kw}), init_seed=1)


def test_fresh_adapters_leave_the_model_unchanged_and_merge_exactly(megatron_1proc):
    from tessera.model.lora import LoRASpec, apply_lora, lora_linears, merge_lora

    model = _model(megatron_1proc).eval()
    ids, _, _ = _batch()
    pos = torch.arange(SEQ)[None].expand(ids.shape[0], -1)
    base = model(ids, pos, None)
    names = apply_lora(model, LoRASpec(4, 8.0, 0.1, ALL), seed=3)
    assert len(names) == 2 * 4 + 1 and "output_layer" in names
    assert torch.equal(model(ids, pos, None), base)  # B = 0 (eval: no dropout)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for n in trainable)
    assert len(trainable) == 2 * len(names)
    _randomize_b(model)
    unmerged = model(ids, pos, None)
    assert (unmerged - base).abs().max() > 0.1  # the adapters do something
    assert merge_lora(model) == len(names)
    assert not list(lora_linears(model)) and not any("lora" in n for n, _ in model.named_parameters())
    assert type(model.output_layer).__name__ == "ColumnParallelLinear"
    merged = model(ids, pos, None)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)


def test_adapter_dropout_only_while_training(megatron_1proc):
    from tessera.model.lora import LoRASpec, apply_lora

    model = _model(megatron_1proc)
    apply_lora(model, LoRASpec(4, 8.0, 0.5, ("linear_qkv",)), seed=3)
    _randomize_b(model)
    ids, _, _ = _batch()
    pos = torch.arange(SEQ)[None].expand(ids.shape[0], -1)
    model.train()
    a, b = model(ids, pos, None), model(ids, pos, None)
    assert not torch.equal(a, b)  # two dropout masks
    model.eval()
    assert torch.equal(model(ids, pos, None), model(ids, pos, None))


def test_checkpoint_parts_split_adapters_from_base(megatron_1proc):
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    from tessera.model.checkpoint import model_sharded_state_dict
    from tessera.model.lora import LoRASpec, apply_lora

    model = _model(megatron_1proc)
    plain = set(model_sharded_state_dict(model)["model"])
    apply_lora(model, LoRASpec(4, 8.0, 0.0, ALL), seed=3)
    adapters = model_sharded_state_dict(model, "adapters")["model"]
    base = model_sharded_state_dict(model, "base")["model"]
    assert set(base) == plain  # the base part is exactly what a model without LoRA saves
    assert set(adapters) == {f"{n}.{f}" for n, _ in model.named_modules() if hasattr(_, "lora_a")
                             for f in ("lora_a", "lora_b")}
    # SwiGLU's B is stored as [gate; up] (reshards across TP like fc1's weight); the others are plain tensors
    fc1_b = adapters["decoder.layers.0.mlp.linear_fc1.lora_b"]
    assert isinstance(fc1_b, ShardedTensorFactory)
    assert adapters["decoder.layers.0.self_attention.linear_qkv.lora_a"].key == "decoder.layers.self_attention.linear_qkv.lora_a"


def test_bad_specs_are_refused():
    from tessera.model.lora import LoRAError, LoRASpec

    with pytest.raises(LoRAError, match="rank"):
        LoRASpec(0, 1.0)
    with pytest.raises(LoRAError, match="unknown"):
        LoRASpec(4, 1.0, 0.0, ("linear_qkv", "q_proj"))
    with pytest.raises(LoRAError, match="dropout"):
        LoRASpec(4, 1.0, 1.0)


# ---- TP=2 (with and without sequence parallelism) and PP=2 against one process ----------------------
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_name(model, name):
    from tessera.model.chameleon import global_param_name

    return global_param_name(model, name)


def _tp_slice(full, p, name, tp, rank):
    if not getattr(p, "tensor_model_parallel", False):
        return full
    dim = p.partition_dim
    if name.endswith("linear_fc1.lora_b"):  # [gate; up]: each rank holds [gate_r; up_r]
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)
    return full.chunk(tp, dim=dim)[rank]


def _worker(rank, port, tmpdir):
    faulthandler.dump_traceback_later(240, exit=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from tessera.model import ModelConfig, build_model, initialize_parallel, language_model_loss
    from tessera.model.checkpoint import model_sharded_state_dict
    from tessera.model.lora import LoRASpec, apply_lora, lora_linears

    cfg = ModelConfig(**TINY)
    spec = LoRASpec(4, 8.0, 0.0, ALL)
    ids, labels, mask = _batch()
    pos = torch.arange(SEQ).unsqueeze(0).expand(MBS, -1)
    out = {}

    def mb(i):
        s = slice(i * MBS, (i + 1) * MBS)
        return ids[s], labels[s], mask[s]

    def adapted(**kw):
        m = build_model(cfg, **kw)
        apply_lora(m, spec, seed=5)
        return m

    def load(model, path, part):
        state = dist_checkpointing.load(model_sharded_state_dict(model, part), path)["model"]
        model.load_state_dict(state, strict=part == "all")

    # reference: one process (both ranks identical)
    initialize_parallel(1, 1)
    ref = build_model(cfg, init_seed=1)
    apply_lora(ref, spec, seed=5)
    _randomize_b(ref)
    total = sum(language_model_loss(ref(*mb(i)[:1], pos, None), mb(i)[1], mb(i)[2], cfg.z_loss_weight).total
                for i in range(MICRO)) / MICRO
    total.backward()
    out["ref_loss"] = total.item()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters() if p.requires_grad}
    ref_adapters = {n: p.detach().clone() for n, p in ref.named_parameters() if p.requires_grad}
    out["scale"] = max(g.abs().max().item() for g in ref_grads.values())
    out["no_base_grad"] = all(p.grad is None for p in ref.parameters() if not p.requires_grad)
    ckpt = os.path.join(tmpdir, "ref")
    if rank == 0:
        os.makedirs(ckpt)
    torch.distributed.barrier()
    dist_checkpointing.save(model_sharded_state_dict(ref), ckpt)

    for sp in (False, True):
        tag = "tp_sp" if sp else "tp"
        initialize_parallel(tp=2, pp=1)
        model = adapted(sequence_parallel=sp)
        load(model, ckpt, "all")  # base and adapters, resharded (fc1's B through the SwiGLU factory)
        total = sum(language_model_loss(model(mb(i)[0], pos, None), mb(i)[1], mb(i)[2], cfg.z_loss_weight).total
                    for i in range(MICRO)) / MICRO
        total.backward()
        if sp:  # what finalize_model_grads does for parameters marked sequence_parallel
            for p in model.parameters():
                if p.requires_grad and getattr(p, "sequence_parallel", False):
                    torch.distributed.all_reduce(p.grad, group=parallel_state.get_tensor_model_parallel_group())
        out[f"{tag}_loss"] = total.item()
        out[f"{tag}_grad_err"] = {n: (p.grad - _tp_slice(ref_grads[n], p, n, 2, rank)).abs().max().item()
                                  for n, p in model.named_parameters() if p.requires_grad}
        if not sp:  # adapters saved by TP=2 (adapters only) load back into one process exactly
            ckpt2 = os.path.join(tmpdir, "tp2_adapters")
            if rank == 0:
                os.makedirs(ckpt2)
            torch.distributed.barrier()
            dist_checkpointing.save(model_sharded_state_dict(model, "adapters"), ckpt2)
            initialize_parallel(1, 1)
            back = adapted()
            load(back, ckpt2, "adapters")
            out["roundtrip_equal"] = all(torch.equal(p, ref_adapters[n]) for n, p in back.named_parameters()
                                         if p.requires_grad) and len(list(lora_linears(back))) == 9

    # PP=2 through megatron's 1F1B schedule
    initialize_parallel(tp=1, pp=2)
    model = adapted()
    load(model, ckpt, "all")

    def forward_step(data_iterator, m):
        x, y, msk = next(data_iterator)

        def loss_func(output):
            lo = language_model_loss(output, y, msk, cfg.z_loss_weight)
            return lo.total, {"lm loss": lo.total.detach().clone()}
        return m(x, pos, None), loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([mb(i) for i in range(MICRO)]), model=[model],
        num_microbatches=MICRO, seq_length=SEQ, micro_batch_size=MBS, forward_only=False)
    if parallel_state.is_pipeline_last_stage():
        out["pp_loss"] = sum(d["lm loss"].item() for d in losses) / MICRO
    out["pp_grad_err"] = {_global_name(model, n): (p.grad - ref_grads[_global_name(model, n)]).abs().max().item()
                          for n, p in model.named_parameters() if p.requires_grad}
    torch.save(out, os.path.join(tmpdir, f"rank{rank}.pt"))
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora_parallel")
    mp.start_processes(_worker, args=(_port(), str(tmp)), nprocs=2, join=True, start_method="spawn")
    return [torch.load(tmp / f"rank{r}.pt") for r in range(2)]


def _check(errs, scale, what, n_expected):
    assert len(errs) == n_expected, f"{what}: {len(errs)} adapter gradients compared"
    bad = {n: e for n, e in errs.items() if e > 1e-5 * max(scale, 1.0)}
    assert not bad, f"{what}: adapter gradients differ from one process: {bad}"


@pytest.mark.timeout(420)
def test_lora_under_tp2_and_pp2_matches_one_process(layouts):
    for r, res in enumerate(layouts):
        assert res["no_base_grad"]
        for tag in ("tp", "tp_sp"):
            assert res[f"{tag}_loss"] == pytest.approx(res["ref_loss"], rel=1e-5, abs=1e-6), tag
            _check(res[f"{tag}_grad_err"], res["scale"], f"{tag} rank {r}", 18)
        assert res["roundtrip_equal"]
    assert layouts[1]["pp_loss"] == pytest.approx(layouts[1]["ref_loss"], rel=1e-5, abs=1e-6)
    # stage 0 holds layer 0's adapters, stage 1 layer 1's and the output layer's
    _check(layouts[0]["pp_grad_err"], layouts[0]["scale"], "PP stage 0", 8)
    _check(layouts[1]["pp_grad_err"], layouts[1]["scale"], "PP stage 1", 10)


# ---- Transformer Engine's layers (tests/fake_transformer_engine.py: TE's module API on the CPU) ------------
ROOT = Path(__file__).resolve().parents[1]


def _te_case(out_path: str, tmp: str) -> None:
    """In a process with the fake TE installed: a LoRA model on the TE spec (adapters on
    TELayerNormColumnParallelLinear read its norm output) saved, loaded into the local spec with LoRA: the
    same logits; merged == unmerged on TE too; the TE linears' norm output is switched off again by the merge."""
    from megatron.core import dist_checkpointing

    from tessera.model import ModelConfig, build_model
    from tessera.model.checkpoint import model_sharded_state_dict
    from tessera.model.lora import LoRASpec, apply_lora, merge_lora
    from tessera.model.parallel import ensure_single_process

    ensure_single_process()
    cfg = ModelConfig(**TINY)
    spec = LoRASpec(4, 8.0, 0.0, ALL)
    ids, _, _ = _batch()
    pos = torch.arange(SEQ)[None].expand(ids.shape[0], -1)
    te = build_model(cfg, init_seed=1, use_te=True).eval()
    apply_lora(te, spec, seed=5)
    _randomize_b(te)
    qkv = te.decoder.layers[0].self_attention.linear_qkv
    res = {"te_class": type(qkv).__name__, "norm_output": bool(qkv.return_layernorm_output)}
    te_logits = te(ids, pos, None)
    Path(tmp).mkdir()
    dist_checkpointing.save(model_sharded_state_dict(te), tmp)
    local = build_model(cfg, use_te=False).eval()
    apply_lora(local, spec, seed=0)
    local.load_state_dict(dist_checkpointing.load(model_sharded_state_dict(local), tmp)["model"])
    res["te_vs_local"] = (local(ids, pos, None) - te_logits).abs().max().item()
    res["adapted_vs_base"] = (te_logits - build_model(cfg, init_seed=1, use_te=True).eval()(ids, pos, None)).abs().max().item()
    merge_lora(te)
    res["merged_vs_unmerged"] = (te(ids, pos, None) - te_logits).abs().max().item()
    res["norm_output_after_merge"] = bool(te.decoder.layers[0].self_attention.linear_qkv.return_layernorm_output)
    Path(out_path).write_text(json.dumps(res))


@pytest.mark.timeout(300)
def test_lora_on_transformer_engine_layers(tmp_path):
    out = tmp_path / "res.json"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import tests.fake_transformer_engine as fake; fake.install(); "
            "from tests.test_lora import _te_case; _te_case(sys.argv[2], sys.argv[3])")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT), str(out), str(tmp_path / "ckpt")], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["te_class"] == "LoRATELayerNormColumnParallelLinear" and res["norm_output"]
    assert res["adapted_vs_base"] > 1e-2  # the adapters act on the TE layers
    assert res["te_vs_local"] < 1e-5 and res["merged_vs_unmerged"] < 1e-5
    assert not res["norm_output_after_merge"]
