"""``tessera bench {train,decode,kernels,vq,data,plan,all} [--json out.json]`` and ``tessera bench gpu-check``.

Each benchmark prints a table and (with ``--json``) writes one JSON file holding the command, the
machine (CPU model, cores, torch, GPU, measured matmul peaks and copy bandwidth) and the results.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from tessera.bench.report import emit, format_table, write_json

BENCHMARKS = ("train", "decode", "kernels", "vq", "data", "plan")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", type=Path, default=None, help="write the results (with the machine description) here")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--measure-seconds", type=float, default=0.5,
                   help="time spent on each machine peak (matmul fp32, bf16, copy); best of the repeats")


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)

    p = sub.add_parser("train", help="training tokens/s and MFU; on CPU against transformers' Chameleon step")
    _common(p)
    p.add_argument("--preset", default="tiny", help="model preset (tessera model info PRESET)")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--tp", type=int, default=1, help="only 1 in one process")
    p.add_argument("--pp", type=int, default=1, help="only 1 in one process")
    p.add_argument("--no-baseline", action="store_true", help="skip transformers' ChameleonForConditionalGeneration")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("decode", help="KV-cached decoding tokens/s against transformers (tessera.generate.bench)")
    _common(p)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: the engine's choice")
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("kernels", help="sampling, cross-entropy and CPU attention kernels vs references (tessera.kernels.bench)")
    _common(p)
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) rows (slow to compile)")
    p.add_argument("--attn-shapes", default="2x4x512x64,1x8x2048x128",
                   help="attention rows: comma-separated BATCHxHEADSxSEQxHEAD_DIM")
    p.set_defaults(func=cmd_kernels)

    p = sub.add_parser("vq", help="VQ encode/decode images/s against transformers' ChameleonVQVAE encoder")
    _common(p)
    p.add_argument("--preset", default="demo", help="VQ preset (tessera.tokenizers.image.VQ_PRESETS)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--no-baseline", action="store_true")
    p.set_defaults(func=cmd_vq)

    p = sub.add_parser("data", help="tokens/s/core of the packed, woven batch pipeline (tessera.data)")
    _common(p)
    p.add_argument("--data", type=Path, default=None, help="a pretokenized directory (default: build a small one)")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("plan", help="memory per GPU, tokens/s and GPU-days for a preset under a TP/PP/DP layout")
    _common(p)
    p.add_argument("--preset", default="chameleon-7b")
    p.add_argument("--config", type=Path, default=None,
                   help="take the model and layout from a training config (configs/chameleon-7b.yaml)")
    p.add_argument("--gpus", type=int, default=None)
    p.add_argument("--tp", type=int, default=None)
    p.add_argument("--pp", type=int, default=None)
    p.add_argument("--vp", type=int, default=None)
    p.add_argument("--dp", type=int, default=None, help="checked against gpus / (tp*pp)")
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--global-batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--no-sequence-parallel", action="store_true")
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--gpu", default="h100")
    p.add_argument("--lora-rank", type=int, default=None,
                   help="add the LoRA fine-tuning case: memory per GPU with adapters of this rank (48 / 80 GB cards)")
    p.add_argument("--lora-targets", default=",".join(("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")),
                   help="comma-separated LoRA targets (linear_qkv, linear_proj, linear_fc1, linear_fc2, output_layer)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("finetune", help="trainable parameters, optimizer-state bytes and peak step memory: LoRA vs "
                       "full fine-tuning at the same shape, measured (tessera.bench.finetune)")
    _common(p)
    p.add_argument("--preset", default="demo")
    p.add_argument("--shape", default="", help="model fields over the preset: KEY=VALUE,... (hidden_size=1024,...)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-targets", default="linear_qkv,linear_proj,linear_fc1,linear_fc2")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--steps", type=int, default=2)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("gpu-check", help="validate a GPU: versions, compiled kernels, TE layers, checkpoints, "
                       "training, generation (docs/training.md, Validating a GPU)")
    from tessera.bench.gpu_check import cmd_gpu_check
    from tessera.bench.gpu_check import register as register_gpu_check

    register_gpu_check(p)
    p.set_defaults(func=cmd_gpu_check)

    p = sub.add_parser("all", help="every benchmark at a small size, one JSON")
    _common(p)
    p.add_argument("--preset", default="tiny")
    p.set_defaults(func=cmd_all)


def _payload(name: str, results: object, machine: dict) -> dict:
    return {
        "benchmark": name,
        "command": "tessera " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else "",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine,
        "results": results,
    }


def _machine(args: argparse.Namespace, measure: bool = True) -> dict:
    from tessera.bench.machine import describe_machine

    return describe_machine(measure=measure, device=args.device, seconds=args.measure_seconds)


def _finish(args: argparse.Namespace, name: str, results: object, machine: dict) -> int:
    if args.json:
        path = write_json(args.json, _payload(name, results, machine))
        emit(f"wrote {path}")
    return 0


def _ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in s.split(",") if x)
    except ValueError:
        raise SystemExit(f"expected comma-separated integers, got {s!r}") from None


# ---- the benchmarks -----------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from tessera.bench.train import benchmark_train, format_train

    machine = _machine(args)
    res = benchmark_train(
        preset=args.preset, micro_batch=args.micro_batch, seq_length=args.seq, steps=args.steps, warmup=args.warmup,
        dtype=args.dtype, tp=args.tp, pp=args.pp, baseline=not args.no_baseline, device=args.device, machine=machine,
    )
    emit(format_train(res))
    return _finish(args, "train", res, machine)


def cmd_decode(args: argparse.Namespace) -> int:
    from tessera.bench.suites import run_decode

    machine = _machine(args)
    res = run_decode(preset=args.preset, batches=_ints(args.batches), prompt_len=args.prompt_len,
                     new_tokens=args.new_tokens, dtype=args.dtype, device=args.device, machine=machine)
    emit(format_table(res["rows"], ["impl", "dtype", "batch", "tokens_per_s", "ttft_ms", "per_token_ms"],
                      title="decode (tokens/s; higher is better)"))
    for k in ("speedup", "floor", "step_backend", "greedy_match_fp32"):
        if k in res:
            emit(f"{k}: {res[k]}")
    return _finish(args, "decode", res, machine)


def _attn_shapes(text: str) -> tuple[tuple[int, int, int, int], ...]:
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise SystemExit(f"--attn-shapes: {item!r} is not BATCHxHEADSxSEQxHEAD_DIM (e.g. 2x4x512x64)")
        shapes.append(tuple(int(p) for p in parts))
    return tuple(shapes)


def cmd_kernels(args: argparse.Namespace) -> int:
    from tessera.bench.suites import run_kernels

    machine = _machine(args)
    res = run_kernels(batches=_ints(args.batches), vocab=args.vocab, device=args.device, compile=not args.no_compile,
                      attn_shapes=_attn_shapes(args.attn_shapes))
    emit(format_table(res["rows"], title=res.get("note", "kernels")))
    return _finish(args, "kernels", res, machine)


def cmd_vq(args: argparse.Namespace) -> int:
    from tessera.bench.vq import benchmark_vq

    machine = _machine(args)
    res = benchmark_vq(preset=args.preset, batch=args.batch, steps=args.steps, dtype=args.dtype,
                       baseline=not args.no_baseline, device=args.device)
    emit(format_table(res["rows"], title="VQ tokenizer (images/s; higher is better)"))
    return _finish(args, "vq", res, machine)


def cmd_data(args: argparse.Namespace) -> int:
    from tessera.bench.suites import run_data

    machine = _machine(args)
    res = run_data(data=args.data, seq_length=args.seq, batch=args.batch, steps=args.steps)
    emit(format_table(res["rows"], title="batch pipeline"))
    return _finish(args, "data", res, machine)


def cmd_plan(args: argparse.Namespace) -> int:
    from tessera.bench.plan import Layout, ModelShape, PlanError, format_plan, plan, shape_for_preset

    try:
        name = args.preset
        defaults: dict = {}
        if args.config is not None:
            from tessera.bench.configs import layout_from_train_config

            name, cfg_model, defaults = layout_from_train_config(args.config)
            shape = ModelShape.from_config(cfg_model)
        else:
            shape = shape_for_preset(args.preset)
        given = {k: getattr(args, a) for k, a in (("tp", "tp"), ("pp", "pp"), ("vp", "vp"), ("micro_batch", "micro_batch"),
                                                 ("global_batch", "global_batch"), ("seq_length", "seq"))
                 if getattr(args, a) is not None}
        merged = {"tp": 1, "pp": 1, "vp": 1, "micro_batch": 1, **defaults, **given}
        gpus = args.gpus
        if gpus is None:
            gpus = merged["tp"] * merged["pp"] * (args.dp or merged.pop("dp", 1))
        merged.pop("dp", None)
        layout = Layout(gpus=gpus, sequence_parallel=not args.no_sequence_parallel, **merged)
        if args.dp is not None and args.dp != layout.dp:
            raise PlanError(f"--dp {args.dp} disagrees with gpus/(tp*pp) = {layout.dp}")
        res = plan(shape, layout, mfu=args.mfu, gpu=args.gpu, name=name)
        if args.lora_rank is not None:
            from tessera.bench.plan import lora_memory_per_gpu

            if args.lora_rank < 1:
                raise PlanError(f"--lora-rank must be >= 1, got {args.lora_rank}")
            res["lora"] = lora_memory_per_gpu(shape, layout, args.lora_rank,
                                              tuple(t for t in args.lora_targets.split(",") if t))
    except PlanError as exc:
        raise SystemExit(f"tessera bench plan: {exc}") from None
    emit(format_plan(res))
    if "lora" in res:
        from tessera.bench.plan import format_lora

        emit(format_lora(res["lora"]))
    return _finish(args, "plan", res, _machine(args, measure=False))


def cmd_finetune(args: argparse.Namespace) -> int:
    from tessera.bench.finetune import format_table, run

    shape = {}
    for item in filter(None, args.shape.split(",")):
        key, _, value = item.partition("=")
        shape[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    res = run(args.preset, seq=args.seq, micro_batch=args.micro_batch, rank=args.lora_rank,
              targets=tuple(t for t in args.lora_targets.split(",") if t), precision=args.dtype, steps=args.steps,
              shape=shape)
    emit(format_table(res))
    return _finish(args, "finetune", res, _machine(args, measure=False))


def cmd_all(args: argparse.Namespace) -> int:
    """Every benchmark at a small size; one failing benchmark is recorded, not fatal."""
    from tessera.bench.plan import Layout, format_plan, plan, shape_for_preset
    from tessera.bench.suites import run_data, run_decode, run_kernels
    from tessera.bench.train import benchmark_train, format_train
    from tessera.bench.vq import benchmark_vq

    machine = _machine(args)
    results: dict = {}
    jobs = {
        "train": lambda: benchmark_train(preset=args.preset, micro_batch=2, seq_length=128, steps=3, warmup=1,
                                         device=args.device, machine=machine),
        "decode": lambda: run_decode(preset=args.preset, batches=(1, 8), prompt_len=16, new_tokens=16,
                                     device=args.device, machine=machine),
        "kernels": lambda: run_kernels(batches=(1, 8), vocab=8192, device=args.device),
        "vq": lambda: benchmark_vq(preset="tiny", batch=4, steps=2, device=args.device),
        "data": lambda: run_data(data=None, seq_length=256, batch=4, steps=20),
        "plan": lambda: plan(shape_for_preset("chameleon-7b"), Layout(gpus=8, tp=1, pp=1, micro_batch=1), name="chameleon-7b"),
    }
    for name, job in jobs.items():
        emit(f"== {name}")
        try:
            res = job()
        except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the others
            res = {"error": f"{type(exc).__name__}: {exc}"}
            emit(f"{name} failed: {res['error']}")
        else:
            if name == "train":
                emit(format_train(res))
            elif name == "plan":
                emit(format_plan(res))
            else:
                emit(format_table(res.get("rows", []), title=name))
        results[name] = res
    _finish(args, "all", results, machine)
    return 1 if any("error" in r for r in results.values()) else 0
