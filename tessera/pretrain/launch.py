"""The environment the launch scripts take from a run config:
``python -m tessera.pretrain.launch --config X.yaml [--section.key value ...]`` prints ``export`` lines.

launch/torchrun.sh and launch/slurm.sbatch evaluate them before starting torchrun:

- ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``: when torchrun itself gets SIGTERM (Slurm preemption, a
  scheduler's stop), its agent forwards SIGTERM to the workers and SIGKILLs them this many seconds
  later (30 by default). The trainer needs up to one step plus one checkpoint save to stop cleanly
  (``train.expected_step_seconds``), so the launchers give it twice that. torchrun reads the variable
  when ``--shutdown-timeout`` is not given; releases without that option ignore it (a warning says so).
- ``CUDA_DEVICE_MAX_CONNECTIONS=1`` when communication overlaps compute: tensor (or context)
  parallelism, sequence parallelism, or overlapped gradient reduce / parameter gather. With one
  hardware queue the communication kernels start in the order they were issued, which megatron's
  overlap relies on (Megatron-LM requires it for TP/CP on GPUs before Blackwell). Left unset otherwise.

Only the config is read (no torch, no megatron), so it runs in a second on the node that launches.
"""

from __future__ import annotations

import math
import shlex
import sys
from pathlib import Path
from typing import Any

from tessera.config import ConfigError

SHUTDOWN_FACTOR = 2.0  # a slow step (stragglers, a first save to a cold file system) still fits
TORCH_DEFAULT_SHUTDOWN = 30  # torchrun's own default: never shorten it


def shutdown_timeout(expected_step_seconds: float) -> int:
    """Seconds torchrun waits between SIGTERM and SIGKILL for a step of ``expected_step_seconds``."""
    if not (expected_step_seconds > 0 and math.isfinite(expected_step_seconds)):
        raise ConfigError(f"train.expected_step_seconds must be a positive number of seconds, got {expected_step_seconds}")
    return max(TORCH_DEFAULT_SHUTDOWN, math.ceil(SHUTDOWN_FACTOR * expected_step_seconds))


def overlaps_communication(parallel: Any) -> bool:
    """Whether the layout overlaps communication with compute (keys a config may not have are off)."""
    return (
        getattr(parallel, "tp", 1) > 1
        or (getattr(parallel, "context_parallel", 1) or 1) > 1
        or bool(getattr(parallel, "sequence_parallel", False))
        or bool(getattr(parallel, "overlap_grad_reduce", False))
        or bool(getattr(parallel, "overlap_param_gather", False))
    )


def launch_env(cfg: Any) -> dict[str, str]:
    """The variables to export for ``cfg`` (a TrainConfig)."""
    env = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(shutdown_timeout(cfg.train.expected_step_seconds))}
    if overlaps_communication(cfg.parallel):
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    return env


def torchrun_reads_shutdown_timeout() -> bool | None:
    """Whether the installed torch's torchrun honours TORCH_ELASTIC_SHUTDOWN_TIMEOUT (None: no torch).
    Read from its launcher's source, so torch is not imported."""
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    api = Path(next(iter(spec.submodule_search_locations))) / "distributed" / "launcher" / "api.py"
    try:
        return "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" in api.read_text()
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    import argparse

    from tessera.pretrain.config import load_train_config

    parser = argparse.ArgumentParser(prog="python -m tessera.pretrain.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="run config YAML, as given to tessera.pretrain")
    args, overrides = parser.parse_known_args(argv)
    try:
        env = launch_env(load_train_config(args.config, overrides))
    except ConfigError as exc:
        print(f"tessera.pretrain.launch: {exc}", file=sys.stderr)
        return 2
    if torchrun_reads_shutdown_timeout() is False:
        print(f"tessera.pretrain.launch: warning: this torch's torchrun has no shutdown timeout setting; a SIGTERM "
              f"sent to torchrun gives the workers {TORCH_DEFAULT_SHUTDOWN} s to save (signal the workers instead)",
              file=sys.stderr)
    for name, value in env.items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
