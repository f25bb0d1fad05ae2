"""The Chameleon GPTModel against a plain-PyTorch Chameleon written here (transformers' maths):
per-head QK-norm before RoPE, Swin norm placement, GQA head mapping, z-loss; config errors; the
exact parameter counts; checkpoint save -> tessera.model.load round trip."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
import torch.nn.functional as F

from tessera.config import ConfigError
from tessera.model.config import ModelConfig, get_preset

pytestmark = pytest.mark.usefixtures("megatron_1proc")

TINY = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                   vocab_size=256, seq_length=32)


# ---- reference ---------------------------------------------------------------------------------
def _rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def reference_logits(sd, cfg, ids, qk="before_rope", swin=None, kv_map="interleave"):
    """transformers-Chameleon forward from a TP=1 GPTModel state dict. The keyword variants are
    deliberately wrong placements, used to show the comparison would catch them."""
    swin = cfg.swin_norm if swin is None else swin
    b, s = ids.shape
    nh, ng, hd = cfg.num_attention_heads, cfg.kv_groups, cfg.head_dim
    inv = 1.0 / (cfg.rotary_base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    freqs = torch.outer(torch.arange(s, dtype=torch.float32), inv)
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()

    def rope(t):  # [b, heads, s, hd], rotate-half
        x1, x2 = t.chunk(2, -1)
        return t * cos + torch.cat([-x2, x1], -1) * sin

    def norm_heads(t, name):  # t [b, heads, s, hd] or [b, s, heads, hd] -> per-head affine on dim "heads"
        w, bias = sd[name + ".weight"], sd[name + ".bias"]
        heads_dim = 1 if t.shape[1] == w.shape[0] and t.shape[2] == s else 2
        shape = [1, 1, 1, hd]
        shape[heads_dim] = w.shape[0]
        return F.layer_norm(t, (hd,), eps=cfg.norm_epsilon) * w.view(shape) + bias.view(shape)

    h = F.embedding(ids, sd["embedding.word_embeddings.weight"])
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        x = h if swin else _rms(h, sd[p + "input_layernorm.weight"])
        qkv = (x @ sd[p + "self_attention.linear_qkv.weight"].T).view(b, s, ng, (nh // ng + 2) * hd)
        q, k, v = torch.split(qkv, [nh // ng * hd, hd, hd], -1)
        q = q.reshape(b, s, nh, hd)
        if qk == "before_rope":
            q, k = norm_heads(q, p + "self_attention.q_layernorm"), norm_heads(k, p + "self_attention.k_layernorm")
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = rope(q), rope(k)
        if qk == "after_rope":
            q, k = norm_heads(q, p + "self_attention.q_layernorm"), norm_heads(k, p + "self_attention.k_layernorm")
        if kv_map == "interleave":  # query head j uses K/V group j // (nh / ng)
            k, v = k.repeat_interleave(nh // ng, 1), v.repeat_interleave(nh // ng, 1)
        else:
            k, v = k.repeat(1, nh // ng, 1, 1), v.repeat(1, nh // ng, 1, 1)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        o = att.transpose(1, 2).reshape(b, s, nh * hd) @ sd[p + "self_attention.linear_proj.weight"].T
        h = h + (_rms(o, sd[p + "post_self_attn_layernorm.weight"]) if swin else o)
        x = h if swin else _rms(h, sd[p + "pre_mlp_layernorm.weight"])
        gate, up = (x @ sd[p + "mlp.linear_fc1.weight"].T).chunk(2, -1)
        m = (F.silu(gate) * up) @ sd[p + "mlp.linear_fc2.weight"].T
        h = h + (_rms(m, sd[p + "post_mlp_layernorm.weight"]) if swin else m)
    return _rms(h, sd["decoder.final_layernorm.weight"]) @ sd["output_layer.weight"].T


def _model(cfg, seed=0):
    from tessera.model import build_model

    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # norms away from 1 / 0 so their presence and placement matter
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.copy_((1 + 0.5 * torch.randn(p.shape, generator=g)) if name.endswith("weight")
                        else 0.3 * torch.randn(p.shape, generator=g))
    return model


def _ids(cfg, b=2, s=12, seed=5):
    return torch.randint(0, cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(seed))


def _forward(model, ids):
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        return model(ids, pos, None)


def _close(a, b):
    return torch.allclose(a, b, atol=1e-4, rtol=1e-4)


# ---- architecture vs reference ------------------------------------------------------------------
def test_qk_norm_is_per_head_before_rope():
    model = _model(TINY)
    attn = model.decoder.layers[0].self_attention
    assert attn.q_layernorm.weight.shape == (4, 16) and attn.q_layernorm.bias.shape == (4, 16)
    assert attn.k_layernorm.weight.shape == (2, 16) and attn.k_layernorm.bias.shape == (2, 16)
    sd, ids = model.state_dict(), _ids(TINY)
    out = _forward(model, ids)
    assert out.shape == (2, 12, TINY.vocab_size)
    assert _close(out, reference_logits(sd, TINY, ids))
    assert not _close(out, reference_logits(sd, TINY, ids, qk="none"))
    assert not _close(out, reference_logits(sd, TINY, ids, qk="after_rope"))


def test_qk_norm_off_has_no_norm_modules():
    cfg = dataclasses.replace(TINY, qk_norm=False)
    model = _model(cfg)
    assert not any("q_layernorm" in n for n, _ in model.named_parameters())
    ids = _ids(cfg)
    assert _close(_forward(model, ids), reference_logits(model.state_dict(), cfg, ids, qk="none"))


def test_swin_norm_matches_reference():
    cfg = dataclasses.replace(TINY, swin_norm=True)
    model = _model(cfg)
    layer = model.decoder.layers[0]
    assert type(layer.input_layernorm).__name__ == "IdentityOp"
    sd, ids = model.state_dict(), _ids(cfg)
    out = _forward(model, ids)
    assert _close(out, reference_logits(sd, cfg, ids))
    # the same norms applied pre-branch (the 7B order) give different logits
    pre = dict(sd)
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        pre[p + "input_layernorm.weight"] = sd[p + "post_self_attn_layernorm.weight"]
        pre[p + "pre_mlp_layernorm.weight"] = sd[p + "post_mlp_layernorm.weight"]
    assert not _close(out, reference_logits(pre, cfg, ids, swin=False))


def test_gqa_groups_and_head_mapping():
    model = _model(TINY)
    qkv = model.decoder.layers[0].self_attention.linear_qkv.weight
    assert qkv.shape == ((4 + 2 * 2) * 16, 64)  # 4 query heads, 2 K/V groups
    sd, ids = model.state_dict(), _ids(TINY)
    out = _forward(model, ids)
    assert _close(out, reference_logits(sd, TINY, ids, kv_map="interleave"))
    assert not _close(out, reference_logits(sd, TINY, ids, kv_map="tile"))
    mha = dataclasses.replace(TINY, num_query_groups=None)
    m2 = _model(mha)
    assert m2.decoder.layers[0].self_attention.linear_qkv.weight.shape == (3 * 64, 64)
    assert _close(_forward(m2, ids), reference_logits(m2.state_dict(), mha, ids))


def test_no_biases_untied_embeddings_and_dropout_wiring():
    cfg = dataclasses.replace(TINY, hidden_dropout=0.5, attention_dropout=0.25)
    model = _model(cfg)
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if n.endswith(".bias") and "layernorm" not in n]
    assert model.output_layer.weight.data_ptr() != model.embedding.word_embeddings.weight.data_ptr()
    layer = model.decoder.layers[0]
    assert layer.hidden_dropout == 0.5
    assert layer.self_attention.core_attention.attention_dropout.p == 0.25
    assert model.embedding.embedding_dropout.p == 0.0  # Chameleon: branch dropout only
    ids = _ids(cfg)
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    model.train()
    a, b = model(ids, pos, None), model(ids, pos, None)
    assert not torch.allclose(a, b)  # dropout active in training
    model.eval()
    assert torch.equal(_forward(model, ids), _forward(model, ids))


# ---- loss -----------------------------------------------------------------------------------------
def test_language_model_loss_matches_reference():
    from tessera.model import language_model_loss

    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 7, 256, generator=g)).requires_grad_()
    labels = torch.randint(0, 256, (2, 7), generator=g)
    mask = (torch.rand(2, 7, generator=g) > 0.3).float()
    modality = torch.randint(0, 3, (2, 7), generator=g)
    out = language_model_loss(logits, labels, mask, 1e-2, label_modality=modality, image_loss_weight=2.0)
    ce_tok = F.cross_entropy(logits.detach().reshape(-1, 256), labels.reshape(-1), reduction="none").view(2, 7)
    lse = torch.logsumexp(logits.detach(), -1)
    n = mask.sum()
    assert out.ce.item() == pytest.approx(((ce_tok * mask).sum() / n).item(), rel=1e-6)
    assert out.z.item() == pytest.approx((1e-2 * (lse**2 * mask).sum() / n).item(), rel=1e-6)
    w = torch.where(modality == 1, 2.0, 1.0)
    assert out.total.item() == pytest.approx(((ce_tok * mask * w).sum() / n + out.z).item(), rel=1e-6)
    for code, name in ((0, "text"), (1, "image"), (2, "special")):
        m = mask * (modality == code)
        assert out.per_modality[name].item() == pytest.approx(((ce_tok * m).sum() / m.sum()).item(), rel=1e-6)
        assert out.per_modality_tokens[name].item() == m.sum().item()
    # z-loss gradient: d/dlogits of weight*mean(lse^2) is weight*2*lse*softmax/n on masked tokens
    ref = logits.detach().clone().requires_grad_()
    ((F.cross_entropy(ref.reshape(-1, 256), labels.reshape(-1), reduction="none").view(2, 7) * mask * w).sum() / n
     + 1e-2 * (torch.logsumexp(ref, -1) ** 2 * mask).sum() / n).backward()
    out.total.backward()
    assert torch.allclose(logits.grad, ref.grad, atol=1e-6)


def test_z_loss_off_and_separate():
    from tessera.model import language_model_loss

    logits = torch.randn(1, 5, 128) + 4.0  # large lse, so z matters
    labels = torch.randint(0, 128, (1, 5))
    mask = torch.ones(1, 5)
    on = language_model_loss(logits, labels, mask, 1e-3)
    off = language_model_loss(logits, labels, mask, 0.0)
    assert off.z.item() == 0.0 and on.z.item() > 0.0
    assert on.ce.item() == pytest.approx(off.ce.item())
    assert on.total.item() == pytest.approx(on.ce.item() + on.z.item())
    with pytest.raises(ValueError, match="shape mismatch"):
        language_model_loss(logits, labels[:, :3], mask, 1e-3)


# ---- configs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg_kwargs, layout, message",
    [
        (dict(num_attention_heads=6, num_query_groups=None, hidden_size=96), dict(tp=4), "num_attention_heads 6 is not divisible by tensor parallel size 4"),
        (dict(num_query_groups=1), dict(tp=2), "num_query_groups 1 is not divisible by tensor parallel size 2"),
        (dict(num_layers=3), dict(pp=2), "num_layers 3 is not divisible by pipeline parallel size 2"),
        (dict(num_layers=4), dict(pp=2, vp=3), "virtual stages 3"),
        (dict(vocab_size=384), dict(tp=2), "vocab_size 384 is not divisible by 128 * tensor parallel size = 256"),
    ],
)
def test_bad_layouts_fail_fast(cfg_kwargs, layout, message):
    cfg = dataclasses.replace(TINY, **cfg_kwargs)
    with pytest.raises(ConfigError, match=re.escape(message)):
        cfg.validate(**layout)


def test_bad_configs_and_presets():
    with pytest.raises(ConfigError, match="unknown model preset 'gpt5'; known presets: tiny, demo, chameleon-7b"):
        get_preset("gpt5")
    with pytest.raises(ConfigError, match="num_query_groups 3 must divide"):
        dataclasses.replace(TINY, num_query_groups=3)
    with pytest.raises(ConfigError, match="params_dtype"):
        dataclasses.replace(TINY, params_dtype="float16")
    for name in ("tiny", "demo"):
        get_preset(name).validate(tp=2, pp=2)
    get_preset("chameleon-34b").validate(tp=8, pp=4)
    c7 = get_preset("chameleon-7b")
    assert (c7.qk_norm, c7.swin_norm, c7.hidden_dropout, c7.z_loss_weight) == (True, False, 0.1, 1e-5)
    c34 = get_preset("chameleon-34b")
    assert (c34.swin_norm, c34.num_query_groups, c34.hidden_dropout) == (True, 8, 0.0)


# ---- parameter counts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("preset, expected", [("chameleon-7b", "7,013,666,816"), ("chameleon-34b", "34,294,308,864")])
def test_model_info_prints_exact_count(preset, expected, capsys):
    from tessera.cli import main

    assert main(["model", "info", preset]) == 0
    out = capsys.readouterr().out
    assert f"parameters        {expected}" in out


@pytest.mark.parametrize("variant", [{}, {"swin_norm": True}, {"qk_norm": False}, {"num_query_groups": None}])
def test_meta_count_equals_materialised_model(variant):
    from tessera.model import build_model, count_parameters
    from tessera.model.params import analytic_parameter_count

    cfg = dataclasses.replace(TINY, **variant)
    real = sum(p.numel() for p in build_model(cfg).parameters())
    assert count_parameters(cfg) == real == analytic_parameter_count(cfg)


# ---- checkpoints -------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    import tessera.model as tm
    from tessera.model.checkpoint import step_dir_name, write_latest
    from tessera.tokenizers.vocab import Vocabulary

    model = _model(TINY)
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / step_dir_name(100)
    vocab = Vocabulary(num_text_tokens=100, num_image_codes=64, image_tokens_per_image=16)
    # an optimizer-like extra key in the same dist save must not disturb model loading
    from megatron.core.dist_checkpointing import ShardedObject

    extra = {"optimizer": {"step": ShardedObject("optimizer.step", 7, (1,), (0,), replica_id=0)}}
    tm.save_model_checkpoint(model, TINY, ckpt, vocab=vocab, extra_config={"train": {"lr": 1e-3}}, step=100,
                             extra_state=extra)
    write_latest(run / "checkpoints", ckpt.name)
    assert not list((run / "checkpoints").glob("*.tmp-*"))
    meta = json.loads((ckpt / "tessera.json").read_text())
    assert meta["format"] == 1 and meta["step"] == 100
    for where in (ckpt, run, run / "checkpoints"):
        assert tm.resolve_checkpoint(where) == ckpt
    loaded = tm.load(run)
    assert loaded.config == TINY and loaded.step == 100
    assert loaded.vocab == vocab
    ids = _ids(TINY)
    assert torch.equal(loaded.logits(ids), _forward(model, ids))
    assert loaded.module.decoder.layers[1].self_attention.q_layernorm.weight.shape == (4, 16)
    bf16 = tm.load(ckpt, dtype=torch.bfloat16)
    assert bf16.logits(ids).dtype == torch.bfloat16


def test_resolve_checkpoint_errors(tmp_path):
    from tessera.model import CheckpointError, resolve_checkpoint

    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_checkpoint(tmp_path / "missing")
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "checkpoints" / "step_0000001.tmp-123").mkdir()  # a crashed save
    (tmp_path / "checkpoints" / "latest").write_text("step_0000001\n")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_checkpoint(tmp_path)


def test_bfloat16_model_is_bf16_throughout_and_runs():
    from tessera.model import build_model, language_model_loss

    cfg = dataclasses.replace(TINY, params_dtype="bfloat16")
    model = build_model(cfg)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = _ids(cfg)
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    logits = model(ids, pos, None)
    assert logits.dtype == torch.bfloat16
    loss = language_model_loss(logits, ids, torch.ones_like(ids, dtype=torch.float32), cfg.z_loss_weight)
    loss.total.backward()
    assert loss.ce.dtype == torch.float32 and torch.isfinite(loss.total)
    assert model.decoder.layers[0].self_attention.q_layernorm.weight.grad is not None


def test_sdpa_core_attention_equals_megatron_dot_product_attention(monkeypatch):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from tessera.model.attention import SDPAttention

    model = _model(TINY)
    assert isinstance(model.decoder.layers[0].self_attention.core_attention, SDPAttention)
    ids = _ids(TINY, s=20)
    fused = _forward(model, ids)
    monkeypatch.setattr(SDPAttention, "forward", DotProductAttention.forward)
    assert torch.allclose(fused, _forward(model, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype, distributed", [("float32", False), ("bfloat16", True)])
def test_megatron_ddp_and_optimizer_train_on_cpu(dtype, distributed):
    """The CPU compat covers megatron's DDP, optimizers (their CUDA type-name checks) and schedules."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module

    from tessera.model import build_model, language_model_loss

    cfg = dataclasses.replace(TINY, params_dtype=dtype)
    torch.manual_seed(0)
    model = build_model(cfg)
    if dtype == "bfloat16":
        model = Float16Module(model.config, model)
    ddp = DistributedDataParallel(
        model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distributed), model
    )
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=3e-3, bf16=dtype == "bfloat16", clip_grad=1.0,
                                                 use_distributed_optimizer=distributed), [ddp])
    ddp.config.finalize_model_grads_func = finalize_model_grads
    ids = _ids(cfg, b=2, s=17)
    pos = torch.arange(16).unsqueeze(0).expand(2, -1)

    def forward_step(it, model):
        x = next(it)

        def loss_func(out):
            loss = language_model_loss(out, x[:, 1:], torch.ones(2, 16), cfg.z_loss_weight)
            return loss.total, {"lm": loss.total.detach().clone()}

        return model(x[:, :-1], pos, None), loss_func

    losses = []
    for _ in range(4):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        out = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([ids]), model=[ddp],
                                          num_microbatches=1, seq_length=16, micro_batch_size=2)
        ok, grad_norm, _ = opt.step()
        assert ok and grad_norm > 0
        losses.append(out[0]["lm"].item())
    assert losses[-1] < losses[0] - 0.1, losses
