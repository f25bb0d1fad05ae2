"""The ``tessera`` command. Each subpackage owns its subcommands in ``<pkg>/cli.py`` with
``register(subparsers)``; this file only lists them, so ``tessera --help`` shows every one."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import platform
import sys

from tessera import __version__
from tessera.deps import DISTRIBUTIONS, MEGATRON_CORE, UnsupportedDependency, installed_versions

# (command, module that registers it, one-line help)
SUBCOMMANDS: list[tuple[str, str, str]] = [
    ("model", "tessera.model.cli", "inspect model presets (shape, exact parameter count)"),
    ("tokenizer", "tessera.tokenizers.cli", "train and use the BPE text and VQ image tokenizers"),
    ("data", "tessera.data.cli", "synthesise corpora, pretokenize shards, inspect the blended batch stream"),
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
    parser.add_argument("--version", action=_VersionAction, help="show the versions of tessera and what it runs on")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name, help_text in SUBCOMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # A subcommand whose package is absent from the install is left out of the listing rather than
            # breaking every other command; any other missing module is a real error.
            if exc.name == module_name:
                continue
            raise
        module.register(sub.add_parser(name, help=help_text, description=help_text))
    return parser


class _VersionAction(argparse.Action):
    # argparse's "version" action needs the string up front; reading package metadata waits for --version
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


def version_line() -> str:
    """Tessera's version and the installed versions of what it runs on, read from package metadata
    (nothing is imported, so it works where the dependencies are only partly installed)."""
    deps = ", ".join(f"{name} {v or 'not installed'}" for name, v in installed_versions().items())
    return f"tessera {__version__} (python {platform.python_version()}, {deps})"


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except UnsupportedDependency as exc:
        print(f"tessera: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top not in DISTRIBUTIONS or importlib.util.find_spec(top) is not None:
            raise  # a bug or a broken install, not a missing dependency: keep the traceback
        dist = DISTRIBUTIONS[top]
        requirement = f"{dist}{MEGATRON_CORE}" if dist == "megatron-core" else dist
        print(f"tessera: this command needs {dist}, which is not installed (pip install '{requirement}')",
              file=sys.stderr)
        return 2


def _main(argv: list[str] | None) -> int:
    if (sys.argv[1:] if argv is None else argv)[:1] == ["--version"]:
        print(version_line())  # before the subcommands are imported: works without torch
        return 0
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
