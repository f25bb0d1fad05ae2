"""``tessera demo [--out DIR] [--size {full,fast} | --fast] [--demo.key value ...]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from tessera.cli_common import add_deprecated_alias, fail
from tessera.config import ConfigError, apply_overrides, from_dict, parse_overrides, to_dict


def register(parser: argparse.ArgumentParser) -> None:
    # overrides are free-form (--seed 1, --train_docs 2000): without this argparse would read `--seed 1` as an
    # abbreviation of --seeds and run the several-seeds command instead
    parser.allow_abbrev = False
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory (default demo_out)")
    # --size, not --preset: --preset always names a model preset (tessera.cli_common)
    parser.add_argument("--size", choices=("full", "fast"), default="full",
                        help="full (default) or fast, the one-minute smoke version (tests use it)")
    parser.add_argument("--fast", action="store_true", help="same as --size fast")
    add_deprecated_alias(parser, "--preset", "--size", dest="size", choices=("full", "fast"))
    parser.add_argument("--seeds", default=None, metavar="0,1,2",
                        help="run the demo once per seed into OUT/seed-N and write the mean +- spread table "
                             "(OUT/seeds.md, OUT/seeds.json)")
    parser.add_argument("--stop-after", default=None, metavar="STAGE",
                        help="end after this stage (e.g. image_tokenizer: its VQ ceiling is in its stage.json)")
    parser.epilog = ("Any DemoConfig field can be overridden: --train_docs 2000 --train_overrides.train.steps 50 "
                     "--doc_mix.caption_image 0.4 --doc_mix.image_caption 0.3 --doc_mix.multi_image 0.2")
    parser.set_defaults(func=cmd_demo, accepts_overrides=True)


def build_config(preset: str, overrides: list[str]) -> object:
    from tessera.demo.config import DemoConfig, demo_preset

    base = to_dict(demo_preset(preset))
    ov = parse_overrides(overrides)
    mix_given = False
    # dict-valued fields take free-form dotted keys: --train_overrides.train.steps 50
    for key in list(ov):
        head, _, rest = key.partition(".")
        if head in ("train_overrides", "vq_overrides") and rest:
            base[head][rest] = ov.pop(key)
        elif head == "doc_mix" and rest:
            # --doc_mix.KIND W: the kinds given make the whole mix (the preset's is replaced, not merged)
            if not mix_given:
                base["doc_mix"], mix_given = {}, True
            try:
                base["doc_mix"][rest] = float(ov.pop(key))
            except ValueError:
                raise ConfigError(f"--{key}: expected a number") from None
    data = apply_overrides(base, DemoConfig, ov)
    return from_dict(DemoConfig, data, f"demo preset {preset}")


def cmd_demo(args: argparse.Namespace) -> int:
    from tessera.demo.pipeline import DemoError, run_demo
    from tessera.demo.seeds import parse_seeds, run_seeds

    preset = "fast" if args.fast else args.size
    try:
        cfg = build_config(preset, getattr(args, "overrides", []) or [])
        if args.seeds is not None:
            if args.stop_after is not None:
                raise DemoError("--seeds runs every stage: drop --stop-after")
            report = run_seeds(cfg, parse_seeds(args.seeds), args.out)
            print((Path(args.out) / "seeds.md").read_text(), end="")
            print(f"table: {Path(args.out) / 'seeds.md'} ({len(report['seeds'])} seeds)")
            return 0
        summary = run_demo(cfg, args.out, stop_after=args.stop_after)
    except (ConfigError, DemoError, OSError) as exc:
        return fail("tessera demo", exc)
    if "report" not in summary["stages"]:
        print(f"stopped after {args.stop_after}: {summary['out']} (each stage's facts in <stage>/stage.json)")
        return 0
    ev = summary["stages"].get("evaluate", {})
    print(f"report: {Path(summary['out']) / 'report.html'}")
    if ev:
        print(f"text->image colour+shape accuracy {ev.get('text_to_image_colour_shape', float('nan')):.3f}, "
              f"image->text {ev.get('image_to_text_colour_shape', float('nan')):.3f}, "
              f"chance {ev.get('chance_colour_shape', float('nan')):.3f}; caption recall@1 "
              f"{ev.get('caption_recall_at_1', float('nan')):.3f}, image recall@1 "
              f"{ev.get('image_recall_at_1_pmi', float('nan')):.3f} (gain over no caption), chance {ev.get('chance_recall_at_1', float('nan')):.3f}"
              " (scores.json)")
    return 0


__all__ = ["register", "build_config"]
