"""``tessera bench memory --config C [--section.key value ...]``: the memory plan checked against measured bytes.

The config's model is rebuilt at a reduced size that keeps its per-layer structure (``reduced_model``:
narrower hidden with the same FFN and vocabulary ratios, the same GQA ratio, QK-norm, swin norm, dropout;
a few layers per pipeline stage; a shorter sequence), and one training step runs under the config's layout
with its degrees capped for the CPU (``reduced_train_config``: TP <= 2, PP <= 2, DP 2 by default; the
config's distributed optimizer, sequence parallelism, overlap and precision), as torchrun processes on
gloo. Each rank measures its weights, gradients, optimizer state and saved activations for every
recompute mode (tessera/bench/memory_measure.py) and every term is set beside ``tessera bench plan``'s
formula for the same reduced shape and layout, evaluated for the kernels the CPU runs (``CPU_KERNELS``;
the GPU's figure is shown beside it). ``--json F`` writes every term and ``results.worst_rel_error``, the
largest |measured / plan - 1|.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tessera.bench.plan import (
    CPU_KERNELS,
    GPU_KERNELS,
    Kernels,
    ModelShape,
    first_stage_extra_bytes,
    last_stage_extra_bytes,
    stage_activation_bytes,
    stage_layer_bytes,
    stage_parameters,
    state_bytes_per_param,
)
from tessera.config import ConfigError
from tessera.pretrain.layout import RECOMPUTE_MODES, ParallelLayout

HEAD_DIM = 32  # a multiple of 16, so cpu_attention.c (FlashAttention's saved tensors) covers the reduced model
TOLERANCE = 0.10  # the goal: every term within 10% of the measurement


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, required=True, help="a training config (configs/chameleon-7b.yaml)")
    p.add_argument("--hidden", type=int, default=512, help="reduced hidden size (heads of 32 dims, ratios kept)")
    p.add_argument("--layers-per-stage", type=int, default=2, help="decoder layers per pipeline stage (chunk)")
    p.add_argument("--seq-length", type=int, default=256, help="reduced sequence length")
    p.add_argument("--tp", type=int, default=None, help="measured TP (default: the config's, at most 2)")
    p.add_argument("--pp", type=int, default=None, help="measured PP (default: the config's, at most 2)")
    p.add_argument("--dp", type=int, default=2, help="measured data-parallel size")
    p.add_argument("--microbatches", type=int, default=None, help="micro-batches per step (default: PP)")
    p.add_argument("--modes", default=",".join(RECOMPUTE_MODES), help="recompute modes to measure")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds for the measuring processes")


# ---- the reduced run ------------------------------------------------------------------------------
def reduced_model(model: Any, *, hidden: int, layers: int, seq: int, tp: int) -> Any:
    """``model`` (a ModelConfig) narrowed to ``hidden`` with ``layers`` layers and ``seq`` context: heads of
    ``HEAD_DIM``, the same query heads per KV group, FFN and vocabulary scaled by hidden (FFN a multiple of
    8 x TP, vocabulary of 128 x TP), every feature (QK-norm, swin norm, dropout, z-loss, recompute) kept."""
    if hidden % HEAD_DIM:
        raise ConfigError(f"--hidden {hidden} must be a multiple of {HEAD_DIM} (the reduced head size)")
    heads = hidden // HEAD_DIM
    per_group = model.num_attention_heads // model.kv_groups
    if heads % per_group or (heads // per_group) % tp or heads % tp:
        raise ConfigError(f"--hidden {hidden}: {heads} heads cannot keep {per_group} query heads per KV group "
                          f"with whole groups on each of {tp} TP ranks; pick a larger --hidden")
    scale = hidden / model.hidden_size
    ffn = max(1, round(model.ffn_hidden_size * scale / (8 * tp))) * 8 * tp
    vocab = math.ceil(model.vocab_size * scale / (128 * tp)) * 128 * tp
    return dataclasses.replace(
        model, num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
        num_query_groups=heads // per_group if model.num_query_groups else None, vocab_size=vocab, seq_length=seq)


def reduced_train_config(cfg: Any, *, hidden: int = 512, layers_per_stage: int = 2, seq: int = 256,
                         tp: int | None = None, pp: int | None = None, dp: int = 2,
                         microbatches: int | None = None) -> Any:
    """The run ``tessera bench memory`` measures: ``cfg``'s model reduced (``reduced_model``) under its layout
    with TP / PP capped at 2 (or as given), ``dp`` replicas, ``microbatches`` per step (default one per
    pipeline stage: the pipeline full), random tokens, one step."""
    p = cfg.parallel
    tp = min(p.tp, 2) if tp is None else tp
    pp = min(p.pp, 2) if pp is None else pp
    vp = p.vp if pp > 1 else None
    stages = pp * (vp or 1)
    model = reduced_model(cfg.model, hidden=hidden, layers=layers_per_stage * stages, seq=seq, tp=tp)
    micro = p.micro_batch_size
    parallel = dataclasses.replace(p, tp=tp, pp=pp, vp=vp, global_batch_size=micro * dp * (microbatches or pp),
                                   sequence_parallel=p.sequence_parallel and tp > 1)
    precision = "bf16" if cfg.precision == "auto" else cfg.precision  # auto: a GPU run
    return dataclasses.replace(
        cfg, model=model, parallel=parallel, precision=precision,
        data=dataclasses.replace(cfg.data, path="", eval_path="", seq_length=seq),
        optim=dataclasses.replace(cfg.optim, warmup=0),
        train=dataclasses.replace(cfg.train, steps=1, eval_interval=0, run_dir=""))


def measured_layout(cfg: Any, world_size: int) -> ParallelLayout:
    """The layout of a ``reduced_train_config`` run on ``world_size`` processes (the trainer's checks)."""
    return ParallelLayout.from_train_config(cfg, world_size)


# ---- running it -----------------------------------------------------------------------------------
def run_ranks(cfg: Any, world: int, modes: tuple[str, ...], timeout: float = 900.0) -> list[dict]:
    """Every rank's measurement (memory_measure.measure) of the run ``cfg`` on ``world`` ranks: torchrun
    processes on gloo, or this process for one rank."""
    from tessera.config import save_config

    measured_layout(cfg, world)
    if world == 1:
        from tessera.bench.memory_measure import measure

        return [measure(cfg, modes)]
    with tempfile.TemporaryDirectory(prefix="tessera-memory-") as tmp:
        cfg_path, out = Path(tmp) / "run.yaml", Path(tmp) / "ranks.json"
        save_config(cfg, cfg_path)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
               "-m", "tessera.bench.memory_measure", str(cfg_path), str(out), ",".join(modes)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"tessera bench memory: the {world} measuring processes took over {timeout:.0f} s "
                               "(--timeout)") from None
        if r.returncode != 0 or not out.is_file():
            raise RuntimeError(f"tessera bench memory: the {world} measuring processes failed "
                               f"(exit {r.returncode}):\n{r.stderr[-4000:]}")
        return json.loads(out.read_text())


# ---- the comparison -------------------------------------------------------------------------------
def plan_terms(cfg: Any, layout: ParallelLayout, stage: int, first: bool, last: bool, mode: str,
               kernels: Kernels = CPU_KERNELS) -> dict[str, float]:
    """The plan's bytes for one rank of ``stage`` under recompute ``mode`` (what memory_measure reports)."""
    m = ModelShape.from_config(cfg.model)
    lay = dataclasses.replace(layout, recompute=mode,
                              recompute_num_layers=layout.recompute_num_layers if mode == "full" else None)
    n = stage_parameters(m, lay.tp, lay.pp)[stage]
    per = state_bytes_per_param(lay)
    layers = lay.layers_per_stage(m) * lay.virtual_stages
    outside = (first_stage_extra_bytes(m, lay) if first else 0.0) + (last_stage_extra_bytes(m, lay, kernels) if last else 0.0)
    return {"params": float(n), "weights": per["weights"] * n, "grads": per["grads"] * n,
            "optimizer": per["optimizer"] * n,
            "activations_per_layer": stage_layer_bytes(m, lay, mode, kernels) / layers,
            "activations_outside_layers": outside,
            "activations_peak": stage_activation_bytes(m, lay, mode, kernels)[stage]["total"]}


COMPARED = ("params", "weights", "grads", "optimizer", "activations_per_layer", "activations_outside_layers",
            "activations_peak")


def compare(cfg: Any, ranks: list[dict]) -> dict:
    """Every (rank, mode, term): plan (CPU kernels), plan on the GPU path, measured, relative error."""
    layout = measured_layout(cfg, len(ranks))
    rows = []
    for r in ranks:
        for mode, got in r["modes"].items():
            want = plan_terms(cfg, layout, r["pp_rank"], got["first_stage"], got["last_stage"], mode)
            gpu = plan_terms(cfg, layout, r["pp_rank"], got["first_stage"], got["last_stage"], mode, GPU_KERNELS)
            measured = {"params": got["params"], "weights": got["weights"], "grads": got["grads"],
                        "optimizer": got["optimizer"], "activations_per_layer": got["per_layer"],
                        "activations_outside_layers": got["outside"], "activations_peak": got["peak"]}
            for term, value in measured.items():
                if term in ("weights", "grads", "optimizer", "params") and mode != next(iter(r["modes"])):
                    continue  # the same model state in every mode: compared once
                plan_v = want[term]
                rel = abs(value / plan_v - 1) if plan_v else (0.0 if value == 0 else math.inf)
                rows.append({"rank": r["rank"], "stage": r["pp_rank"], "tp_rank": r["tp_rank"], "dp_rank": r["dp_rank"],
                             "mode": mode, "term": term, "plan": plan_v, "measured": float(value),
                             "rel_error": rel, "compared": term in COMPARED, "plan_gpu": gpu[term]})
    compared = [row for row in rows if row["compared"]]
    worst = max(compared, key=lambda row: row["rel_error"]) if compared else None
    return {
        "layout": {**dataclasses.asdict(layout), "world_size": layout.world_size, "microbatches": layout.microbatches},
        "model": dataclasses.asdict(cfg.model),
        "kernels": {"measured (CPU)": dataclasses.asdict(CPU_KERNELS), "GPU": dataclasses.asdict(GPU_KERNELS)},
        "terms": rows,
        "shared_bytes": {str(r["rank"]): {m: v["shared"] for m, v in r["modes"].items()} for r in ranks},
        "worst_rel_error": worst["rel_error"] if worst else None,
        "worst": worst,
        "within_tolerance": bool(worst is None or worst["rel_error"] <= TOLERANCE),
        "tolerance": TOLERANCE,
    }


def format_memory(res: dict) -> str:
    from tessera.bench.report import format_table

    lay = res["layout"]
    worst_per_row: dict[tuple, dict] = {}
    for row in res["terms"]:
        key = (row["stage"], row["mode"], row["term"])
        if key not in worst_per_row or row["rel_error"] > worst_per_row[key]["rel_error"]:
            worst_per_row[key] = row
    rows = list(worst_per_row.values())
    table = [{"stage": r["stage"], "recompute": r["mode"], "term": r["term"] + ("" if r["compared"] else " (info)"),
              "plan": _mib(r["plan"], r["term"]), "measured": _mib(r["measured"], r["term"]),
              "error": f"{r['rel_error']:+.1%}".replace("+", "") if r["plan"] else "-",
              "plan, GPU kernels": _mib(r["plan_gpu"], r["term"])} for r in rows]
    title = (f"tessera bench memory: TP {lay['tp']} x PP {lay['pp']} x DP {lay['dp']}, "
             f"{'distributed optimizer' if lay['distributed_optimizer'] else 'Adam'}, sequence parallel "
             f"{'on' if lay['sequence_parallel'] else 'off'}, {lay['precision']}, micro-batch {lay['micro_batch']} x "
             f"{lay['microbatches']}, seq {lay['seq_length']}; the worst rank per row")
    worst = res["worst"]
    tail = (f"worst |measured / plan - 1| = {res['worst_rel_error']:.2%} ({worst['term']}, recompute={worst['mode']}, "
            f"rank {worst['rank']}): {'within' if res['within_tolerance'] else 'OUTSIDE'} {res['tolerance']:.0%}"
            if worst else "nothing compared")
    return format_table(table, title=title) + "\n" + tail


def _mib(v: float, term: str) -> str:
    return f"{v:,.0f}" if term == "params" else f"{v / 2**20:,.3f} MiB"


# ---- the command ----------------------------------------------------------------------------------
def run_memory_command(args: argparse.Namespace, finish, machine) -> int:
    from tessera.pretrain.config import load_train_config

    modes = tuple(m for m in args.modes.split(",") if m)
    bad = [m for m in modes if m not in RECOMPUTE_MODES]
    if bad or not modes:
        raise ConfigError(f"--modes {args.modes!r}: expected a comma-separated subset of {','.join(RECOMPUTE_MODES)}")
    cfg = load_train_config(args.config, getattr(args, "overrides", []) or [])
    small = reduced_train_config(cfg, hidden=args.hidden, layers_per_stage=args.layers_per_stage, seq=args.seq_length,
                                 tp=args.tp, pp=args.pp, dp=args.dp, microbatches=args.microbatches)
    world = small.parallel.tp * small.parallel.pp * args.dp
    measured_layout(small, world)  # the trainer's checks, before any process starts
    ranks = run_ranks(small, world, modes, timeout=args.timeout)
    res = compare(small, ranks)
    res["config"] = str(args.config)
    res["overrides"] = list(getattr(args, "overrides", []) or [])
    res["ranks"] = ranks
    finish(res, machine(), format_memory(res))
    return 0 if res["within_tolerance"] else 1
