"""The decode step replayed as CUDA graphs (``KVCacheDecoder`` on a CUDA device).

A decode step of a small batch is a few hundred small kernels; on a GPU the host's time to launch
them, not the GPU, then sets the time per token. ``KVCacheDecoder._graph_step(window)`` is written to
be captured: it reads and writes only tensors allocated once per ``allocate`` (token ids, cache
column, pad lengths, key mask, KV cache, logits), makes no host sync, allocates nothing that outlives
it and has no Python branch on tensor values; its attention reads a fixed ``window`` of cache
columns, so all its shapes are fixed by (rows, cache length, window). ``DecodeGraphs`` captures it
once per window and replays it for every token:

* warm-up: the first step of a window runs eagerly on a side stream (lazy cuBLAS handles and
  workspaces), as torch's CUDA-graph notes ask, and the next one is captured and replayed. Eager
  steps are real decoding steps, and the same function as the replayed ones, so which steps were
  replayed never changes the logits.
* the graphs share one memory pool; their outputs live in the decoder's buffers, outside the pool.
* a capture that fails (an op that syncs or cannot be captured) turns graphs off for this decoder;
  ``failed`` says why and the steps go on eagerly with the same function.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

import torch


class Graph(Protocol):
    def capture(self, fn: Callable[[], None]) -> None: ...

    def replay(self) -> None: ...


def graphs_unavailable(device: torch.device) -> str | None:
    """Why the decode step cannot be replayed as CUDA graphs on ``device`` (None: it can)."""
    if device.type != "cuda":
        return f"device {device}"
    if os.environ.get("TESSERA_CUDA_GRAPHS", "1").strip().lower() in ("0", "false", "no", "off"):
        return "TESSERA_CUDA_GRAPHS=0"
    return None


class TorchCUDAGraph:
    """``torch.cuda.CUDAGraph`` capturing into a pool shared by the decoder's graphs (they replay one at a
    time on one stream, and none of them keeps an output in the pool)."""

    def __init__(self, pool: object) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool

    def capture(self, fn: Callable[[], None]) -> None:
        with torch.cuda.graph(self.graph, pool=self.pool):
            fn()

    def replay(self) -> None:
        self.graph.replay()


class DecodeGraphs:
    """One graph per attention window of the current cache; ``run(window)`` does one decoding step.

    ``graph_factory``: a callable returning a new ``Graph`` (default: ``TorchCUDAGraph`` over one shared
    pool). Tests pass one that records and re-executes the captured kernels on the CPU."""

    def __init__(
        self,
        step: Callable[[int], None],
        device: torch.device,
        warmup_steps: int = 1,
        graph_factory: Callable[[], Graph] | None = None,
    ) -> None:
        self._step = step
        self.device = device
        self.warmup_steps = warmup_steps
        self._factory = graph_factory
        self._pool: object | None = None
        self._side: torch.cuda.Stream | None = None
        self._graphs: dict[int, Graph] = {}
        self._warm: dict[int, int] = {}
        self.captures = 0
        self.replays = 0
        self.eager_steps = 0
        self.failed: str | None = None

    def _new_graph(self) -> Graph:
        if self._factory is not None:
            return self._factory()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return TorchCUDAGraph(self._pool)

    def _eager(self, window: int, side_stream: bool) -> None:
        self.eager_steps += 1
        if not (side_stream and self.device.type == "cuda"):
            self._step(window)
            return
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        current = torch.cuda.current_stream(self.device)
        self._side.wait_stream(current)
        with torch.cuda.stream(self._side):
            self._step(window)
        current.wait_stream(self._side)

    def run(self, window: int) -> None:
        if self.failed is not None:
            self._eager(window, side_stream=False)
            return
        graph = self._graphs.get(window)
        if graph is None:
            if self._warm.get(window, 0) < self.warmup_steps:
                self._warm[window] = self._warm.get(window, 0) + 1
                self._eager(window, side_stream=True)
                return
            try:
                graph = self._new_graph()
                graph.capture(lambda: self._step(window))  # records the kernels; runs nothing
            except Exception as exc:  # noqa: BLE001 - any capture failure means: go on eagerly, say why
                self.failed = f"capture failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                self._graphs.clear()
                self._eager(window, side_stream=False)
                return
            self._graphs[window] = graph
            self.captures += 1
        graph.replay()
        self.replays += 1

    def reset(self) -> None:
        """Forget every graph: the buffers they were captured on have been reallocated. New graphs get a
        new pool (the old one is freed with the last graph that used it)."""
        self._graphs.clear()
        self._warm.clear()
        self._pool = None

    def stats(self) -> dict:
        return {"captures": self.captures, "replays": self.replays, "eager_steps": self.eager_steps,
                "windows": sorted(self._graphs), "failed": self.failed}
