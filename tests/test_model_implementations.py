"""Which implementation runs: the Transformer Engine decision and its reason, the CPU attention rule
(cpu_attention.c or SDPA), and the banner build_model prints once per process on rank 0."""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest
import torch

from tessera.model.config import get_preset


@pytest.fixture
def fresh_banner(monkeypatch):
    from tessera.model import implementations

    monkeypatch.setattr(implementations, "_reported", False)


def test_te_status_says_why_not(monkeypatch):
    from tessera.model.spec import TEStatus, te_status

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert te_status() == TEStatus(False, "no CUDA")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # import fails as when not installed
    assert te_status() == TEStatus(False, "Transformer Engine not installed")
    # imports, but megatron-core (imported without it here) did not load it
    monkeypatch.setitem(sys.modules, "transformer_engine", types.ModuleType("transformer_engine"))
    assert te_status() == TEStatus(False, "megatron-core could not load Transformer Engine")


@pytest.mark.parametrize("flags, fp32, bf16", [
    (frozenset({"avx512f", "avx512_bf16"}), True, True),  # AMD EPYC (Zen 4): the C kernel in both
    (frozenset({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}), True, False),  # Xeon with AMX: SDPA in bf16
    (frozenset(), True, True),  # no /proc/cpuinfo flags (other OSes)
])
def test_cpu_attention_rule(monkeypatch, flags, fp32, bf16):
    from tessera.model.attention import prefer_cpu_kernel

    monkeypatch.delenv("TESSERA_CPU_ATTENTION", raising=False)
    assert prefer_cpu_kernel(torch.float32, flags) is fp32
    assert prefer_cpu_kernel(torch.bfloat16, flags) is bf16
    monkeypatch.setenv("TESSERA_CPU_ATTENTION", "1")  # the kernel wherever it covers the call
    assert prefer_cpu_kernel(torch.bfloat16, flags) and prefer_cpu_kernel(torch.float32, flags)
    monkeypatch.setenv("TESSERA_CPU_ATTENTION", "0")  # never
    assert not prefer_cpu_kernel(torch.bfloat16, flags) and not prefer_cpu_kernel(torch.float32, flags)


def test_cpu_flags_reads_this_machine():
    from tessera.model.attention import cpu_flags

    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    assert ("avx2" in text) == ("avx2" in cpu_flags())
    assert ("amx_bf16" in text) == ("amx_bf16" in cpu_flags())


@pytest.mark.usefixtures("megatron_1proc", "fresh_banner")
@pytest.mark.parametrize("amx", [False, True])
def test_model_attention_follows_the_rule(monkeypatch, amx):
    from tessera.kernels import cpu_attention
    from tessera.model import attention, build_model

    if cpu_attention.load() is None:
        pytest.skip(f"cpu_attention.c unavailable: {cpu_attention.unavailable_reason()}")
    monkeypatch.delenv("TESSERA_CPU_ATTENTION", raising=False)
    monkeypatch.setattr(attention, "cpu_flags", lambda: frozenset({"amx_bf16"} if amx else set()))
    calls = []
    real = cpu_attention.attention
    monkeypatch.setattr(cpu_attention, "attention", lambda *a, **k: calls.append(a[0].dtype) or real(*a, **k))
    cfg = dataclasses.replace(get_preset("tiny"), hidden_dropout=0.0, attention_dropout=0.0)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).unsqueeze(0).expand(2, -1)
    for dtype in ("float32", "bfloat16"):
        model = build_model(dataclasses.replace(cfg, params_dtype=dtype), init_seed=1)
        model(ids, pos, None)
    bf16_calls = calls.count(torch.bfloat16)
    assert calls.count(torch.float32) == cfg.num_layers
    assert bf16_calls == (0 if amx else cfg.num_layers)


@pytest.mark.usefixtures("megatron_1proc", "fresh_banner")
def test_banner_once_per_process_on_rank_0(capsys, monkeypatch):
    from tessera.model import build_model, implementations

    build_model(get_preset("tiny"))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("[model]")]
    assert len(lines) == 4, err
    assert "local spec (Transformer Engine not used: no CUDA)" in lines[0]
    assert "F.linear (one tensor-parallel rank" in lines[1]
    assert "torch.nn.RMSNorm" in lines[2] and "PerHeadLayerNorm" in lines[2]
    assert "megatron's DotProductAttention for explicit masks" in lines[3]
    assert ("cpu_attention.c" in lines[3]) or ("SDPA" in lines[3])
    build_model(dataclasses.replace(get_preset("tiny"), swin_norm=True))
    assert "[model]" not in capsys.readouterr().err  # once per process
    # other ranks stay silent
    model = build_model(get_preset("tiny"))
    monkeypatch.setattr(implementations, "_reported", False)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 1)
    assert not implementations.report_once(model, "x")
    assert "[model]" not in capsys.readouterr().err
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 0)
    assert implementations.report_once(model, "x") and "[model]" in capsys.readouterr().err


@pytest.mark.usefixtures("megatron_1proc", "fresh_banner")
def test_banner_names_the_fallbacks(monkeypatch):
    from tessera.model import build_model
    from tessera.model.implementations import describe

    model = build_model(get_preset("tiny"))
    monkeypatch.setenv("TESSERA_CPU_ATTENTION", "0")
    assert describe(model, "x").core_attention.startswith("SDPA (TESSERA_CPU_ATTENTION=0)")
    monkeypatch.delenv("TESSERA_CPU_ATTENTION")
    monkeypatch.setattr("tessera.model.attention.cpu_flags", lambda: frozenset({"amx_bf16"}))
    monkeypatch.setattr("tessera.kernels.cpu_attention.unavailable_reason", lambda: None)
    monkeypatch.setattr("tessera.kernels._cbuild.compiler", lambda: "cc")
    attention = describe(model, "x").core_attention
    assert attention.startswith("cpu_attention.c in fp32, SDPA in bf16 (AMX-BF16 CPU"), attention
    monkeypatch.setattr("tessera.kernels._cbuild.compiler", lambda: None)
    assert describe(model, "x").core_attention.startswith("SDPA (cpu_attention.c unavailable: no C compiler)")
    # TP = 1 but a bias (or sequence parallelism...) needs megatron's own linear
    model.decoder.layers[0].self_attention.linear_qkv.bias = torch.nn.Parameter(torch.zeros(1))
    assert describe(model, "x").linear.startswith("megatron SingleRankColumnParallelLinear")
