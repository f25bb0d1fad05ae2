"""``tessera demo --seeds 0,1,2 --out DIR``: the demo once per seed (``DIR/seed-N``, each resumable like a
single demo), then the table of every score's mean and spread over the seeds, with the machine.

The seed drives everything that is drawn: the corpus, both tokenizers, the model's initialisation and
its data order, and the evaluation's sampling. Writes ``DIR/seeds.json`` and ``DIR/seeds.md``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from tessera.config import ConfigError
from tessera.demo.config import DemoConfig
from tessera.demo.protocol import seed_summary
from tessera.demo.stages import write_json_atomic, write_text_atomic

# (key in the table, label, where in scores.json)
METRICS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("t2i_colour_shape", "text -> image colour+shape (generation)", ("text_to_image", "colour_shape")),
    ("i2t_colour_shape", "image -> text colour+shape (generation)", ("image_to_text", "colour_shape")),
    ("caption_recall_at_1", "image -> text caption recall@1 (likelihood)", ("ranking", "image_to_text", "recall_at_1")),
    ("image_recall_at_1_pmi", "text -> image image recall@1 (likelihood gain over no caption)",
     ("ranking", "text_to_image", "pmi", "recall_at_1")),
    ("image_recall_at_1", "text -> image image recall@1 (raw likelihood)", ("ranking", "text_to_image", "recall_at_1")),
    ("vq_ceiling_colour_shape", "VQ ceiling colour+shape (reconstructions)", ("vq_reconstruction", "colour_shape")),
    ("t2i_colour", "text -> image colour", ("text_to_image", "colour")),
    ("t2i_shape", "text -> image shape", ("text_to_image", "shape")),
    ("i2t_colour", "image -> text colour", ("image_to_text", "colour")),
    ("i2t_shape", "image -> text shape", ("image_to_text", "shape")),
    ("i2t_parsed", "image -> text caption in the grammar", ("image_to_text", "parsed")),
)
# the fine-tuning stage's accuracies (finetune/scores.json: scores -> model -> kind -> accuracy)
FINETUNE_METRICS: tuple[tuple[str, str, tuple[str, ...]], ...] = tuple(
    (f"ft_{model}_{kind}", f"fine-tuning QA {kind}: {label}", ("scores", model, kind, "accuracy"))
    for model, label in (("pretrained", "pretrained"), ("full", "full fine-tuning"), ("lora", "LoRA"))
    for kind in ("count", "colour", "shape", "all"))
STAGE_ORDER = ("synth", "text_tokenizer", "image_tokenizer", "pretokenize", "train", "evaluate", "finetune", "report")


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: expected distinct integers, e.g. 0,1,2")
    return seeds


def _get(d: Any, path: tuple[str, ...]) -> float:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return float("nan")
        d = d[k]
    return float(d) if isinstance(d, (int, float)) else float("nan")


def machine() -> dict:
    from tessera.bench.machine import cpu_model

    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "load_avg_at_end": load}


def seed_row(out: Path) -> dict:
    """One seed's table row: its scores, stage wall and CPU seconds, from its output directory."""
    scores = json.loads((out / "scores.json").read_text())
    row: dict[str, Any] = {key: _get(scores, path) for key, _, path in METRICS}
    ft_path = out / "finetune" / "scores.json"
    ft = json.loads(ft_path.read_text()) if ft_path.is_file() else {}
    row.update({key: _get(ft, path) for key, _, path in FINETUNE_METRICS})
    row["chance_finetune_all"] = _get(ft, ("scores", "pretrained", "all", "chance"))
    stages = {}
    for name in STAGE_ORDER:
        marker = out / name / "stage.json"
        if marker.is_file():
            m = json.loads(marker.read_text())
            stages[name] = {"seconds": m.get("seconds"), "cpu_seconds": m.get("cpu_seconds"),
                            "load_avg_start": m.get("load_avg_start"), "load_avg_end": m.get("load_avg_end")}
    row["stages"] = stages
    row["wall_s"] = sum(float(s["seconds"] or 0.0) for s in stages.values())
    row["cpu_s"] = sum(float(s["cpu_seconds"] or 0.0) for s in stages.values())
    row["chance_colour_shape"] = _get(scores, ("chance", "colour_shape"))
    row["chance_recall_at_1"] = _get(scores, ("ranking", "image_to_text", "chance"))
    return row


def summarize(rows: dict[int, dict], cores: int) -> dict:
    keys = [k for k, _, _ in METRICS + FINETUNE_METRICS] + ["wall_s", "cpu_s"]
    summary = {k: seed_summary([r[k] for r in rows.values()]) for k in keys}
    # on a shared machine wall time overstates the cost: CPU seconds / cores is what a quiet machine takes
    summary["quiet_estimate_s"] = seed_summary([r["cpu_s"] / max(1, cores) for r in rows.values()])
    for name in STAGE_ORDER:
        vals = [r["stages"][name]["cpu_seconds"] for r in rows.values() if name in r["stages"]]
        summary[f"stage_cpu_s/{name}"] = seed_summary(vals)
    return summary


def markdown(report: dict) -> str:
    s, rows, m = report["summary"], report["seeds"], report["machine"]
    seeds = list(rows)
    lines = [f"`{report['command']}` on {m['cpu']} ({m['cores']} cores, torch {m['torch']})", "",
             "| score | " + " | ".join(f"seed {k}" for k in seeds) + " | mean +- std (min-max) |",
             "|---|" + "---|" * (len(seeds) + 1)]

    def pct(x: float) -> str:
        return "-" if x != x else f"{100 * x:.1f}%"

    for key, label, _ in METRICS + FINETUNE_METRICS:
        st = s[key]
        if st["n"] == 0:
            continue  # a demo without the fine-tuning stage
        lines.append(f"| {label} | " + " | ".join(pct(rows[k][key]) for k in seeds)
                     + f" | **{pct(st['mean'])} +- {100 * st['std']:.1f}** ({pct(st['min'])}-{pct(st['max'])}) |")
    first = next(iter(rows.values()))
    lines.append(f"| chance (colour+shape / recall@1 / fine-tuning QA all) | {pct(first['chance_colour_shape'])} / "
                 f"{pct(first['chance_recall_at_1'])} / {pct(first['chance_finetune_all'])} |" + " |" * len(seeds))
    lines.append("| wall seconds | " + " | ".join(f"{rows[k]['wall_s']:.0f}" for k in seeds)
                 + f" | {s['wall_s']['mean']:.0f} |")
    lines.append(f"| CPU seconds / {m['cores']} (quiet estimate) | "
                 + " | ".join(f"{rows[k]['cpu_s'] / max(1, m['cores']):.0f}" for k in seeds)
                 + f" | {s['quiet_estimate_s']['mean']:.0f} |")
    for name in STAGE_ORDER:
        st = s[f"stage_cpu_s/{name}"]
        if st["n"]:
            lines.append(f"| {name} CPU s | " + " | ".join(
                f"{rows[k]['stages'].get(name, {}).get('cpu_seconds', float('nan')):.0f}" for k in seeds)
                + f" | {st['mean']:.0f} |")
    return "\n".join(lines) + "\n"


def run_seeds(cfg: DemoConfig, seeds: list[int], out: str | Path, command: str | None = None) -> dict:
    from tessera.demo.pipeline import run_demo

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[int, dict] = {}
    for seed in seeds:
        sys.stderr.write(f"[demo] seed {seed} -> {out / f'seed-{seed}'}\n")
        run_demo(dataclasses.replace(cfg, seed=seed), out / f"seed-{seed}")
        rows[seed] = seed_row(out / f"seed-{seed}")
    m = machine()
    report = {"command": command or " ".join(["tessera", *sys.argv[1:]]), "machine": m, "preset": cfg.preset,
              "seeds": rows, "summary": summarize(rows, m["cores"] or 1)}
    write_json_atomic(out / "seeds.json", report)
    write_text_atomic(out / "seeds.md", markdown(report))
    return report
