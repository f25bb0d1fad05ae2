"""The ``tessera`` command. Each subpackage owns its subcommands in ``<pkg>/cli.py`` with
``register(subparsers)``; this file only lists them, so ``tessera --help`` shows every one."""

from __future__ import annotations

import argparse
import importlib
import sys

# (command, module that registers it, one-line help)
SUBCOMMANDS: list[tuple[str, str, str]] = [
    ("model", "tessera.model.cli", "inspect model presets (shape, exact parameter count)"),
    ("tokenizer", "tessera.tokenizers.cli", "train and use the BPE text and VQ image tokenizers"),
    ("data", "tessera.data.cli", "synthesise corpora, pretokenize shards, inspect the woven batch stream"),
    ("train", "tessera.pretrain.cli", "pretrain a model with megatron-core TP/PP/DP (torchrun or Slurm)"),
    ("generate", "tessera.generate.cli", "generate interleaved text-image documents from a checkpoint"),
    ("convert", "tessera.convert.cli", "convert checkpoints to and from Hugging Face / Meta Chameleon formats"),
    ("bench", "tessera.bench.cli", "benchmark training, decoding, kernels, VQ and data against baselines"),
    ("demo", "tessera.demo.cli", "the end-to-end demo on the built-in synthetic corpus"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tessera",
        description="Train early-fusion token-based multimodal foundation models (Chameleon-style).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name, help_text in SUBCOMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # A subpackage still being built is left out of the listing rather than breaking the CLI.
            if exc.name == module_name:
                continue
            raise
        module.register(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Commands that take dotted config overrides (--model.hidden_size 512) accept the rest of argv.
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "accepts_overrides", False):
        args.overrides = extra
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
