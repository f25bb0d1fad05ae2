"""Fault injection for tests, read from the environment (never part of a run config).

* ``TESSERA_DEBUG_KILL_AT="step:N"``: SIGKILL the process after step N's metrics row, before its save;
  ``"save:N"``: inside step N's save, after its tmp dir is complete and before the rename (crash-consistency
  tests of tessera/pretrain/checkpointing.py).
* ``TESSERA_DEBUG_NAN_STEPS="2,3"``: the loss of those steps is multiplied by NaN (the skip-and-count path).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping

from tessera.config import ConfigError

KILL_AT = "TESSERA_DEBUG_KILL_AT"
NAN_STEPS = "TESSERA_DEBUG_NAN_STEPS"


def kill_step(phase: str, environ: Mapping[str, str] | None = None) -> int | None:
    """The step at which to SIGKILL in ``phase`` ("step" or "save"), None when not asked for."""
    spec = (os.environ if environ is None else environ).get(KILL_AT, "")
    if not spec:
        return None
    ph, _, st = spec.partition(":")
    if ph not in ("step", "save") or not st.isdigit():
        raise ConfigError(f"{KILL_AT}: expected 'step:N' or 'save:N', got {spec!r}")
    return int(st) if ph == phase else None


def nan_steps(environ: Mapping[str, str] | None = None) -> frozenset[int]:
    spec = (os.environ if environ is None else environ).get(NAN_STEPS, "")
    try:
        return frozenset(int(x) for x in spec.replace("[", "").replace("]", "").split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{NAN_STEPS}: expected comma-separated step numbers, got {spec!r}") from None


def sigkill(message: str) -> None:
    print(message, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def maybe_kill_after_step(step: int) -> None:
    if kill_step("step") == step:
        sigkill(f"{KILL_AT}=step:{step}: SIGKILL")
