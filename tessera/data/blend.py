"""Blend schedules: per-source mixture weights that may change with the training step, and the pure
function from (seed, step) to a global batch's composition (megatron's word for a weighted mixture of
datasets is a blend: ``BlendedDataset``; here the weights may also follow a schedule).

A schedule is a list of knots ``(step, {source: weight})``, ``step`` counting the optimizer steps done
before the batch (0 for the first). Before the first knot and after the last the weights are constant;
between two knots they follow the ``ramp``:

- ``linear`` / ``cosine``: every weight moves smoothly from one knot's value to the next one's (e.g. a
  text-only stage fades out over 2000 steps while interleaved documents fade in);
- ``step``: the weights of a knot hold until the next knot (curriculum stages switched at once).

Weights are normalised at every step.

Composition of global step t (``plan``): slot j of the global batch draws u = U(seed, t, j) from a
counter-based generator (Philox keyed by the seed, counter (0, t, 0, 0); nothing is carried from
step to step) and takes the source whose cumulative-weight interval holds u. Each source reads its
own packed samples in order; the index of slot j is the number of samples the source gave to
earlier slots (in earlier steps, then earlier in this step). So the whole stream is a function of
(seed, t), and resuming needs either only t (replaying the cheap draws) or the tiny counter state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

RAMPS = ("linear", "cosine", "step")


class BlendError(ValueError):
    pass


@dataclass
class BlendKnot:
    step: int
    weights: dict[str, float] = field(default_factory=dict)


@dataclass
class BlendSchedule:
    sources: list[str]
    knots: list[BlendKnot]
    ramp: Literal["linear", "cosine", "step"] = "cosine"

    def __post_init__(self) -> None:
        if not self.sources:
            raise BlendError("blend: no sources")
        if len(set(self.sources)) != len(self.sources):
            raise BlendError(f"blend: duplicate source names in {self.sources}")
        if not self.knots:
            raise BlendError("blend: need at least one knot (step, weights)")
        if self.ramp not in RAMPS:
            raise BlendError(f"blend.ramp: {self.ramp!r} is not one of {list(RAMPS)}")
        self._steps = np.array([k.step for k in self.knots], dtype=np.int64)
        if self._steps[0] < 0:
            raise BlendError(f"blend.knots[0].step: {int(self._steps[0])} is negative")
        if np.any(np.diff(self._steps) <= 0):
            raise BlendError(f"blend.knots: steps must strictly increase, got {self._steps.tolist()}")
        rows = []
        for i, k in enumerate(self.knots):
            unknown = set(k.weights) - set(self.sources)
            if unknown:
                raise BlendError(f"blend.knots[{i}]: unknown source(s) {sorted(unknown)}; sources are {self.sources}")
            w = np.array([float(k.weights.get(s, 0.0)) for s in self.sources])
            if np.any(w < 0) or not np.all(np.isfinite(w)) or w.sum() <= 0:
                raise BlendError(f"blend.knots[{i}]: weights must be finite, >= 0 and not all zero: {k.weights}")
            rows.append(w / w.sum())
        self._table = np.stack(rows)

    @classmethod
    def constant(cls, weights: Mapping[str, float]) -> BlendSchedule:
        return cls(list(weights), [BlendKnot(0, dict(weights))])

    @classmethod
    def from_dict(cls, d: Mapping) -> BlendSchedule:
        knots = [BlendKnot(int(k["step"]), {str(a): float(b) for a, b in k["weights"].items()}) for k in d["knots"]]
        return cls(list(d["sources"]), knots, d.get("ramp", "cosine"))

    def to_dict(self) -> dict:
        return {"sources": list(self.sources), "ramp": self.ramp,
                "knots": [{"step": k.step, "weights": dict(k.weights)} for k in self.knots]}

    def weights(self, step: int) -> np.ndarray:
        """Normalised weights (float64 [num_sources]) at ``step``."""
        s = self._steps
        if step <= s[0]:
            return self._table[0].copy()
        if step >= s[-1]:
            return self._table[-1].copy()
        i = int(np.searchsorted(s, step, side="right")) - 1
        if self.ramp == "step":
            return self._table[i].copy()
        x = (step - s[i]) / (s[i + 1] - s[i])
        if self.ramp == "cosine":
            x = 0.5 - 0.5 * math.cos(math.pi * x)
        w = (1 - x) * self._table[i] + x * self._table[i + 1]
        return w / w.sum()

    def weights_dict(self, step: int) -> dict[str, float]:
        return dict(zip(self.sources, self.weights(step).tolist(), strict=True))


def slot_uniforms(seed: int, step: int, n: int) -> np.ndarray:
    """U(seed, step, j) for j < n: Philox keyed by ``seed`` at counter (0, step, 0, 0)."""
    if step < 0:
        raise BlendError(f"step must be >= 0, got {step}")
    bitgen = np.random.Philox(key=np.uint64(seed % (1 << 64)), counter=[0, step, 0, 0])
    return np.random.Generator(bitgen).random(n)


def plan(schedule: BlendSchedule, seed: int, step: int, global_batch: int) -> np.ndarray:
    """Source index (int64 [global_batch]) of every slot of global step ``step``."""
    cdf = np.cumsum(schedule.weights(step))
    cdf[-1] = 1.0  # guard the top against rounding
    return np.searchsorted(cdf, slot_uniforms(seed, step, global_batch), side="right").astype(np.int64)


def slot_indices(sources_of_slots: np.ndarray, consumed: np.ndarray) -> np.ndarray:
    """Per-slot sample index within its source: ``consumed[s]`` + rank among this step's slots of s."""
    out = np.empty_like(sources_of_slots)
    for s in np.unique(sources_of_slots):
        sel = np.nonzero(sources_of_slots == s)[0]
        out[sel] = consumed[s] + np.arange(sel.size)
    return out


def consumed_before(schedule: BlendSchedule, seed: int, step: int, global_batch: int) -> np.ndarray:
    """Samples each source gave to steps [0, step): what resuming at ``step`` from (seed, step) replays."""
    n = len(schedule.sources)
    consumed = np.zeros(n, dtype=np.int64)
    for t in range(step):
        consumed += np.bincount(plan(schedule, seed, t, global_batch), minlength=n)
    return consumed


def composition(schedule: BlendSchedule, seed: int, steps: Sequence[int], global_batch: int) -> np.ndarray:
    """Counts [len(steps), num_sources] of slots per source: for reports and tests."""
    n = len(schedule.sources)
    return np.stack([np.bincount(plan(schedule, seed, t, global_batch), minlength=n) for t in steps])
