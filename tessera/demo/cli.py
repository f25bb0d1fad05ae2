"""``tessera demo [--out DIR] [--fast] [--demo.key value ...]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tessera.config import ConfigError, apply_overrides, from_dict, parse_overrides, to_dict


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory (default demo_out)")
    parser.add_argument("--fast", action="store_true", help="the ~1-minute smoke version (tests use it)")
    parser.add_argument("--preset", choices=("full", "fast"), default=None, help="same as --fast for 'fast'")
    parser.epilog = "Any DemoConfig field can be overridden: --train_docs 2000 --train_overrides.train.steps 50"
    parser.set_defaults(func=cmd_demo, accepts_overrides=True)


def build_config(preset: str, overrides: list[str]) -> object:
    from tessera.demo.config import DemoConfig, demo_preset

    base = to_dict(demo_preset(preset))
    ov = parse_overrides(overrides)
    # dict-valued fields take free-form dotted keys: --train_overrides.train.steps 50
    for key in list(ov):
        head, _, rest = key.partition(".")
        if head in ("train_overrides", "vq_overrides") and rest:
            base[head][rest] = ov.pop(key)
    data = apply_overrides(base, DemoConfig, ov)
    return from_dict(DemoConfig, data, f"demo preset {preset}")


def cmd_demo(args: argparse.Namespace) -> int:
    from tessera.demo.pipeline import DemoError, run_demo

    preset = "fast" if args.fast else (args.preset or "full")
    try:
        cfg = build_config(preset, getattr(args, "overrides", []) or [])
        summary = run_demo(cfg, args.out)
    except (ConfigError, DemoError) as exc:
        print(f"tessera demo: {exc}", file=sys.stderr)
        return 2
    ev = summary["stages"].get("evaluate", {})
    print(f"report: {Path(summary['out']) / 'report.html'}")
    if ev:
        print(f"text->image colour+shape accuracy {ev.get('text_to_image_colour_shape', float('nan')):.3f}, "
              f"image->text {ev.get('image_to_text_colour_shape', float('nan')):.3f}, "
              f"chance {ev.get('chance_colour_shape', float('nan')):.3f} (scores.json)")
    return 0


__all__ = ["register", "build_config"]
