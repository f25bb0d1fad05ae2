"""``tessera bench train``: training-step tokens/s and MFU, against transformers' Chameleon at the same shape.

Both sides run the same work per step on the same random batch: forward over ``micro_batch`` x
``seq_length`` tokens, next-token cross-entropy (ours adds the z-loss), backward, and one AdamW step
(torch's, foreach, on both sides so only the model differs). Dropout is off on both sides because
transformers' Chameleon has no residual dropout. ``bf16`` means autocast to bfloat16 on both sides.

MFU = (FLOPs per token x tokens/s) / the machine's MEASURED matmul peak for the step's dtype, with
FLOPs per token from ``tessera.model.flops.flops_per_token`` (6 x matmul parameters + 12 x L x s x h).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch

from tessera.bench.machine import describe_machine, interleaved_best_times, peak_tflops
from tessera.bench.plan import ModelShape, count_parameters
from tessera.bench.report import format_table
from tessera.model.flops import flops_per_token
from tessera.utils import default_device


def _autocast(dtype: str, device: torch.device):
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def bench_config(preset: str, seq_length: int, dtype: str = "fp32") -> Any:
    """The preset's ModelConfig at ``seq_length`` with dropout off (see module docstring)."""
    from tessera.model.config import get_preset

    cfg = get_preset(preset)
    # fp32: fp32 weights on both sides; bf16: bf16 weights (megatron's linear backward needs the weight in
    # the autocast dtype) on both sides, compute autocast alike
    changes: dict = {"seq_length": max(seq_length, cfg.seq_length), "params_dtype": "float32"}
    if dtype == "bf16":
        changes["params_dtype"] = "bfloat16"
    for name in ("hidden_dropout", "attention_dropout"):
        if hasattr(cfg, name):
            changes[name] = 0.0
    return dataclasses.replace(cfg, **changes)


def tessera_step(cfg: Any, tokens: torch.Tensor, dtype: str, device: torch.device):
    """One training step of OUR model (megatron-core GPTModel with the Chameleon spec + our loss)."""
    from tessera.model.chameleon import build_model
    from tessera.model.loss import language_model_loss
    from tessera.model.parallel import initialize_parallel

    initialize_parallel(tp=1, pp=1, seed=1234)
    model = build_model(cfg).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    position_ids = torch.arange(inputs.shape[1], device=device).unsqueeze(0).expand_as(inputs)
    loss_mask = torch.ones_like(labels, dtype=torch.float32)
    z_w = getattr(cfg, "z_loss_weight", 1e-5)
    last: dict = {}

    def step() -> None:
        with _autocast(dtype, device):
            logits = model(inputs, position_ids, None)
            out = language_model_loss(logits, labels, loss_mask, z_w)
        out.total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        last["loss"] = float(out.total.detach())

    return model, step, last


def hf_step(cfg: Any, tokens: torch.Tensor, dtype: str, device: torch.device):
    """The same step with transformers' ChameleonForConditionalGeneration built at the same shape."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    hf_cfg = ChameleonConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups or cfg.num_attention_heads,
        max_position_embeddings=cfg.seq_length,
        rms_norm_eps=getattr(cfg, "norm_epsilon", 1e-5),
        rope_parameters={"rope_type": "default", "rope_theta": float(getattr(cfg, "rotary_base", 10000.0))},
        swin_norm=bool(getattr(cfg, "swin_norm", False)),
        attention_dropout=0.0,
        tie_word_embeddings=False,
        # the VQ sub-model is unused by a text step; keep it tiny so it costs nothing
        vq_config=dict(embed_dim=8, num_embeddings=16, latent_channels=8, resolution=16, base_channels=32,
                       channel_multiplier=[1], num_res_blocks=1),
        vocabulary_map={"<image>": 8},
    )
    model = ChameleonForConditionalGeneration(hf_cfg).to(device)
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    model.train()
    params = [p for n, p in model.named_parameters() if "vqmodel" not in n]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    last: dict = {}

    def step() -> None:
        with _autocast(dtype, device):
            out = model(input_ids=tokens, labels=tokens)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        last["loss"] = float(out.loss.detach())

    return model, step, last


def benchmark_train(
    preset: str = "tiny",
    micro_batch: int = 2,
    seq_length: int = 256,
    steps: int = 5,
    warmup: int = 2,
    dtype: str = "fp32",
    tp: int = 1,
    pp: int = 1,
    baseline: bool = True,
    device: str | None = None,
    machine: dict | None = None,
    seed: int = 0,
) -> dict:
    """Tokens/s and MFU of one training step for ``preset``; with ``baseline`` also transformers'."""
    if tp != 1 or pp != 1:
        raise ValueError("tessera bench train runs one process: use --tp 1 --pp 1 (multi-GPU: tessera train)")
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be fp32 or bf16, got {dtype!r}")
    dev = default_device(device or None)
    machine = machine or describe_machine(device=dev)
    cfg = bench_config(preset, seq_length, dtype)
    shape = ModelShape.from_config(cfg)
    fpt = flops_per_token(shape, seq_length)
    peak = peak_tflops(machine, torch.bfloat16 if dtype == "bf16" else torch.float32) * 1e12
    g = torch.Generator().manual_seed(seed)
    # token ids below the smallest real vocabulary any preset has; +1 so inputs and labels both span seq_length
    tokens = torch.randint(0, min(cfg.vocab_size, 4096), (micro_batch, seq_length + 1), generator=g).to(dev)
    sides = {"tessera (megatron-core)": (tessera_step, tokens)}
    if baseline:
        sides["transformers Chameleon"] = (hf_step, tokens[:, :seq_length])
    built = {}
    for name, (make, toks) in sides.items():
        torch.manual_seed(seed)
        built[name] = make(cfg, toks, dtype, dev)
    for _ in range(max(0, warmup - 1)):  # interleaved_best_times adds one warm-up call of its own
        for _, step, _ in built.values():
            step()
    # round-robin timing: load from other processes on a shared machine hits both sides alike
    times = interleaved_best_times({k: v[1] for k, v in built.items()}, dev, repeats=steps)
    rows = []
    for name, (model, _, last) in built.items():
        best = min(times[name])
        tok_s = micro_batch * seq_length / best
        rows.append({
            "implementation": name,
            "params": sum(p.numel() for n, p in model.named_parameters() if "vqmodel" not in n),
            "step_s_best": best,
            "step_s_median": sorted(times[name])[len(times[name]) // 2],
            "tokens_per_s": tok_s,
            "mfu": fpt * tok_s / peak,
            "loss": last.get("loss"),
        })
    res = {
        "preset": preset,
        "shape": dataclasses.asdict(shape),
        "parameters": count_parameters(shape),
        "micro_batch": micro_batch,
        "seq_length": seq_length,
        "dtype": dtype,
        "device": str(dev),
        "steps": steps,
        "warmup": warmup,
        "flops_per_token": fpt,
        "peak_tflops": peak / 1e12,
        "rows": rows,
    }
    if baseline and len(rows) == 2:
        res["speedup_vs_transformers"] = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    return res


def format_train(res: dict) -> str:
    title = (f"train step: preset {res['preset']}, batch {res['micro_batch']} x {res['seq_length']}, {res['dtype']}, "
             f"{res['device']}; MFU vs measured peak {res['peak_tflops']:.3g} TFLOP/s; "
             f"FLOPs/token {res['flops_per_token']:.4g}")
    out = format_table(res["rows"], ["implementation", "params", "step_s_best", "step_s_median", "tokens_per_s", "mfu", "loss"],
                       title=title)
    if "speedup_vs_transformers" in res:
        out += f"\nspeed-up vs transformers: {res['speedup_vs_transformers']:.2f}x"
    return out
