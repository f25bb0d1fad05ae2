"""``tessera bench finetune``: what LoRA saves against full fine-tuning at the same shape, measured.

Each case (full fine-tuning, LoRA) runs in a fresh process, built the way the trainer builds it (megatron's
DDP and optimizer over what ``finetune:`` leaves trainable) and stepped ``steps`` times on mock batches:

* trainable parameters, and the bytes of the tensors that exist because of them, read from the tensors:
  model weights, DDP gradient buffers, optimizer state (Adam's moments and, under bf16, the fp32 main
  parameters megatron's optimizer keeps);
* peak step memory: on CUDA ``torch.cuda.max_memory_allocated`` over the last step; on the CPU the
  process's peak resident set (``ru_maxrss``) minus its resident set before the model was built, which
  also counts the allocator's caching and freed-but-kept pages (an upper bound of what the tensors
  needed, comparable between the two cases, not a GPU figure).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import Any

CASES = ("full", "lora")


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(case: str, preset: str, seq: int, micro_batch: int, rank: int, targets: tuple[str, ...],
            precision: str = "bf16", steps: int = 2, shape: dict | None = None) -> dict[str, Any]:
    """One case in this process (call in a fresh one for a clean peak)."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from tessera.model.config import get_preset
    from tessera.model.lora import LoRASpec
    from tessera.model.parallel import initialize_parallel
    from tessera.pretrain.config import TrainConfig
    from tessera.pretrain.device import training_device
    from tessera.pretrain.finetune import Finetune
    from tessera.pretrain.mock import train_mock_batch
    from tessera.pretrain.optimizer import apply_update, get_optimizer, grad_sumsq, sub_optimizers
    from tessera.pretrain.scale import ddp_config, transformer_overrides, wire_schedule
    from tessera.pretrain.step import BatchMover, ForwardStep
    from tessera.pretrain.trainer import _build_model_chunks, get_scheduler

    if case not in CASES:
        raise ValueError(f"case must be one of {CASES}, got {case!r}")
    bf16 = precision == "bf16"
    model = dataclasses.replace(get_preset(preset), **(shape or {}),
                                params_dtype="bfloat16" if bf16 else "float32", seq_length=max(seq, 16))
    cfg = TrainConfig(model=model)
    cfg.parallel.micro_batch_size = cfg.parallel.global_batch_size = micro_batch
    cfg.data.seq_length, cfg.optim.warmup = seq, 0
    initialize_parallel(1, 1, seed=0)
    device = training_device()
    ft = Finetune(lora=LoRASpec(rank, 2.0 * rank, 0.0, targets)) if case == "lora" else Finetune()
    overrides = transformer_overrides(cfg, deterministic=False, cuda=device.type == "cuda")
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else _rss()
    chunks, ddps = _build_model_chunks(cfg, bf16, model, ddp_config(cfg, 1),
                                       prepare=lambda cs: ft.prepare(cs, None, 0, device), **overrides)
    opt = get_optimizer(cfg.optim, ddps, bf16)
    wire_schedule(chunks, ddps, opt, cfg)
    sched = get_scheduler(cfg, opt)
    mover = BatchMover(device)
    fb = get_forward_backward_func()
    for step in range(1, steps + 1):
        if device.type == "cuda" and step == steps:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        for d in ddps:
            d.zero_grad_buffer()
        opt.zero_grad()
        fb(forward_step_func=ForwardStep(z_loss_weight=model.z_loss_weight, per_token_loss=True),
           data_iterator=iter([mover(train_mock_batch(cfg, step, 0))]), model=ddps, num_microbatches=1,
           seq_length=seq, micro_batch_size=micro_batch, forward_only=False)
        opt.prepare_grads()
        apply_update(opt, float(grad_sumsq(opt, device)) ** 0.5)
        sched.step(increment=micro_batch)
    params = [p for c in chunks for p in c.parameters()]
    trainable = [p for p in params if p.requires_grad]
    model_ids = {id(p) for p in params}
    state = [t for o in sub_optimizers(opt) for st in o.optimizer.state.values() for t in st.values()
             if torch.is_tensor(t)]
    main = [p for o in sub_optimizers(opt) for g in o.optimizer.param_groups for p in g["params"]
            if id(p) not in model_ids]  # fp32 main copies (bf16 training)
    if device.type == "cuda":
        peak, basis = torch.cuda.max_memory_allocated(device) - before, "torch.cuda.max_memory_allocated (last step)"
    else:
        peak, basis = _peak_rss() - before, "peak resident set (ru_maxrss) minus the resident set before building"
    return {
        "case": case, "preset": preset, "shape": dataclasses.asdict(model), "seq": seq, "micro_batch": micro_batch,
        "precision": precision, "lora_rank": rank if case == "lora" else 0,
        "lora_targets": list(targets) if case == "lora" else [], "device": str(device),
        "parameters": sum(p.numel() for p in params), "trainable_parameters": sum(p.numel() for p in trainable),
        "weight_bytes": _bytes(params),
        "grad_buffer_bytes": sum(_bytes([b.grad_data]) for d in ddps for b in d.buffers),
        "optimizer_state_bytes": _bytes(state) + _bytes(main),
        "peak_step_bytes": int(peak), "peak_basis": basis,
    }


def run(preset: str = "demo", seq: int = 256, micro_batch: int = 1, rank: int = 16,
        targets: tuple[str, ...] = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"), precision: str = "bf16",
        steps: int = 2, shape: dict | None = None) -> dict[str, Any]:
    """Both cases, each in a fresh Python process; returns {"rows": [...], "ratios": {...}}."""
    rows = []
    for case in CASES:
        args = {"case": case, "preset": preset, "seq": seq, "micro_batch": micro_batch, "rank": rank,
                "targets": list(targets), "precision": precision, "steps": steps, "shape": shape or {}}
        proc = subprocess.run([sys.executable, "-m", "tessera.bench.finetune", json.dumps(args)], capture_output=True,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        if proc.returncode != 0:
            raise RuntimeError(f"tessera bench finetune ({case}) failed: {proc.stderr[-2000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    full, lora = rows
    ratios = {k: lora[k] / full[k] for k in ("trainable_parameters", "grad_buffer_bytes", "optimizer_state_bytes",
                                             "peak_step_bytes") if full[k]}
    return {"rows": rows, "ratios": ratios}


def format_table(res: dict) -> str:
    rows = res["rows"]
    keys = [("parameters", "parameters", False), ("trainable_parameters", "trainable parameters", False),
            ("weight_bytes", "weights", True), ("grad_buffer_bytes", "gradient buffers", True),
            ("optimizer_state_bytes", "optimizer state", True), ("peak_step_bytes", "peak step memory", True)]
    head = f"{'':<22}" + "".join(f"{r['case'] + (' r=' + str(r['lora_rank']) if r['lora_rank'] else ''):>16}" for r in rows)
    lines = [head]
    for k, name, is_bytes in keys:
        cells = "".join(f"{(r[k] / 2**20 if is_bytes else r[k]):>13,.1f} MiB" if is_bytes else f"{r[k]:>16,}"
                        for r in rows)
        lines.append(f"{name:<22}{cells}")
    lines.append(f"peak: {rows[0]['peak_basis']}")
    return "\n".join(lines)


if __name__ == "__main__":
    a = json.loads(sys.argv[1])
    print(json.dumps(measure(a["case"], a["preset"], a["seq"], a["micro_batch"], a["rank"], tuple(a["targets"]),
                             a["precision"], a["steps"], a["shape"])))
