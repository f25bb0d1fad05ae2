"""``OUT/report.html``: one self-contained page (images inlined, charts as inline SVG)."""

from __future__ import annotations

import base64
import io
import json
import math
from html import escape
from pathlib import Path
from typing import Any

from PIL import Image

from tessera.demo.config import DemoConfig
from tessera.demo.stages import MARKER, write_text_atomic
from tessera.demo.svg import line_chart

CSS = """
body{font-family:sans-serif;max-width:1100px;margin:24px auto;padding:0 16px;color:#222}
table{border-collapse:collapse;margin:8px 0 20px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}.num{text-align:right;font-variant-numeric:tabular-nums}
img.px{image-rendering:pixelated;width:96px;height:96px;border:1px solid #ddd}
.ok{color:#1a7f37}.bad{color:#b42318}.muted{color:#777}code{background:#f4f4f4;padding:1px 4px}
"""


def data_uri(path: Path) -> str:
    img = Image.open(path)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def read_metrics(run_dir: Path) -> list[dict]:
    """Every JSON line of the run's metrics file(s) (``*.jsonl`` under the run directory)."""
    records: list[dict] = []
    for path in sorted(run_dir.rglob("*.jsonl")):
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill: the rest of the file is still good
            if isinstance(rec, dict):
                records.append(rec)
    return records


def loss_series(records: list[dict]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Group numeric loss values by split (train / eval) and modality: keys whose name holds 'loss' and
    'text' or 'image' (e.g. ``loss_text``, ``eval/image_loss``), plotted against ``step``."""
    out: dict[str, dict[str, list[tuple[float, float]]]] = {"train": {}, "eval": {}}
    for rec in records:
        step = rec.get("step", rec.get("iteration"))
        if not isinstance(step, (int, float)):
            continue
        split_default = "eval" if str(rec.get("split", rec.get("kind", ""))).startswith("eval") else "train"
        for k, v in rec.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            name = k.lower()
            if "loss" not in name and "ce" not in name.split("/")[-1].split("_"):
                continue
            modality = "text" if "text" in name else "image" if "image" in name else None
            if modality is None or "weight" in name or "ppl" in name or "perplexity" in name:
                continue
            split = "eval" if ("eval" in name or "val" in name.split("/")[0]) else split_default
            out[split].setdefault(modality, []).append((float(step), float(v)))
    return out


def _pct(x: Any) -> str:
    return "-" if not isinstance(x, (int, float)) or x != x else f"{100 * x:.1f}%"


def _pct_se(x: Any, se: Any) -> str:
    """'41.4% +- 4.4' (the binomial standard error in points) or just the percentage."""
    if not isinstance(se, (int, float)) or se != se:
        return _pct(x)
    return f"{_pct(x)} &plusmn; {100 * se:.1f}"


def scores_table(scores: dict) -> str:
    chance = scores.get("chance", {})
    cols = [("text_to_image", "text &rarr; image"), ("image_to_text", "image &rarr; text"),
            ("vq_reconstruction", "VQ reconstruction (ceiling)")]
    rows = [("colour_shape", "colour AND shape (headline)"), ("colour", "colour"), ("shape", "shape"),
            ("size", "size"), ("layout", "position / relation"), ("exact", "whole scene exact"),
            ("parsed", "caption in the grammar")]
    h = ["<table><tr><th>by generation</th>" + "".join(f"<th>{c}</th>" for _, c in cols) + "<th>chance</th></tr>"]
    for key, label in rows:
        cells = "".join(f'<td class="num">{_pct_se(scores.get(c, {}).get(key), scores.get(c, {}).get(key + "_stderr"))}</td>'
                        for c, _ in cols)
        h.append(f"<tr><td>{label}</td>{cells}<td class=\"num\">{_pct(chance.get(key))}</td></tr>")
    n = " / ".join(str(scores.get(c, {}).get("n", 0)) for c, _ in cols)
    h.append(f'</table><p class="muted">prompts: {n} (held-out split); &plusmn; is the binomial standard error. '
             "Chance = uniform guessing over the corpus's attribute values.</p>")
    ranking = scores.get("ranking", {})
    if ranking:
        h.append("<table><tr><th>by likelihood (no sampling)</th><th>recall@1: log p</th>"
                 "<th>recall@1: log p gain over no condition</th><th>mean rank (log p)</th>"
                 "<th>candidates</th><th>chance</th></tr>")
        for key, label in (("image_to_text", "image &rarr; text: the true caption among other captions"),
                           ("text_to_image", "text &rarr; image: the true image among other images")):
            r = ranking.get(key, {})
            pmi = r.get("pmi", {})
            h.append(f"<tr><td>{label}</td><td class='num'>{_pct_se(r.get('recall_at_1'), r.get('recall_at_1_stderr'))}</td>"
                     f"<td class='num'>{_pct_se(pmi.get('recall_at_1'), pmi.get('recall_at_1_stderr'))}</td>"
                     f"<td class='num'>{r.get('mean_rank', float('nan')):.2f}</td><td class='num'>{r.get('candidates', '-')}</td>"
                     f"<td class='num'>{_pct(r.get('chance'))}</td></tr>")
        h.append("</table><p class='muted'>The gain over no condition (log p(x | condition) - log p(x)) is the fair "
                 "ranking of images: by plain log p a typical image (white background) beats the matching one.</p>")
    proto = scores.get("protocol")
    if proto:
        h.append(f"<p class='muted'>protocol: image &rarr; text prompt <code>{escape(str(proto.get('caption_prompt')))}</code> "
                 f"(greedy), text &rarr; image prompt <code>{escape(str(proto.get('image_prompt')))}</code> "
                 f"(temperature {proto.get('image_temperature')}, guidance {proto.get('cfg_scale')}); "
                 "docs/benchmarks.md, \"The demo\".</p>")
    return "\n".join(h)


def _verdict(row: dict) -> str:
    ok = row.get("colour_shape", 0.0) >= 1.0
    return f'<span class="{"ok" if ok else "bad"}">{"right" if ok else "wrong"}</span>'


def write_report(cfg: DemoConfig, paths, d: Path) -> dict:
    out = paths.out
    ev = out / "evaluate"
    scores = json.loads((ev / "scores.json").read_text())
    samples = json.loads((ev / "samples.json").read_text())
    records = read_metrics(paths.run_dir)
    series = loss_series(records)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Tessera demo</title><style>{CSS}</style></head><body>"]
    parts.append("<h1>Tessera demo</h1>")
    parts.append(f"<p>Early-fusion token model trained from scratch on the synthetic coloured-shapes corpus "
                 f"(preset <code>{escape(cfg.preset)}</code>, {cfg.train_docs} training documents, "
                 f"{cfg.image_size}px images). Made by <code>tessera demo --out {escape(str(out))}</code>.</p>")

    parts.append("<h2>Scores</h2>" + scores_table(scores))
    from tessera.demo.finetune import report_section

    parts.append(report_section(out))

    parts.append("<h2>Loss curves</h2>")
    for split in ("train", "eval"):
        if series[split]:
            parts.append(line_chart({f"{m} CE": pts for m, pts in sorted(series[split].items())},
                                    title=f"{split} loss by modality", ylabel="cross-entropy (nats)"))
    if not any(series.values()):
        parts.append(f"<p class='muted'>no per-modality losses found in {escape(str(paths.run_dir))}/*.jsonl</p>")

    parts.append("<h2>VQ reconstructions</h2><p>held-out images (top) and their reconstruction through the "
                 "image tokenizer (bottom); PSNR in dB, and what the detector reads from the reconstruction.</p>")
    recon = samples.get("recon", [])[: cfg.recon_images]
    if recon:
        top = "".join(f"<td><img class='px' src='{data_uri(ev / 'recon' / r['real'])}'></td>" for r in recon)
        bot = "".join(f"<td><img class='px' src='{data_uri(ev / 'recon' / r['recon'])}'></td>" for r in recon)
        info = "".join(f"<td class='muted'>{r['psnr']:.1f} dB<br>{escape(r['detected'])}</td>" for r in recon)
        parts.append(f"<table><tr>{top}</tr><tr>{bot}</tr><tr>{info}</tr></table>")

    parts.append("<h2>Generated: text &rarr; image</h2><table><tr><th>prompt (held-out caption)</th>"
                 "<th>generated</th><th>a real render</th><th>detector</th></tr>")
    for r in samples.get("t2i", [])[: cfg.report_documents]:
        gen = f"<img class='px' src='{data_uri(ev / 't2i' / r['image'])}'>" if r.get("image") else "<i>no image</i>"
        real = f"<img class='px' src='{data_uri(ev / 't2i' / r['real'])}'>"
        parts.append(f"<tr><td>{escape(r['caption'])}</td><td>{gen}</td><td>{real}</td><td>{_verdict(r)}</td></tr>")
    parts.append("</table>")

    parts.append("<h2>Generated: image &rarr; text</h2><table><tr><th>prompt (held-out image)</th>"
                 "<th>generated caption</th><th>true caption</th><th>detector</th></tr>")
    for r in samples.get("i2t", [])[: cfg.report_documents]:
        img = f"<img class='px' src='{data_uri(ev / 'i2t' / r['image'])}'>"
        parts.append(f"<tr><td>{img}</td><td>{escape(r['text']) or '<i>(empty)</i>'}</td>"
                     f"<td class='muted'>{escape(r['truth'])}</td><td>{_verdict(r)}</td></tr>")
    parts.append("</table>")

    parts.append("<h2>Stages</h2><p class='muted'>wall seconds; CPU seconds (this process and its children) and "
                 "the 1-minute load average at the stage's start and end tell a busy machine from a slow stage.</p>"
                 "<table><tr><th>stage</th><th>seconds</th><th>CPU s</th><th>load avg</th><th>budget</th><th>facts</th></tr>")
    total = 0.0
    for name in ("synth", "text_tokenizer", "image_tokenizer", "pretokenize", "train", "evaluate", "finetune"):
        mpath = paths.stage(name) / MARKER
        if not mpath.is_file():
            continue
        m = json.loads(mpath.read_text())
        total += float(m.get("seconds", 0.0))
        facts = {k: v for k, v in m.items() if k not in ("stage", "seconds", "budget_s", "over_budget", "command",
                                                           "cpu_seconds", "load_avg_start", "load_avg_end")}
        cls = "bad" if m.get("over_budget") else ""
        cpu = f"{m['cpu_seconds']:.1f}" if isinstance(m.get("cpu_seconds"), (int, float)) else "-"
        load = f"{m.get('load_avg_start')} &rarr; {m.get('load_avg_end')}" if "load_avg_start" in m else "-"
        parts.append(f"<tr><td>{name}</td><td class='num {cls}'>{m.get('seconds', 0):.1f}</td>"
                     f"<td class='num'>{cpu}</td><td class='num'>{load}</td>"
                     f"<td class='num'>{m.get('budget_s') or '-'}</td><td class='muted'>{escape(json.dumps(facts))[:400]}</td></tr>")
    parts.append(f"</table><p>total before the report: {total:.0f} s</p></body></html>")
    html = "\n".join(parts)
    write_text_atomic(out / "report.html", html)
    return {"report": str(out / "report.html"), "bytes": len(html),
            "loss_points": {s: {m: len(p) for m, p in v.items()} for s, v in series.items()},
            "finite": all(math.isfinite(y) for v in series.values() for p in v.values() for _, y in p)}
