"""`tessera train --config configs/X.yaml [--section.key value ...]` (also `python -m tessera.pretrain`)."""

from __future__ import annotations

import argparse
import sys

# TrainConfig's sections; tests/test_cli_errors.py checks this list against the dataclass
SECTIONS = {
    "model": "the network: preset, shape, dropout, recompute (--model.preset tiny|demo|chameleon-7b|...)",
    "parallel": "tp, pp, vp, micro_batch_size, global_batch_size, backend, distributed optimizer, overlaps",
    "data": "path or sources + blend, eval sets, seq_length, document masking",
    "optim": "lr, min_lr, warmup, decay_style, weight_decay, betas, eps, clip_grad",
    "train": "steps, intervals (log, eval, save), keep_last_n, resume, init_from, seed, run_dir",
    "finetune": "freeze, lora (docs/finetuning.md)",
    "precision": "auto | fp32 | bf16 (a top-level key: --precision bf16)",
}

EPILOG = ("overrides: after --config, any config field as --section.key value (applied over the YAML, "
          "left to right), e.g.\n  tessera train --config configs/demo.yaml --train.steps 50 --optim.lr 3e-4 "
          "--parallel.tp 2\na bad key or value is named by its flag. sections:\n"
          + "\n".join(f"  {name:<10} {what}" for name, what in SECTIONS.items())
          + "\nevery field: docs/training.md, \"Config reference\".")


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="run config YAML (configs/demo.yaml, configs/chameleon-7b.yaml, ...)")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
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
