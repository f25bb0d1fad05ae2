"""Run named stages into sub-directories, skipping the ones already done.

A stage writes its outputs under ``OUT/<name>/`` and is DONE when ``OUT/<name>/stage.json`` exists;
that marker is written last (to a temporary name, then renamed), so a killed run never leaves a
stage that looks complete. An unfinished stage is started afresh (its directory cleared) unless it
is ``resumable`` (training resumes from its own latest checkpoint).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from tessera.progress import format_seconds
from tessera.utils import atomic_write_json, atomic_write_text

MARKER = "stage.json"


@dataclass
class Stage:
    name: str
    run: Callable[[Path], dict]  # gets its output directory, returns facts for the marker/report
    resumable: bool = False
    description: str = ""


class StageRunner:
    def __init__(self, out: str | Path, budget_s: dict[str, float] | None = None, stream: TextIO | None = None):
        self.out = Path(out)
        self.budget_s = budget_s or {}
        self.stream = stream or sys.stderr
        self.results: dict[str, dict] = {}

    def dir(self, name: str) -> Path:
        return self.out / name

    def done(self, name: str) -> bool:
        return (self.dir(name) / MARKER).is_file()

    def marker(self, name: str) -> dict:
        return json.loads((self.dir(name) / MARKER).read_text())

    def log(self, msg: str) -> None:
        self.stream.write(f"[demo] {msg}\n")
        self.stream.flush()

    def run(self, stage: Stage, index: int = 0, total: int = 0) -> dict:
        where = f"stage {index}/{total} {stage.name}" if total else f"stage {stage.name}"
        d = self.dir(stage.name)
        if self.done(stage.name):
            info = self.marker(stage.name)
            self.log(f"{where}: done already ({d / MARKER}), skipped")
            self.results[stage.name] = info
            return info
        if d.exists() and not stage.resumable:
            shutil.rmtree(d)  # leftovers of a killed attempt: never mixed into a fresh one
        d.mkdir(parents=True, exist_ok=True)
        self.log(f"{where}: {stage.description or 'running'} -> {d}")
        t0, cpu0, load0 = time.perf_counter(), cpu_seconds(), _loadavg()
        info = dict(stage.run(d) or {})
        seconds = time.perf_counter() - t0
        budget = self.budget_s.get(stage.name)
        # CPU seconds (this process + finished children) and the load average: on a shared machine the wall
        # time overstates what the stage costs on a quiet one, cpu_seconds / cores is the quiet estimate
        info.update(stage=stage.name, seconds=round(seconds, 2), budget_s=budget,
                    over_budget=bool(budget is not None and seconds > budget),
                    cpu_seconds=round(cpu_seconds() - cpu0, 2), load_avg_start=load0, load_avg_end=_loadavg())
        write_json_atomic(d / MARKER, info)
        msg = f"{where}: finished in {format_seconds(seconds)}"
        if info["over_budget"]:
            msg += f" (over its budget of {format_seconds(budget)})"
        self.log(msg)
        self.results[stage.name] = info
        return info


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its waited-for children (e.g. `tessera train`)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def write_json_atomic(path: Path, payload: dict) -> None:
    atomic_write_json(path, payload, trailing_newline=True)


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write_text(path, text)
