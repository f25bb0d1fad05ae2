"""The CUDA decoding path, checked on the CPU.

* Host syncs: ``SyncCounter`` counts everything that blocks the host on a CUDA device (aten ops that read
  a value back or whose output shape depends on data: ``item``, ``is_nonzero``, ``equal``, ``nonzero``,
  boolean indexing, ...; and ``tolist`` / ``numpy`` / ``cpu``). The engine's decode loop makes exactly one
  per step (the token transfer) for text, image with CFG (2 and 3 streams) and interleaved generation,
  batch 1 and > 1, with every step implementation.
* CUDA graphs: ``RecordedGraph`` gives ``torch.cuda.CUDAGraph``'s semantics on the CPU (capture records
  the aten ops with their tensors by identity and everything else by value; replay re-runs them; a sync
  fails the capture), so the decoder's graph code runs here. Replayed steps equal eager steps bit for
  bit, across attention windows, prompt batches and the engine; the captured function is sync-free and
  its buffers never move.
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

import tessera.generate.engine as engine_mod
from tessera.generate.config import GenerationConfig, SamplingParams
from tessera.generate.cuda_graph import DecodeGraphs, graphs_unavailable
from tessera.generate.decoder import DecoderError, KVCacheDecoder
from tessera.generate.engine import GenerationEngine
from tests.test_generate import VOCAB, has_c_compiler, make_model, uniform_engine

aten = torch.ops.aten

# aten ops that make the host wait for the device (a value read back, or an output shape that depends on data)
_SYNC_OPS = {
    aten.item.default, aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default,
    aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten.unique_consecutive.default,
    aten.unique_dim.default, aten.repeat_interleave.Tensor,
}
# ... and these when an index is a boolean mask (it goes through nonzero)
_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
# Tensor methods that copy to the host without an aten op the dispatcher sees
_HOST_METHODS = ("tolist", "numpy", "__array__", "cpu")


class SyncCounter(TorchDispatchMode):
    """Records (in ``events``) every operation that would block the host on a CUDA device."""

    def __init__(self, counting: bool = True) -> None:
        super().__init__()
        self.events: list[str] = []
        self.counting = counting
        self._saved: dict[str, object] = {}

    @staticmethod
    def _is_sync(func, args) -> bool:  # noqa: ANN001
        if func in _SYNC_OPS:
            return True
        if func in _INDEX_OPS:
            indices = args[1] if len(args) > 1 else []
            return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices)
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if self.counting and self._is_sync(func, args):
            name = func.overloadpacket.__name__
            self.events.append("item" if name == "_local_scalar_dense" else name)
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def paused(self):
        was, self.counting = self.counting, False
        try:
            yield
        finally:
            self.counting = was

    def __enter__(self):
        for name in _HOST_METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(t, *a, __name=name, __original=original, **k):  # noqa: ANN001
                if self.counting:
                    self.events.append(__name)
                return __original(t, *a, **k)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)


class _Recorder(SyncCounter):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


class RecordedGraph:
    """``torch.cuda.CUDAGraph`` semantics on the CPU. ``capture(fn)`` runs fn once and records its aten ops;
    a tensor argument is kept by identity (as a graph keeps device pointers) and every other argument by
    value (as a graph keeps kernel scalars); an op that syncs fails the capture, as CUDA's stream capture
    does. ``replay()`` re-runs the ops: tensors made inside the capture are made anew, every other tensor
    is the one the capture saw. So a step that rebinds a buffer, or reads a Python value that changes
    between steps, replays wrongly here as it would on a GPU. (Unlike CUDA, capture also runs the step;
    the decoder's step is idempotent, so running it twice changes nothing.)"""

    captured = 0

    def capture(self, fn) -> None:  # noqa: ANN001
        with _Recorder() as rec:
            fn()
        if rec.events:
            raise RuntimeError(f"operation not permitted when stream is capturing: {rec.events}")
        self.ops = rec.ops
        RecordedGraph.captured += 1

    def replay(self) -> None:
        made: dict[int, torch.Tensor] = {}

        def sub(x):  # noqa: ANN001
            return made.get(id(x), x) if isinstance(x, torch.Tensor) else x

        for func, args, kwargs, out in self.ops:
            result = func(*tree_map(sub, args), **tree_map(sub, kwargs))
            for old, new in zip(tree_leaves(out), tree_leaves(result), strict=True):
                if isinstance(old, torch.Tensor):
                    made[id(old)] = new


def use_recorded_graphs(dec: KVCacheDecoder, window: int, factory=RecordedGraph) -> KVCacheDecoder:  # noqa: ANN001
    """Turn on the decoder's graph path on the CPU (before ``allocate``), with a small attention window."""
    dec._graphs = DecodeGraphs(dec._graph_step, dec.device, graph_factory=factory)
    dec.kv_window = window
    return dec


# ---- host syncs of the decode loop ----------------------------------------------------------------
IMG = [VOCAB.boi_id] + [VOCAB.image_offset + k for k in range(VOCAB.image_tokens_per_image)] + [VOCAB.eoi_id]
SAMPLED = SamplingParams(1.0, 0, 0.9)
CASES = {
    "text-b1": ([[VOCAB.bos_id, 10, 11]], GenerationConfig(mode="text", max_new_tokens=12, text=SAMPLED)),
    "text-b3": ([[VOCAB.bos_id, 10, 11], [VOCAB.bos_id], [VOCAB.bos_id, 12, 13, 14, 15]],
                GenerationConfig(mode="text", max_new_tokens=12, text=SAMPLED)),
    "image-cfg-b1": ([[VOCAB.bos_id, 10, 11]], GenerationConfig(mode="image", max_new_tokens=8, cfg_scale=3.0)),
    "image-cfg-b2": ([[VOCAB.bos_id, 10, 11], [VOCAB.bos_id, 12]],
                     GenerationConfig(mode="image", max_new_tokens=8, cfg_scale=3.0)),
    "image-cfg3-b2": ([[VOCAB.bos_id, 10] + IMG + [11], [VOCAB.bos_id] + IMG],
                      GenerationConfig(mode="image", max_new_tokens=8, cfg_scale=3.0, cfg_image_scale=1.5)),
    "interleaved-cfg-b1": ([[VOCAB.bos_id, 10]],
                           GenerationConfig(mode="interleaved", max_new_tokens=30, cfg_scale=3.0, max_images=1,
                                            text=SAMPLED, image=SAMPLED)),
    "interleaved-cfg-b4": ([[VOCAB.bos_id, 10], [VOCAB.bos_id], [VOCAB.bos_id, 11, 12], [VOCAB.bos_id, 13]],
                           GenerationConfig(mode="interleaved", max_new_tokens=30, cfg_scale=3.0, max_images=1,
                                            text=SAMPLED, image=SAMPLED, seed=3)),
}


@pytest.fixture(scope="module")
def model():
    return make_model()


def make_engine(model, step: str, flat: bool = False) -> GenerationEngine:  # noqa: ANN001
    """``flat``: logits that ignore the model (pushed towards <boi>), so interleaved mode draws images."""
    if step == "fused-c-step" and not has_c_compiler():
        pytest.skip("no C compiler: the fused CPU step cannot be built")
    eng = uniform_engine(model) if flat else GenerationEngine(model, VOCAB, context_length=96, dtype="float32")
    if step != "fused-c-step":
        eng.decoder._fused = None  # every step through _graph_step
    if step == "recorded-graphs":
        use_recorded_graphs(eng.decoder, window=8)
        eng.overlap_host = True  # the CUDA loop order: next step queued before the host reads the tokens
    return eng


def decode_syncs(eng: GenerationEngine, prompts, cfg, monkeypatch) -> tuple:  # noqa: ANN001
    """Generate while counting syncs from the end of the prefill (the prompt's preparation) to the end.
    The sampler runs paused: on CUDA it is one Triton launch (its host side is checked below), here its
    PyTorch reference."""
    counter = SyncCounter(counting=False)
    prefill = eng.decoder.prefill

    def counted_prefill(*a, **k):  # noqa: ANN002, ANN003
        out = prefill(*a, **k)
        counter.counting = True
        return out

    sample = engine_mod.sample_step

    def paused_sample(*a, **k):  # noqa: ANN002, ANN003
        with counter.paused():
            return sample(*a, **k)

    monkeypatch.setattr(eng.decoder, "prefill", counted_prefill)
    monkeypatch.setattr(engine_mod, "sample_step", paused_sample)
    with counter:
        res, stats = eng.generate(prompts, cfg)
    return res, stats, counter.events


# Every case with the CUDA configuration (the graph step, the CUDA loop order); batch 1 and > 1 of CFG
# image and interleaved generation with the CPU's steps (the loop is the same code).
SYNC_RUNS = [(case, "recorded-graphs") for case in CASES] + [
    (case, step) for step in ("fused-c-step", "torch-step")
    for case in ("text-b3", "image-cfg-b1", "image-cfg3-b2", "interleaved-cfg-b1", "interleaved-cfg-b4")
]


@pytest.mark.parametrize("case,step", SYNC_RUNS)
def test_decode_loop_makes_one_sync_per_step(model, case, step, monkeypatch):
    prompts, cfg = CASES[case]
    eng = make_engine(model, step, flat=case.startswith("interleaved"))
    res, stats, events = decode_syncs(eng, prompts, cfg, monkeypatch)
    assert stats.steps == max(len(r.new_ids) for r in res) > 1
    assert events == ["tolist"] * stats.steps  # the sampled tokens, nothing else
    if cfg.mode == "image":
        assert all(r.finish_reason == "image" for r in res)
    if case.startswith("interleaved"):
        boi = [r.new_ids.count(VOCAB.boi_id) for r in res]
        assert sum(boi) > 0 and max(boi) <= cfg.max_images  # images happened; the device-side count held
    if step == "recorded-graphs":
        assert eng.decoder.graph_stats()["replays"] > 0


def test_prompts_stop_at_their_own_room(model):
    """Only tokens cross to the host: it ends each prompt where the kernel's position limit does (its own
    room: max_new_tokens, or less where the context is reached first), for ragged prompts in one batch."""
    eng = make_engine(model, "recorded-graphs")
    prompts = [[VOCAB.bos_id] + [10] * 79, [VOCAB.bos_id, 11], [VOCAB.bos_id] + [12] * 90]
    cfg = GenerationConfig(mode="text", max_new_tokens=12, ignore_eos=True, text=SAMPLED)
    res, stats = eng.generate(prompts, cfg)
    assert [len(r.new_ids) for r in res] == [12, 12, 5]  # 96 - 91 = 5: the context is the limit
    assert all(r.finish_reason == "length" for r in res) and stats.steps == 12
    assert VOCAB.pad_id not in [t for r in res for t in r.new_ids]  # never a done row's <pad>


def test_triton_sampler_host_side_is_sync_free(monkeypatch):
    """What the engine calls on CUDA: ``sample_step_triton``'s host code around its one kernel launch."""
    from tessera.kernels import _sampling_triton, sampling

    launched = []

    class Launch:
        def __getitem__(self, grid):
            return lambda *a, **k: launched.append(grid)

    monkeypatch.setattr(_sampling_triton, "sample_step_kernel", Launch())
    rules = sampling.TokenRules.from_vocab(VOCAB, max_seq_len=96)
    state = sampling.DecodeState.start([5, 6, 7, 8] * 2)  # both streams of 4 groups
    params = sampling.SamplingParams(cfg_groups=2, cfg_scale=3.0)
    logits = torch.randn(8, VOCAB.padded_size)
    with SyncCounter() as counter:
        sampling.sample_step_triton(logits, state, rules, params, seed=1, offset=1)
    assert counter.events == [] and launched == [(4,)]


@pytest.mark.parametrize("inference", [False, True])
def test_sync_counter_sees_syncs(inference):
    """Each way of reading a device value on the host counts once; ops that stay on the device do not count."""
    t = torch.arange(6)
    syncs = [lambda: t.sum().item(), lambda: bool(t[1]), lambda: t[t > 2], lambda: t.nonzero(), lambda: t.tolist(),
             lambda: float(t[0]), lambda: torch.equal(t, t), lambda: t.numpy(), lambda: [0, 1, 2][t[2]],
             lambda: t.clone().__setitem__(t > 2, 0)]
    device_only = [lambda: t.masked_fill(t > 2, 0), lambda: t[1:3], lambda: (t > 2).any(), lambda: t[t.long()],
                   lambda: torch.where(t > 2, t, 0).argmax()]
    with torch.inference_mode(inference):
        for expected, fns in ((1, syncs), (0, device_only)):
            for fn in fns:
                with SyncCounter() as counter:
                    fn()
                assert len(counter.events) == expected, counter.events


# ---- CUDA graphs --------------------------------------------------------------------------------
def _ragged(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, 80, (3, 9), generator=g)
    pad = torch.tensor([0, 4, 7]) if seed % 2 == 0 else torch.tensor([2, 0, 5])
    for r, p in enumerate(pad.tolist()):
        ids[r, :p] = 0
    return ids, pad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_replayed_steps_equal_eager_steps(dtype):
    """Steps replayed from recorded graphs == the same steps run eagerly, bit for bit, over four attention
    windows (one eager warm-up step each), then a second prompt batch on the same buffers (graphs reused)."""
    model = make_model(groups=2, seed=4, scale=0.3)
    eager = KVCacheDecoder(model, dtype=dtype, fused_cpu_step=False)
    eager.kv_window = 4
    graphed = use_recorded_graphs(KVCacheDecoder(model, dtype=dtype, fused_cpu_step=False), window=4)
    for d in (eager, graphed):
        d.allocate(3, 22)
    assert graphed.capacity == 24 and graphed.cache.shape == eager.cache.shape
    for batch in range(2):
        ids, pad = _ragged(batch)
        a, b = eager.prefill(ids, pad), graphed.prefill(ids, pad)
        assert torch.equal(a, b)
        for _ in range(13):  # cache columns 9..21: windows of 12, 16, 20 and 24 columns, up to max_len 22
            tok = a.float().argmax(-1)
            a, b = eager.step(tok), graphed.step(tok, reuse_output=True)
            assert torch.equal(a, b)
        assert torch.equal(eager.cache, graphed.cache)
        stats = graphed.graph_stats()
        assert stats == {"captures": 4, "replays": 9 + 13 * batch, "eager_steps": 4, "windows": [12, 16, 20, 24],
                         "failed": None}
    with pytest.raises(DecoderError, match="cache full"):  # max_len as asked, not the rounded capacity
        graphed.step(tok)


def test_captured_step_is_sync_free_and_allocation_stable():
    model = make_model(seed=5)
    dec = KVCacheDecoder(model, dtype=torch.float32, fused_cpu_step=False)
    dec.allocate(3, 20)
    buffers = {"logits": dec._logits, "tokens": dec._tokens, "column": dec._column, "pad": dec.pad,
               "key_valid": dec._key_valid, "cache": dec.cache, "cos": dec._cos, "sin": dec._sin_signed}
    ptrs = {k: t.data_ptr() for k, t in buffers.items()}
    for seed in range(2):  # a second prompt batch of the same shape keeps every buffer
        dec.allocate(3, 20)
        ids, pad = _ragged(seed)
        logits = dec.prefill(ids, pad)
        for _ in range(6):
            dec._tokens.copy_(logits.argmax(-1))
            dec._column.fill_(dec.length)
            with SyncCounter() as counter, torch.inference_mode():
                dec._graph_step(dec.capacity)  # the function that is captured, as it runs on the CPU
            assert counter.events == []
            dec.length += 1
            logits = dec._logits
        dec.step(logits.argmax(-1))
        assert {k: t.data_ptr() for k, t in buffers.items()} == ptrs
        assert all(getattr(dec, a) is t for a, t in (("_logits", buffers["logits"]), ("pad", buffers["pad"]),
                                                      ("_key_valid", buffers["key_valid"]), ("cache", buffers["cache"])))


def test_engine_with_recorded_graphs_equals_eager(model):
    """The engine over replayed steps and in the CUDA loop order (the next step queued before the host
    reads the tokens) decodes the tokens of the eager engine in the CPU's order (the model's own logits):
    CFG image and interleaved sampling, twice on the same buffers, then a batch of another shape."""
    eager, graphed = make_engine(model, "torch-step"), make_engine(model, "recorded-graphs")
    assert not eager.overlap_host and graphed.overlap_host
    for case in ("image-cfg3-b2", "interleaved-cfg-b4", "interleaved-cfg-b4", "text-b1"):
        prompts, cfg = CASES[case]
        cfg = dataclasses.replace(cfg, max_new_tokens=min(cfg.max_new_tokens, 14))
        ra, sa = eager.generate(prompts, cfg)
        rb, stats = graphed.generate(prompts, cfg)
        assert [(r.new_ids, r.finish_reason) for r in ra] == [(r.new_ids, r.finish_reason) for r in rb]
        assert sa.steps == stats.steps and graphed.decoder.length <= graphed.decoder.max_len
        assert stats.step_backend.startswith("CUDA graphs")  # what document.json's stats say
    stats = graphed.decoder.graph_stats()
    assert stats["failed"] is None and stats["replays"] > 3 * stats["eager_steps"]


def test_capture_failure_falls_back_with_the_reason():
    class SyncingStep(RecordedGraph):
        def capture(self, fn):  # noqa: ANN001
            def with_sync():
                fn()
                self.last = dec._logits.sum().item()  # a host sync inside the step

            super().capture(with_sync)

    model = make_model(seed=6)
    eager = KVCacheDecoder(model, dtype=torch.float32, fused_cpu_step=False)
    dec = use_recorded_graphs(KVCacheDecoder(model, dtype=torch.float32, fused_cpu_step=False), 8, SyncingStep)
    eager.kv_window = 8
    assert dec.step_backend.startswith("CUDA graphs")
    ids, pad = _ragged(0)
    for d in (eager, dec):
        d.allocate(3, 20)
    a, b = eager.prefill(ids, pad), dec.prefill(ids, pad)
    for _ in range(6):
        tok = a.argmax(-1)
        a, b = eager.step(tok), dec.step(tok)
        assert torch.equal(a, b)  # the failed capture's step and every later one ran eagerly
    assert "capture failed: RuntimeError: operation not permitted when stream is capturing" in dec.step_backend
    assert dec.step_backend.startswith("PyTorch ops (CUDA graphs off: ")
    assert dec.graph_stats()["replays"] == 0 and dec.graph_stats()["eager_steps"] == 6


def test_where_graphs_run_and_why_not(model, monkeypatch):
    assert graphs_unavailable(torch.device("cpu")) == "device cpu"
    assert graphs_unavailable(torch.device("cuda")) is None
    monkeypatch.setenv("TESSERA_CUDA_GRAPHS", "0")
    assert graphs_unavailable(torch.device("cuda")) == "TESSERA_CUDA_GRAPHS=0"
    with pytest.raises(DecoderError, match="cuda_graphs=True but CUDA graphs cannot run: device cpu"):
        KVCacheDecoder(model, dtype=torch.float32, cuda_graphs=True)
    dec = KVCacheDecoder(model, dtype=torch.float32, fused_cpu_step=False)
    assert dec.graph_stats() is None and dec.step_backend == "PyTorch ops"


def test_step_returns_the_callers_own_tensor_unless_asked(model):
    """Replayed steps write one logits buffer: ``step`` hands out a copy unless ``reuse_output`` (the
    engine) asks for the buffer itself; eager steps always return a new tensor."""
    for graphs in (False, True):
        dec = KVCacheDecoder(model, dtype=torch.float32, fused_cpu_step=False)
        if graphs:
            use_recorded_graphs(dec, window=4)
        dec.allocate(1, 12)
        dec.prefill(torch.tensor([[1, 10, 11]]), torch.tensor([0]))
        for t in range(12, 16):  # past the window's warm-up step: replayed when graphs are on
            a = dec.step(torch.tensor([t]))
        kept = a.clone()
        b = dec.step(torch.tensor([16]))
        assert torch.equal(a, kept) and not torch.equal(a, b)
        assert (dec.step(torch.tensor([17]), reuse_output=True) is dec._logits) == graphs
