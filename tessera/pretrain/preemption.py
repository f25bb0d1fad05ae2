"""Preemption: a SIGTERM handler that only sets a flag, and the clean exit after the checkpoint it asks for.

Slurm preemption and torchrun forwarding deliver SIGTERM to the workers. The handler records it; at the
next step boundary the ranks agree (the flag rides in the step's one all-reduce, or ``requested()`` for a
standalone check), every rank saves, and ``Preempted`` (``SystemExit(0)``) ends the process so that
schedulers see a clean exit and a restart resumes from the checkpoint.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import torch

from tessera.model.checkpoint import step_dir_name
from tessera.utils import rank, world_size


class Preempted(SystemExit):
    """Raised after the SIGTERM checkpoint is written: exit status 0, so schedulers treat it as clean.
    The message is printed by rank 0 when it is raised."""

    def __init__(self, run: str | Path, step: int) -> None:
        super().__init__(0)
        self.step = step
        self.message = (f"SIGTERM: saved {Path(run) / 'checkpoints' / step_dir_name(step)} after step {step}; "
                        f"exiting 0 (a restart with train.resume: auto continues at step {step + 1})")
        if rank() == 0:
            print(self.message, flush=True)


class StopSignal:
    """SIGTERM sets a flag (``pending``); the trainer all-reduces it at a step boundary so every rank agrees to
    save and stop together. ``install()`` / ``restore()`` put the handler in and the previous one back; a
    second SIGTERM before the save restores the previous handler and re-sends itself (so a stuck run can
    still be terminated)."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        if self.received is not None:
            self.restore()
            os.kill(os.getpid(), signum)
            return
        self.received = signum

    @property
    def pending(self) -> bool:
        """This process received the signal (other ranks may not have: reduce before acting on it)."""
        return self.received is not None

    def install(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():  # signal() only works there
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def requested(self, device: torch.device | str = "cpu") -> bool:
        """Collective when a process group of several ranks exists: did ANY rank receive the signal?
        One all-reduce and one read (the trainer packs the flag into its step reduction instead)."""
        flag = torch.full((1,), 1.0 if self.pending else 0.0, device=device)
        if world_size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item() > 0)
