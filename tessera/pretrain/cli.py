"""`tessera train --config configs/X.yaml [--section.key value ...]` (also `python -m tessera.pretrain`)."""

from __future__ import annotations

import argparse


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="run config YAML (configs/demo.yaml, configs/chameleon-7b.yaml, ...)")
    parser.set_defaults(func=_train, accepts_overrides=True)


def _train(args: argparse.Namespace) -> int:
    from tessera.pretrain.config import load_train_config
    from tessera.pretrain.trainer import train

    train(load_train_config(args.config, getattr(args, "overrides", [])))
    return 0
