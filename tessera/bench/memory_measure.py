"""What ``tessera bench memory`` measures on each rank: one training step of the trainer's own parts (model
chunks, megatron DDP, optimizer, schedule, forward step) and the bytes it holds, summed from the tensors.

* ``state_bytes``: the distinct storages of this rank's parameters (megatron's param buffer under the
  distributed optimizer, padding included), of its gradients (DDP's fp32 ``grad_data`` buffers) and of the
  optimizer's state (the tensors the inner Adam steps and its moments, less any storage that is a
  parameter or a gradient: fp32 main params of an fp32 model are the model's own).
* ``SavedTensorMeter``: ``torch.autograd.graph.saved_tensors_hooks`` over the step. Every tensor autograd
  saves is counted by its storage (a view keeps its whole storage alive; a storage saved twice counts once)
  while it is alive, with where it was saved (a decoder layer, the decoder outside its layers: megatron's
  full-recompute checkpoints, or outside the decoder: embedding, final norm, output layer, loss) and
  when (a micro-batch's forward, or the backward: recomputation). A storage saved from two places (RoPE
  frequencies cached across layers and micro-batches, saved by each full-recompute checkpoint) is
  reported as shared, not per layer. The peak of the live saved bytes over the whole step is kept too.

The step runs the kernels the GPU runs where the CPU can: megatron's unfused RoPE (the CPU otherwise
patches in a copy-free one) and ``cpu_attention.c`` for core attention (q, k, v, output, log-sum-exp:
what FlashAttention and Transformer Engine's fused attention keep). docs/scaling.md maps the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from tessera.pretrain.config import TrainConfig
from tessera.pretrain.layout import RECOMPUTE_MODES, ParallelLayout
from tessera.utils import atomic_write_json, rank, world_size


# ---- state ----------------------------------------------------------------------------------------
def _storage(t: torch.Tensor) -> tuple[int, int] | None:
    """(data pointer, bytes) of the storage behind ``t``; None for a tensor without one."""
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    n = st.nbytes()
    return (st.data_ptr(), n) if n else None


def _sum_storages(tensors, exclude: set[int] = frozenset()) -> tuple[int, set[int]]:
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            s = _storage(t)
            if s is not None and s[0] not in exclude:
                seen[s[0]] = s[1]
    return sum(seen.values()), set(seen)


def param_storages(ddps: list) -> set[int]:
    return {s[0] for d in ddps for p in d.parameters() if (s := _storage(p)) is not None}


def state_bytes(ddps: list, opt) -> dict[str, int]:
    """Bytes of this rank's weights, gradients and optimizer state (module docstring)."""
    from tessera.pretrain.optimizer import sub_optimizers

    params = [p for d in ddps for p in d.parameters()]
    weights, w_ids = _sum_storages(params)
    grad_tensors = [b.grad_data for d in ddps for b in d.buffers + d.expert_parallel_buffers]
    grad_tensors += [p.grad for p in params if p.grad is not None]
    grads, g_ids = _sum_storages(grad_tensors, w_ids)
    opt_tensors = []
    for o in sub_optimizers(opt):
        inner = getattr(o, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            opt_tensors += list(group["params"])
        for state in inner.state.values():
            opt_tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    optimizer, _ = _sum_storages(opt_tensors, w_ids | g_ids)
    return {"weights": weights, "grads": grads, "optimizer": optimizer,
            "params": sum(p.numel() for p in params)}


# ---- saved activations ----------------------------------------------------------------------------
@dataclasses.dataclass
class _Record:
    nbytes: int
    where: str  # "layer" | "decoder" | "outside"
    site: str  # micro-batch / chunk / layer: a storage saved at two sites is shared
    forward: bool
    key: int = 0  # the storage's data pointer (unique while the storage is alive)
    tensor: Any = None  # a weak reference to the first tensor saved: alive = the storage is the same one
    refs: int = 0
    shared: bool = False
    kept: bool = False  # still alive when its micro-batch's forward ended (not a no-grad transient)


class _Saved:
    """What the pack hook hands autograd: the tensor, and a count of this storage's live saves that drops
    when autograd frees it."""

    __slots__ = ("tensor", "record", "meter")

    def __init__(self, tensor: torch.Tensor, record: _Record, meter: SavedTensorMeter) -> None:
        self.tensor, self.record, self.meter = tensor, record, meter
        record.refs += 1

    def __del__(self) -> None:
        self.meter._release(self.record)


class SavedTensorMeter:
    """Bytes autograd saves for the backward over one training step (module docstring). Use
    ``forward_step(fn)`` as megatron's forward_step_func and run the step inside ``with meter:``."""

    def __init__(self, chunks: list, exclude: set[int]) -> None:
        self.exclude = exclude
        self.records: list[_Record] = []
        self.live: dict[int, _Record] = {}
        self.released: dict[int, _Record] = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self.forward = False
        self.micro = -1
        self.stack: list[str] = []
        self.layers_entered = 0
        self._handles = []
        self._hooks = None
        for c, chunk in enumerate(chunks):
            self._track(chunk.decoder, lambda c=c: f"c{c}/decoder@{self.layers_entered}", "decoder")
            for i, layer in enumerate(chunk.decoder.layers):
                self._track(layer, lambda c=c, i=i: f"c{c}/L{i}", "layer", enter=True)
            norm = getattr(chunk.decoder, "final_layernorm", None)
            if norm is not None:
                self._track(norm, lambda c=c: f"c{c}/final_norm", "outside")

    def _track(self, module: torch.nn.Module, site, where: str, enter: bool = False) -> None:
        def pre(mod, args):
            if enter:
                self.layers_entered += 1
            self.stack.append((where, site))

        def post(mod, args, out):
            self.stack.pop()

        self._handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    # saved_tensors_hooks
    def _pack(self, t: torch.Tensor):
        s = _storage(t)
        if s is None or s[0] in self.exclude:
            return t
        where, site = self.stack[-1] if self.stack else ("outside", lambda: "outside")
        site = f"mb{self.micro}/{site()}"  # at save time: a checkpoint's site is the layer it starts at
        rec = self.live.get(s[0])
        if rec is None:
            old = self.released.pop(s[0], None)
            if old is not None and old.tensor() is not None:
                # saved again after autograd let it go, while its first tensor lives on: a persistent tensor
                # (megatron's cached RoPE frequencies), not a new one at a reused address
                rec = old
                rec.shared = rec.shared or (rec.site != site and self.forward)
            else:
                rec = _Record(s[1], where, site, self.forward, key=s[0], tensor=weakref.ref(t))
                self.records.append(rec)
            self.live[s[0]] = rec
            self.live_bytes += s[1]
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        elif rec.site != site and self.forward:
            rec.shared = True
        return _Saved(t, rec, self)

    @staticmethod
    def _unpack(obj):
        return obj.tensor if isinstance(obj, _Saved) else obj

    def _release(self, rec: _Record) -> None:
        rec.refs -= 1
        if rec.refs == 0 and self.live.get(rec.key) is rec:
            del self.live[rec.key]
            self.released[rec.key] = rec
            self.live_bytes -= rec.nbytes

    def __enter__(self) -> SavedTensorMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()

    def forward_step(self, fn):
        """megatron's forward_step_func ``fn`` with its model call and its loss function counted as the
        forward of a new micro-batch."""
        meter = self

        def step(data_iterator, model):
            meter.micro += 1
            with meter._phase_forward():
                out, loss_func = fn(data_iterator, model)

            def loss(*args, **kwargs):
                with meter._phase_forward():
                    return loss_func(*args, **kwargs)

            return out, loss

        return step

    @contextlib.contextmanager
    def _phase_forward(self) -> Iterator[None]:
        self.forward = True
        try:
            yield
        finally:
            self.forward = False
            # what autograd still holds now is saved for the backward; a save whose graph was dropped at once
            # (torch's composite norm packs even under no_grad, inside a full-recompute checkpoint) is not
            for rec in self.live.values():
                rec.kept = rec.kept or rec.forward

    def summary(self, layers: int, microbatches: int) -> dict[str, float]:
        """Forward-saved bytes per layer and micro-batch (layers and the decoder's own checkpoints),
        outside the layers per micro-batch, shared (once), and the step's peak of live saved bytes."""
        fwd = [r for r in self.records if r.forward and r.kept]
        per_layer = sum(r.nbytes for r in fwd if not r.shared and r.where in ("layer", "decoder"))
        outside = sum(r.nbytes for r in fwd if not r.shared and r.where == "outside")
        return {"per_layer": per_layer / (layers * microbatches) if layers else 0.0,
                "outside": outside / microbatches,
                "shared": float(sum(r.nbytes for r in fwd if r.shared)),
                "peak": float(self.peak_bytes)}


# ---- the GPU's code paths on the CPU --------------------------------------------------------------
@contextlib.contextmanager
def gpu_code_paths() -> Iterator[None]:
    """megatron's unfused RoPE (what CUDA runs: ``apply_rope_fusion`` is off) instead of the CPU's copy-free
    patch, and core attention through cpu_attention.c (FlashAttention's saved tensors) on any CPU."""
    from megatron.core.models.common.embeddings import rope_utils

    patched = rope_utils._apply_rotary_pos_emb_bshd
    original = getattr(patched, "__wrapped__", patched) if getattr(patched, "_tessera_rope_patch", False) else patched
    env = os.environ.get("TESSERA_CPU_ATTENTION")
    rope_utils._apply_rotary_pos_emb_bshd = original
    os.environ["TESSERA_CPU_ATTENTION"] = "1"
    try:
        yield
    finally:
        rope_utils._apply_rotary_pos_emb_bshd = patched
        if env is None:
            os.environ.pop("TESSERA_CPU_ATTENTION", None)
        else:
            os.environ["TESSERA_CPU_ATTENTION"] = env


# ---- one rank ----------------------------------------------------------------------------------------
def measure(cfg: TrainConfig, modes: tuple[str, ...] = RECOMPUTE_MODES) -> dict[str, Any]:
    """This rank's bytes for one training step per recompute mode. Needs torch.distributed (torchrun, or one
    process: ``tessera.model.parallel.init_distributed``); sets megatron's parallel state for the layout."""
    from megatron.core import parallel_state as ps

    from tessera.model.parallel import init_distributed, initialize_parallel

    init_distributed()
    world = world_size()
    bf16 = cfg.precision == "bf16"
    model_cfg = dataclasses.replace(cfg.model, params_dtype="bfloat16" if bf16 else "float32")
    layout = ParallelLayout.from_train_config(cfg, world, model_cfg, precision="bf16" if bf16 else "fp32")
    initialize_parallel(layout.tp, layout.pp, layout.vp, cfg.train.seed)
    out: dict[str, Any] = {
        "rank": rank(), "tp_rank": ps.get_tensor_model_parallel_rank(),
        "pp_rank": ps.get_pipeline_model_parallel_rank(), "dp_rank": ps.get_data_parallel_rank(), "modes": {}}
    for mode in modes:
        m = dataclasses.replace(model_cfg, recompute=mode,
                                recompute_num_layers=model_cfg.recompute_num_layers if mode == "full" else None)
        out["modes"][mode] = _measure_step(cfg, m, layout, bf16)
    return out


def _measure_step(cfg: TrainConfig, model_cfg, layout: ParallelLayout, bf16: bool) -> dict[str, float]:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from tessera.pretrain.mock import train_mock_batch
    from tessera.pretrain.optimizer import get_optimizer
    from tessera.pretrain.scale import ParamGather, ddp_config, transformer_overrides, wire_schedule
    from tessera.pretrain.step import BatchMover, ForwardStep, model_kwargs, stage_roles
    from tessera.pretrain.trainer import _build_model_chunks

    run_cfg = dataclasses.replace(cfg, model=model_cfg)
    chunks, ddps = _build_model_chunks(run_cfg, bf16, model_cfg, ddp_config(run_cfg, layout.dp),
                                       **transformer_overrides(run_cfg, deterministic=False, cuda=False))
    opt = get_optimizer(cfg.optim, ddps, bf16, distributed=layout.distributed_optimizer,
                        overlap_param_gather=cfg.parallel.overlap_param_gather)
    wire_schedule(chunks, ddps, opt, run_cfg)
    gather = ParamGather(run_cfg, chunks, ddps)
    gather.start()
    n_micro = layout.microbatches
    dp_rank = ps.get_data_parallel_rank()
    mover = BatchMover("cpu", *stage_roles(chunks))
    micro = mover.all([train_mock_batch(run_cfg, 1, dp_rank * n_micro + i) for i in range(n_micro)])
    batches = [iter(micro) for _ in ddps] if len(ddps) > 1 else iter(micro)
    meter = SavedTensorMeter(chunks, param_storages(ddps))
    step = meter.forward_step(ForwardStep(z_loss_weight=model_cfg.z_loss_weight, model_kwargs=model_kwargs(bf16)))
    for d in ddps:
        d.zero_grad_buffer()
    opt.zero_grad()
    with gpu_code_paths(), meter:  # after build_model, which installs the CPU's RoPE patch
        get_forward_backward_func()(forward_step_func=step, data_iterator=batches, model=ddps,
                                    num_microbatches=n_micro, seq_length=layout.seq(model_cfg),
                                    micro_batch_size=layout.micro_batch, forward_only=False)
    opt.step()  # megatron's: the optimizer state is created lazily by the first step
    gather.after_step(True)
    gather.close()
    result = {**state_bytes(ddps, opt),
              **meter.summary(sum(len(c.decoder.layers) for c in chunks), n_micro),
              "layers": sum(len(c.decoder.layers) for c in chunks), "microbatches": n_micro,
              "first_stage": any(c.pre_process for c in chunks), "last_stage": any(c.post_process for c in chunks)}
    del chunks, ddps, opt, gather, meter, micro, batches
    gc.collect()
    return result


def main(argv: list[str] | None = None) -> int:
    """Worker entry (under torchrun): ``python -m tessera.bench.memory_measure CONFIG.yaml OUT.json MODES``;
    rank 0 writes every rank's measurement to OUT.json."""
    import sys

    from tessera.pretrain.config import load_train_config

    args = sys.argv[1:] if argv is None else argv
    cfg = load_train_config(args[0])
    modes = tuple(args[2].split(",")) if len(args) > 2 else RECOMPUTE_MODES
    mine = measure(cfg, modes)
    ranks = [None] * world_size()
    torch.distributed.all_gather_object(ranks, mine)
    if rank() == 0:
        atomic_write_json(args[1], ranks, indent=None)
    torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
