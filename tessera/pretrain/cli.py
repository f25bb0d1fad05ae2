"""`tessera train --config configs/X.yaml [--section.key value ...]` (also `python -m tessera.pretrain`)."""

from __future__ import annotations

import argparse
import sys


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="run config YAML (configs/demo.yaml, configs/chameleon-7b.yaml, ...)")
    parser.set_defaults(func=_train, accepts_overrides=True)


def run(config: str | None, overrides: list[str]) -> int:
    """Load the config and train; a bad config, checkpoint or device setup ends with one line on stderr and
    exit status 2 (a bug still raises with its traceback)."""
    from tessera.config import ConfigError
    from tessera.model.checkpoint import CheckpointError
    from tessera.pretrain.config import load_train_config
    from tessera.pretrain.device import NoGPUError
    from tessera.pretrain.trainer import train

    try:
        train(load_train_config(config, overrides))
    except (ConfigError, CheckpointError, NoGPUError) as exc:
        print(f"tessera train: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


def _train(args: argparse.Namespace) -> int:
    return run(args.config, getattr(args, "overrides", []))
