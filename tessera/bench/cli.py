"""``tessera bench {train,decode,kernels,vq,data,plan,memory,all} [--json out.json]`` and ``tessera bench gpu-check``.

Each benchmark prints a table and (with ``--json FILE``) writes one JSON file holding the command, the
machine (CPU model, cores, torch, GPU, measured matmul peaks and copy bandwidth) and the results;
``--json`` alone prints that JSON to stdout instead of the table. Every benchmark lives in this package
(``tessera.bench.<name>``); the product never imports it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from tessera.bench.report import emit, format_table, write_json
from tessera.cli_common import add_deprecated_alias, add_dtype, expected_errors, named_dirs

BENCHMARKS = ("train", "decode", "kernels", "vq", "data", "plan", "memory")
PROG = "tessera bench"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="write the results (with the machine description) to FILE; alone: print them to stdout")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--measure-seconds", type=float, default=0.5,
                   help="time spent on each machine peak (matmul fp32, bf16, copy); best of the repeats")


def _seq_length(p: argparse.ArgumentParser, default: int | None) -> None:
    p.add_argument("--seq-length", type=int, default=default, help="tokens per sequence")
    add_deprecated_alias(p, "--seq", "--seq-length", dest="seq_length", type=int)


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """``tessera bench data``'s flags (also behind the deprecated ``tessera data bench``)."""
    _common(p)
    p.add_argument("dirs", nargs="*", help="pretokenized directories, NAME=DIR or DIR (default: build a small one)")
    p.add_argument("--config", default=None, help="a training config or its data section: sources, blend, packing and batch sizes")
    _seq_length(p, 1024)
    p.add_argument("--global-batch", type=int, default=8, help="sequences per step")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--steps", type=int, default=50)
    add_deprecated_alias(p, "--batch", "--global-batch and --micro-batch", dest="batch", type=int)
    add_deprecated_alias(p, "--data", "a positional DIR", dest="data", type=str)
    p.add_argument("--document-mask", action="store_true",
                   help="packing with document boundaries (cu_seqlens, restarted positions; docs/finetuning.md)")
    p.add_argument("--curate", action="store_true",
                   help="instead: documents/s/core of `tessera data curate` on generated img2dataset shards")
    p.add_argument("--docs", type=int, default=2000, help="--curate: documents to generate")
    p.add_argument("--image-size", type=int, default=256, help="--curate: picture side (JPEG)")
    p.add_argument("--workers", type=int, default=1, help="--curate: processes")
    p.set_defaults(func=cmd_data)


def _layout_flags(p: argparse.ArgumentParser) -> None:
    """The plan's layout flags; with --config they override the config's settings."""
    p.add_argument("--gpus", type=int, default=None,
                   help="GPUs in the job (default: the smallest whole 8-GPU nodes the layout fills)")
    p.add_argument("--tp", type=int, default=None)
    p.add_argument("--pp", type=int, default=None)
    p.add_argument("--vp", type=int, default=None)
    p.add_argument("--dp", type=int, default=None, help="checked against gpus / (tp*pp)")
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--global-batch", type=int, default=None)
    _seq_length(p, None)
    p.add_argument("--no-sequence-parallel", action="store_true")
    p.add_argument("--no-distributed-optimizer", action="store_true")
    p.add_argument("--recompute", choices=("none", "selective", "full"), default=None,
                   help="the total's recomputation (default: the config's; none for a preset)")


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)

    p = sub.add_parser("train", help="training tokens/s and MFU; on CPU against transformers' Chameleon step")
    _common(p)
    p.add_argument("--preset", default="tiny", help="model preset (tessera model info PRESET)")
    p.add_argument("--micro-batch", type=int, default=2)
    _seq_length(p, 256)
    p.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    add_dtype(p, default="fp32")
    p.add_argument("--tp", type=int, default=1, help="only 1 in one process")
    p.add_argument("--pp", type=int, default=1, help="only 1 in one process")
    p.add_argument("--no-baseline", action="store_true", help="skip transformers' ChameleonForConditionalGeneration")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("decode", help="KV-cached decoding tokens/s against transformers (tessera.bench.decode)")
    _common(p)
    p.add_argument("--preset", default="tiny", help="model preset (tessera model info PRESET)")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    add_dtype(p, default=None, help="default: bf16 and fp32")
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("kernels", help="sampling, cross-entropy and CPU attention kernels vs references (tessera.bench.kernels)")
    _common(p)
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) rows (slow to compile)")
    p.add_argument("--attn-shapes", default="2x4x512x64,1x8x2048x128",
                   help="attention rows: comma-separated BATCHxHEADSxSEQxHEAD_DIM")
    p.set_defaults(func=cmd_kernels)

    p = sub.add_parser("vq", help="VQ encode/decode images/s against transformers' ChameleonVQVAE encoder")
    _common(p)
    p.add_argument("--preset", default="demo", help="VQ model preset (tessera.tokenizers.image.VQ_PRESETS)")
    p.add_argument("--batch", type=int, default=8, help="images per encode / decode call")
    p.add_argument("--steps", type=int, default=3)
    add_dtype(p, default="fp32")
    p.add_argument("--no-baseline", action="store_true")
    p.set_defaults(func=cmd_vq)

    add_data_arguments(sub.add_parser(
        "data", help="tokens/s/core of the packed, blended batch stream against reading its .bin; --curate: curation"))

    p = sub.add_parser("plan", help="memory per GPU, tokens/s and GPU-days for a preset or a training config")
    _common(p)
    p.add_argument("--preset", default="chameleon-7b", help="model preset (tessera model info PRESET)")
    p.add_argument("--config", type=Path, default=None,
                   help="a training config (configs/chameleon-7b.yaml): its model, layout and memory settings, read "
                        "as the trainer reads them; --section.key overrides as for tessera train")
    _layout_flags(p)
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--gpu", default="h100")
    p.add_argument("--lora-rank", type=int, default=None,
                   help="add the LoRA fine-tuning case: memory per GPU with adapters of this rank (48 / 80 GB cards)")
    p.add_argument("--lora-targets", default=",".join(("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")),
                   help="comma-separated LoRA targets (linear_qkv, linear_proj, linear_fc1, linear_fc2, output_layer)")
    p.set_defaults(func=cmd_plan, accepts_overrides=True)

    p = sub.add_parser("memory", help="measured bytes per rank (parameters, gradients, optimizer state, saved "
                       "activations) of a reduced model under a config's layout, beside the plan's formulas")
    _common(p)
    from tessera.bench.memory import register as register_memory

    register_memory(p)
    add_deprecated_alias(p, "--seq", "--seq-length", dest="seq_length", type=int)
    p.set_defaults(func=cmd_memory, accepts_overrides=True)

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
    p.add_argument("--preset", default="tiny", help="model preset (tessera model info PRESET)")
    p.set_defaults(func=cmd_all)


class BenchError(ValueError):
    """A benchmark's flags or inputs are wrong; the message names the flag."""


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


def _finish(args: argparse.Namespace, name: str, results: object, machine: dict, text: str) -> int:
    """Print the table (or, with a bare ``--json``, the JSON) and write ``--json FILE``."""
    payload = _payload(name, results, machine)
    if args.json == "-":
        print(json.dumps(payload, indent=2, default=str))
        return 0
    emit(text)
    if args.json:
        emit(f"wrote {write_json(args.json, payload)}")
    return 0


def _ints(flag: str, s: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in s.split(",") if x)
    except ValueError:
        raise BenchError(f"{flag}: expected comma-separated integers, got {s!r}") from None


def _guard(func):
    from tessera.bench.plan import PlanError
    from tessera.tokenizers.image import ImageTokenizerError

    return expected_errors(PROG, BenchError, PlanError, ImageTokenizerError)(func)


# ---- the benchmarks -----------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    return _guard(_train)(args)


def _train(args: argparse.Namespace) -> int:
    from tessera.bench.train import benchmark_train, format_train

    if args.tp != 1 or args.pp != 1:
        raise BenchError("--tp / --pp: tessera bench train runs one process, use 1 (multi-GPU: tessera train)")
    machine = _machine(args)
    res = benchmark_train(
        preset=args.preset, micro_batch=args.micro_batch, seq_length=args.seq_length, steps=args.steps,
        warmup=args.warmup, dtype=args.dtype, tp=args.tp, pp=args.pp, baseline=not args.no_baseline,
        device=args.device, machine=machine,
    )
    return _finish(args, "train", res, machine, format_train(res))


def cmd_decode(args: argparse.Namespace) -> int:
    return _guard(_decode)(args)


def _decode(args: argparse.Namespace) -> int:
    from tessera.bench.decode import run_decode

    batches = _ints("--batches", args.batches)
    machine = _machine(args)
    res = run_decode(preset=args.preset, batches=batches, prompt_len=args.prompt_len,
                     new_tokens=args.new_tokens, dtype=args.dtype, device=args.device, machine=machine)
    lines = [format_table(res["rows"], ["impl", "dtype", "batch", "tokens_per_s", "ttft_ms", "per_token_ms"],
                          title="decode (tokens/s; higher is better)")]
    lines += [f"{k}: {res[k]}" for k in ("speedup", "floor", "step_backend", "greedy_match_fp32") if k in res]
    return _finish(args, "decode", res, machine, "\n".join(lines))


def _attn_shapes(text: str) -> tuple[tuple[int, int, int, int], ...]:
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise BenchError(f"--attn-shapes: {item!r} is not BATCHxHEADSxSEQxHEAD_DIM (e.g. 2x4x512x64)")
        shapes.append(tuple(int(p) for p in parts))
    return tuple(shapes)


def cmd_kernels(args: argparse.Namespace) -> int:
    return _guard(_kernels)(args)


def _kernels(args: argparse.Namespace) -> int:
    from tessera.bench.kernels import run_kernels

    batches, shapes = _ints("--batches", args.batches), _attn_shapes(args.attn_shapes)
    machine = _machine(args)
    res = run_kernels(batches=batches, vocab=args.vocab, device=args.device, compile=not args.no_compile,
                      attn_shapes=shapes)
    return _finish(args, "kernels", res, machine, format_table(res["rows"], title=res.get("note", "kernels")))


def cmd_vq(args: argparse.Namespace) -> int:
    return _guard(_vq)(args)


def _vq(args: argparse.Namespace) -> int:
    from tessera.bench.vq import benchmark_vq

    machine = _machine(args)
    res = benchmark_vq(preset=args.preset, batch=args.batch, steps=args.steps, dtype=args.dtype,
                       baseline=not args.no_baseline, device=args.device)
    return _finish(args, "vq", res, machine, format_table(res["rows"], title="VQ tokenizer (images/s; higher is better)"))


def _named_dirs(items: list[str]) -> dict[str, str]:
    out = named_dirs(items)
    for path in out.values():
        if not Path(path).is_dir():
            raise BenchError(f"{path}: not a directory (a pretokenized dataset, from tessera data pretokenize)")
    return out


def cmd_data(args: argparse.Namespace) -> int:
    return _guard(_data)(args)


def _data(args: argparse.Namespace) -> int:
    from tessera.bench.data import benchmark_curation, run_data
    from tessera.data.pretokenize import PretokenizeError

    if args.curate:
        machine = _machine(args)
        r = benchmark_curation(args.docs, args.image_size, args.workers)
        text = (f"curate: {r['documents_per_s_per_core']:,.1f} documents/s/core, {r['documents_per_cpu_s']:,.1f} per CPU "
                f"second ({r['documents_read']} documents of {r['image_size']} px JPEG, {r['workers']} worker(s), "
                f"{r['seconds']:.1f} s; kept {r['documents']})")
        return _finish(args, "curate", r, machine, text)
    batch = getattr(args, "batch", None)
    global_batch, micro_batch = (batch, batch) if batch is not None else (args.global_batch, args.micro_batch)
    dirs = list(args.dirs) + ([args.data] if getattr(args, "data", None) else [])
    if dirs and args.config:
        raise BenchError("give pretokenized directories or --config DATA.yaml, not both")
    sources = _named_dirs(dirs)
    machine = _machine(args)
    try:
        res = run_data(sources, seq_length=args.seq_length, global_batch=global_batch, micro_batch=micro_batch,
                       steps=args.steps, config=args.config, document_mask=args.document_mask)
    except PretokenizeError as exc:
        raise BenchError(str(exc)) from exc
    r = res["tessera"]
    text = format_table(res["rows"], title="batch pipeline (tokens/s/core; higher is better)") + (
        f"\n{r['tokens_per_s_per_core']:,.0f} tokens/s/core ({r['tokens']:,} tokens in {r['seconds']:.3f} s, "
        f"seq {r['seq_length']}, micro {r['micro_batch']}, global {r['global_batch']})")
    return _finish(args, "data", res, machine, text)


def _config_overrides(args: argparse.Namespace) -> list[str]:
    """The layout flags as the trainer's --section.key overrides (with --config), then the user's own."""
    flags = {"tp": "parallel.tp", "pp": "parallel.pp", "vp": "parallel.vp", "micro_batch": "parallel.micro_batch_size",
             "global_batch": "parallel.global_batch_size", "seq_length": "data.seq_length", "recompute": "model.recompute"}
    out = [x for k, key in flags.items() if getattr(args, k) is not None for x in (f"--{key}", str(getattr(args, k)))]
    if args.no_sequence_parallel:
        out += ["--parallel.sequence_parallel", "false"]
    if args.no_distributed_optimizer:
        out += ["--parallel.distributed_optimizer", "false"]
    return out + list(getattr(args, "overrides", []) or [])


def cmd_plan(args: argparse.Namespace) -> int:
    return _guard(_plan)(args)


def _plan(args: argparse.Namespace) -> int:
    from tessera.bench.plan import (
        Layout,
        PlanError,
        default_gpus,
        format_lora,
        format_plan,
        plan,
        plan_for_train_config,
        shape_for_preset,
    )

    lora = {"lora_rank": args.lora_rank, "lora_targets": tuple(t for t in args.lora_targets.split(",") if t)}
    if args.config is not None:
        res = plan_for_train_config(str(args.config), _config_overrides(args), gpus=args.gpus, mfu=args.mfu,
                                    gpu=args.gpu, **lora)
    else:
        if getattr(args, "overrides", None):
            raise PlanError(f"{' '.join(args.overrides)}: config overrides need --config")
        shape = shape_for_preset(args.preset)
        tp, pp = args.tp or 1, args.pp or 1
        gpus = args.gpus or (tp * pp * args.dp if args.dp else default_gpus(tp, pp))
        layout = Layout.for_gpus(
            gpus, tp=tp, pp=pp, vp=args.vp if (args.vp or 1) > 1 else None, micro_batch=args.micro_batch or 1,
            global_batch=args.global_batch, seq_length=args.seq_length,
            sequence_parallel=tp > 1 and not args.no_sequence_parallel,
            distributed_optimizer=not args.no_distributed_optimizer, recompute=args.recompute or "none")
        res = plan(shape, layout, mfu=args.mfu, gpu=args.gpu, name=args.preset, **lora)
    if args.dp is not None and args.dp != res["layout"]["dp"]:
        raise PlanError(f"--dp {args.dp} disagrees with gpus/(tp*pp) = {res['layout']['dp']}")
    text = format_plan(res) + ("\n" + format_lora(res["lora"]) if "lora" in res else "")
    return _finish(args, "plan", res, _machine(args, measure=False), text)


def cmd_memory(args: argparse.Namespace) -> int:
    return _guard(_memory)(args)


def _memory(args: argparse.Namespace) -> int:
    from tessera.bench.memory import run_memory_command

    return run_memory_command(args, finish=lambda res, machine, text: _finish(args, "memory", res, machine, text),
                              machine=lambda: _machine(args, measure=False))


def cmd_finetune(args: argparse.Namespace) -> int:
    from tessera.bench.finetune import format_table, run

    shape = {}
    for item in filter(None, args.shape.split(",")):
        key, _, value = item.partition("=")
        shape[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    res = run(args.preset, seq=args.seq, micro_batch=args.micro_batch, rank=args.lora_rank,
              targets=tuple(t for t in args.lora_targets.split(",") if t), precision=args.dtype, steps=args.steps,
              shape=shape)
    return _finish(args, "finetune", res, _machine(args, measure=False), format_table(res))


def cmd_all(args: argparse.Namespace) -> int:
    """Every benchmark at a small size; one failing benchmark is recorded, not fatal."""
    from tessera.bench.data import run_data
    from tessera.bench.decode import run_decode
    from tessera.bench.kernels import run_kernels
    from tessera.bench.plan import Layout, format_plan, plan, shape_for_preset
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
        "data": lambda: run_data(None, seq_length=256, global_batch=4, micro_batch=4, steps=20),
        "plan": lambda: plan(shape_for_preset("chameleon-7b"), Layout.for_gpus(8, distributed_optimizer=True,
                                                                               recompute="none"), name="chameleon-7b"),
    }
    texts = []
    for name, job in jobs.items():
        texts.append(f"== {name}")
        try:
            res = job()
        except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the others
            res = {"error": f"{type(exc).__name__}: {exc}"}
            texts.append(f"{name} failed: {res['error']}")
        else:
            if name == "train":
                texts.append(format_train(res))
            elif name == "plan":
                texts.append(format_plan(res))
            else:
                texts.append(format_table(res.get("rows", []), title=name))
        if args.json != "-":
            emit("\n".join(texts))
            texts = []
        results[name] = res
    _finish(args, "all", results, machine, "\n".join(texts))
    return 1 if any("error" in r for r in results.values()) else 0
