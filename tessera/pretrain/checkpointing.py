"""Full-state training checkpoints: what a training run saves beside the model, its load, and auto-resume.

The directory itself (format, atomic save, weight load, ``latest``, rotation) is tessera.model.checkpoint's;
this module adds the training state to its dist_checkpointing save. SIGTERM: preemption.py; test kills: faults.py.

One checkpoint is a ``tessera.model.checkpoint`` directory (tessera.json, config.yaml, vocab.json, dist/)
whose dist_checkpointing save holds, beside ``model``:

    optimizer    megatron ``optimizer.sharded_state_dict(model_sd)``: Adam moments (and fp32 main params
                 under bf16) as ShardedTensors keyed like the model's, so they reshard across TP/PP/DP
    scheduler    ``OptimizerParamScheduler.state_dict()`` (common: written once by rank 0)
    train_state  {step, bad_steps, data (``BlendedBatchIterator.state_dict()`` or None for the mock
                 dataset, which is keyed by step), layout (tp, pp, dp), optimizer metadata} (common)
    rng_state    one ShardedObject per rank, at offset (pp_rank, tp_rank, dp_rank) of shape (pp, tp, dp):
                 python, numpy, torch CPU, CUDA (when present) and megatron's RNG-tracker states

The ``config.yaml`` holds the run config as asked plus the ``resolved:`` section (its ``model`` is the model
saved, which ``read_model_config`` returns). Saves and loads are fully parallel by default (megatron-LM's
``--ckpt-fully-parallel-save/load``: ``FullyParallelSave/LoadStrategyWrapper`` over the data-parallel
group; ``train.ckpt_fully_parallel_save/load: false`` turns them off). The distributed optimizer's state
is saved ``fully_reshardable``, so it loads under another TP / PP / DP layout.

RNG states only mean something for the rank that drew them, so they are restored only when the
resuming run has the same (tp, pp, dp) layout; under another layout every rank reseeds from
(train.seed, step) instead and says so (weights, optimizer, scheduler and data position still load exactly).

Resume (``train.resume: auto``): if ``RUN/checkpoints/latest`` exists, everything above is loaded and
training continues at step + 1; ``RUN/metrics.jsonl`` keeps only rows up to that step (a killed run may
have logged steps it never saved). ``train.init_from`` loads only the model weights of another
checkpoint (a fresh optimizer, step 1) when there is nothing to resume.

A LoRA run (``finetune.lora``) saves adapter checkpoints: ``model`` holds only the adapters (the optimizer
state is the adapters' too) and tessera.json records the LoRA settings and the base (``train.init_from``:
path, SHA-256 of its files, step). Its start and its resume load the base weights from ``train.init_from``
(every part but the adapters), then, resuming, the adapters and the rest from the adapter checkpoint,
after checking that ``train.init_from`` is the recorded base (same SHA-256) and the LoRA settings match.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tessera.config import to_dict
from tessera.model.checkpoint import (
    DIST_DIR,
    BaseReference,
    CheckpointError,
    adapter_meta,
    latest_checkpoint,
    load_model_state,
    load_sharded,
    model_sharded_state_dict,
    read_checkpoint_meta,
    read_model_config,
    resolve_checkpoint,
    rotate_checkpoints,
    save_model_checkpoint,
    step_dir_name,
    write_latest,
)
from tessera.utils import atomic_write_text, rank

TRAIN_STATE_VERSION = 1
# megatron's reshardable layout for the distributed optimizer (a checkpoint loads under any TP / PP / DP);
# the plain optimizer ignores it. The data-parallel group is added when saving / loading (megatron-LM does).
OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}
# model fields that only decide how the same weights are computed with: a resume may change them
_RESUME_FREE_FIELDS = frozenset({"recompute", "recompute_method", "recompute_num_layers"})
# ... and init_from may also change the dropout
_INIT_FROM_FREE_FIELDS = _RESUME_FREE_FIELDS | {"hidden_dropout", "attention_dropout"}


@dataclass
class ResumeState:
    """Where the loop starts: ``step`` is the last completed step (0 = fresh run)."""

    step: int = 0
    bad_steps: int = 0
    source: Path | None = None  # the checkpoint loaded (resume or init_from), if any
    rng_restored: bool = False


# ---- layout / rank helpers ----------------------------------------------------------------------
def _layout() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _run_part(model: Any) -> str:
    """What a training checkpoint of this model holds: ``adapters`` for a LoRA model, else ``all``."""
    from tessera.model.lora import has_lora

    return "adapters" if has_lora(model) else "all"


# ---- RNG ---------------------------------------------------------------------------------------
def capture_rng_state() -> dict:
    """Every RNG a training step draws from (python, numpy, torch CPU, CUDA, megatron's tracker), as copies:
    saved in checkpoints, and put back by held-out evaluation (tessera.pretrain.evaluate)."""
    from megatron.core import tensor_parallel

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": {k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }


def restore_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded(data: Any) -> Any:
    """This rank's RNG states as one element of a (pp, tp, dp) grid of objects."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    lay = _layout()
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank())
    return ShardedObject("rng_state", data, (lay["pp"], lay["tp"], lay["dp"]), offset, replica_id=0)


def _reseed(seed: int, step: int) -> None:
    """Deterministic RNG for a resume under another layout: a function of (seed, step) only."""
    from megatron.core import tensor_parallel

    s = (seed * 1_000_003 + step) % (2**31)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    tensor_parallel.model_parallel_cuda_manual_seed(s)


# ---- save --------------------------------------------------------------------------------------
def _fully_parallel_save_strategy():
    """megatron-LM's --ckpt-fully-parallel-save: the default torch_dist writer wrapped so that the data-parallel
    replicas split the writing of every replicated tensor instead of DP rank 0 writing it alone."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy("torch_dist"),
                                            ps.get_data_parallel_group(with_context_parallel=True))


def _fully_parallel_load_strategy(ckpt_dir: Path):
    """megatron-LM's --ckpt-fully-parallel-load: each data-parallel replica reads a share and they exchange it."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(str(ckpt_dir)),
                                            ps.get_data_parallel_group(with_context_parallel=True))


def _optim_metadata(saved: dict | None = None) -> dict:
    """The optimizer's sharded-state-dict metadata: megatron's reshardable format. Its default exchange
    all-gathers each rank's shard with NCCL (``.cuda()`` copies: CUDA only); without CUDA the gloo variant
    (``..._mem_efficient``) gathers on data-parallel rank 0 instead. megatron reads the two formats alike."""
    from megatron.core import parallel_state as ps

    return {**(saved or OPTIM_METADATA), "dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True),
            "distrib_optim_fully_reshardable_mem_efficient": not torch.cuda.is_available()}


def save_checkpoint(run: str | Path, step: int, *, model: Any, optimizer: Any, scheduler: Any, cfg: Any,
                    resolved: Any, vocab: Any = None, data_iterator: Any = None, bad_steps: int = 0,
                    base: BaseReference | None = None) -> Path:
    """Collective: write ``RUN/checkpoints/step_N`` (full state), then ``latest``, then rotate. ``cfg`` is the
    run config as asked, ``resolved`` what the run resolved (its ``model`` is the model saved). A LoRA model
    writes an adapter checkpoint referring to ``base``."""
    from tessera.model.lora import lora_spec_of
    from tessera.pretrain.faults import kill_step, sigkill

    checkpoints = Path(run) / "checkpoints"
    name = step_dir_name(step)
    part = _run_part(model)
    meta = {"layout": _layout()}
    if part == "adapters":
        if base is None:
            raise CheckpointError("an adapter checkpoint needs its base reference (train.init_from)")
        meta.update(lora=lora_spec_of(model).to_dict(), base=base.to_dict())
    model_sd = model_sharded_state_dict(model, part)
    extra = {
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=False, metadata=_optim_metadata()),
        "scheduler": scheduler.state_dict(),
        "train_state": {
            "version": TRAIN_STATE_VERSION, "step": int(step), "bad_steps": int(bad_steps),
            "data": data_iterator.state_dict() if data_iterator is not None else None,
            "layout": _layout(), "optim_metadata": OPTIM_METADATA,
        },
        "rng_state": _rng_sharded(capture_rng_state()),
    }
    kill = kill_step("save")

    def before_commit(tmp: Path) -> None:
        if kill == step:  # crash-consistency test: die with a complete-looking tmp dir never renamed
            sigkill(f"TESSERA_DEBUG_KILL_AT=save:{step}: SIGKILL before renaming {tmp.name}")

    strategy = _fully_parallel_save_strategy() if cfg.train.ckpt_fully_parallel_save else None
    path = save_model_checkpoint(model, resolved.model, checkpoints / name, vocab=vocab,
                                 extra_config={**to_dict(cfg), "resolved": to_dict(resolved)},
                                 step=step, extra_state=extra, extra_meta=meta,
                                 before_commit=before_commit, save_strategy=strategy, part=part)
    if rank() == 0:
        write_latest(checkpoints, name)  # updated last: `latest` never names a partial checkpoint
        rotate_checkpoints(checkpoints, cfg.train.keep_last_n)
    _barrier()
    return path


# ---- load --------------------------------------------------------------------------------------
def check_model_config(ckpt: Path, model_cfg: Any, ignore: frozenset[str] = frozenset()) -> None:
    """Raise CheckpointError naming every field where the checkpoint's model config and the run's differ."""
    saved = to_dict(read_model_config(ckpt))
    mine = to_dict(model_cfg)
    diff = sorted(k for k in set(saved) | set(mine) if k not in ignore and saved.get(k) != mine.get(k))
    if diff:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs run {mine.get(k)!r}" for k in diff)
        raise CheckpointError(f"{ckpt}: the checkpoint's model config differs from this run's ({detail})")


def _torch_adam_distributed(optimizer: Any):
    """The DistributedOptimizer when it runs over torch's Adam (megatron's fallback without Transformer Engine or
    apex, as on every CPU), else None. megatron-core 0.16.1 mishandles that case when loading its reshardable
    state: a fresh optimizer's ``state_dict()`` asserts on the missing per-parameter ``step``, and the
    parameter-state load looks for a ``step`` entry the checkpoint does not hold (torch keeps one per
    parameter, megatron stores it once in the param groups)."""
    from megatron.core.optimizer import distrib_optimizer

    subs = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    if distrib_optimizer.HAVE_APEX_OR_TE or len(subs) != 1:
        return None
    o = subs[0]
    return o if isinstance(o, distrib_optimizer.DistributedOptimizer) and o.optimizer is not None else None


def _prepare_optimizer_for_load(optimizer: Any) -> None:
    """Give a fresh torch-Adam DistributedOptimizer megatron's own dummy state (one zero-gradient step) so its
    ``sharded_state_dict(is_loading=True)`` works; the load then overwrites it, main parameters included
    (and the model's weights are loaded too)."""
    o = _torch_adam_distributed(optimizer)
    if o is not None and not o.optimizer.state:
        o._init_optimizer_states_with_dummy_values()


def _load_optimizer_state(optimizer: Any, state: dict) -> None:
    """``optimizer.load_state_dict(state)``; for a torch-Adam DistributedOptimizer the same in megatron's two
    parts (common state, then the reshardable parameter state), with torch's per-parameter ``step`` set
    aside while the parameter state is copied in (the step itself comes from the common state). megatron
    puts ONE step tensor in every parameter's state, which torch's Adam then increments in place once per
    parameter per step: each parameter gets its own copy back."""
    o = _torch_adam_distributed(optimizer)
    if o is None or state.get("param_state_sharding_type") != "fully_reshardable":
        optimizer.load_state_dict(state)
        return
    common = {k: v for k, v in state.items() if k not in ("param_state", "param_state_sharding_type")}
    o.load_state_dict(common)
    steps = {p: st.pop("step") for p, st in o.optimizer.state.items() if "step" in st}
    try:
        o.load_parameter_state_from_fully_reshardable(state["param_state"])
    finally:
        for p, step in steps.items():
            o.optimizer.state[p]["step"] = step.clone()


def check_adapters(ckpt: Path, meta: dict, model: Any, base: BaseReference | None) -> None:
    """An adapter checkpoint resumes only into a LoRA run with the same LoRA shape and the same base files;
    a full checkpoint only into a run without LoRA."""
    from tessera.model.lora import lora_spec_of

    saved, spec = adapter_meta(meta), lora_spec_of(model)
    if (saved is None) != (spec is None):
        what = "an adapter checkpoint (LoRA)" if saved is not None else "a full-model checkpoint"
        raise CheckpointError(f"{ckpt}: {what}, but this run {'has no' if spec is None else 'has'} finetune.lora; "
                              "resume with the same finetune settings")
    if saved is None:
        return
    mine = spec.to_dict()
    diff = [k for k in ("rank", "alpha", "targets") if saved.get(k) != mine[k]]
    if diff:
        raise CheckpointError(f"{ckpt}: saved with finetune.lora {', '.join(f'{k}={saved.get(k)!r}' for k in diff)}, "
                              f"this run asks {', '.join(f'{k}={mine[k]!r}' for k in diff)}")
    recorded = BaseReference.from_meta(meta, ckpt)
    if base is None or base.sha256 != recorded.sha256:
        got = f"{base.path} (sha256 {base.sha256[:16]}…)" if base is not None else "no train.init_from"
        raise CheckpointError(f"{ckpt}: its adapters were trained on base {recorded.path} (sha256 "
                              f"{recorded.sha256[:16]}…, step {recorded.step}), but this run has {got}")


def load_checkpoint(ckpt: str | Path, *, model: Any, optimizer: Any, scheduler: Any, cfg: Any, model_cfg: Any,
                    data_iterator: Any = None, base: BaseReference | None = None) -> ResumeState:
    """Collective: restore model, optimizer, scheduler, data position and (same layout) RNG from ``ckpt``.
    ``model_cfg``: the model this run built (compared with the checkpoint's). A LoRA run's adapter checkpoint:
    the base weights come from ``base`` (checked against the checkpoint's record), the rest from ``ckpt``."""
    from megatron.core import dist_checkpointing

    ckpt = Path(ckpt)
    meta = read_checkpoint_meta(ckpt)
    check_model_config(ckpt, model_cfg, ignore=_RESUME_FREE_FIELDS)
    check_adapters(ckpt, meta, model, base)
    part = _run_part(model)
    common = dist_checkpointing.load_common_state_dict(str(ckpt / DIST_DIR))
    ts = common.get("train_state")
    if not isinstance(ts, dict) or ts.get("version") != TRAIN_STATE_VERSION:
        raise CheckpointError(f"{ckpt}: holds no training state (a model-only checkpoint?); "
                              "use train.init_from to start from its weights")
    if (ts["data"] is None) != (data_iterator is None):
        has = "a data position" if ts["data"] is not None else "no data position (mock dataset)"
        raise CheckpointError(f"{ckpt}: saved with {has}, but this run {'has' if data_iterator else 'has no'} "
                              "training data (data.path / data.sources); resume with the same data setting or use "
                              "train.init_from")
    same_layout = ts["layout"] == _layout()
    if part == "adapters":  # the base weights first, from train.init_from (checked to be the recorded base)
        load_weights(base.path, model, model_cfg, fully_parallel=cfg.train.ckpt_fully_parallel_load)
    model_sd = model_sharded_state_dict(model, part)
    sharded = dict(model_sd)

    _prepare_optimizer_for_load(optimizer)
    sharded["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                        metadata=_optim_metadata(ts.get("optim_metadata")))
    if same_layout:
        sharded["rng_state"] = _rng_sharded(None)
    strategy = _fully_parallel_load_strategy(ckpt / DIST_DIR) if cfg.train.ckpt_fully_parallel_load else None
    state = load_sharded(ckpt, sharded, strategy)
    load_model_state(model, state["model"], part)
    _load_optimizer_state(optimizer, state["optimizer"])
    # the run's schedule settings win (train.steps may be extended on resume); the position comes from the file
    scheduler.override_opt_param_scheduler = True
    scheduler.load_state_dict(state["scheduler"])
    if data_iterator is not None:
        data_iterator.load_state_dict(ts["data"])
    step = int(ts["step"])
    if same_layout:
        restore_rng_state(state["rng_state"])
    else:
        _reseed(cfg.train.seed, step)
        if rank() == 0:
            print(f"resume: layout {ts['layout']} -> {_layout()}: RNG states not restored, reseeded from "
                  f"(train.seed, step {step})", flush=True)
    return ResumeState(step=step, bad_steps=int(ts.get("bad_steps", 0)), source=ckpt, rng_restored=same_layout)


def load_weights(ckpt: str | Path, model: Any, model_cfg: Any, fully_parallel: bool = False) -> Path:
    """``train.init_from``: only the model weights of a checkpoint (any layout); returns the resolved path.
    A LoRA model loads every weight but its adapters (which keep their fresh values)."""
    ckpt = resolve_checkpoint(ckpt)
    meta = read_checkpoint_meta(ckpt)
    if adapter_meta(meta) is not None:
        raise CheckpointError(f"{ckpt}: an adapter checkpoint (LoRA) cannot start a run (train.init_from); "
                              "start from a full checkpoint, e.g. its base, or merge it first "
                              "(tessera.model.load merges adapters; docs/finetuning.md)")
    check_model_config(ckpt, model_cfg, ignore=_INIT_FROM_FREE_FIELDS)
    part = "base" if _run_part(model) == "adapters" else "all"
    strategy = _fully_parallel_load_strategy(ckpt / DIST_DIR) if fully_parallel else None
    state = load_sharded(ckpt, model_sharded_state_dict(model, part), strategy)
    load_model_state(model, state["model"], part)
    return ckpt


def resume(cfg: Any, run: str | Path, *, model: Any, optimizer: Any, scheduler: Any, model_cfg: Any,
           data_iterator: Any = None, base: BaseReference | None = None) -> ResumeState:
    """Start-up: resume from ``latest`` (``train.resume: auto``), else ``train.init_from`` weights, else fresh.
    ``base``: a LoRA run's base reference (``train.init_from``, hashed).

    Also trims ``RUN/metrics.jsonl`` to the rows up to the step training continues from (rank 0)."""
    mode = cfg.train.resume
    if mode not in ("auto", "never"):
        raise CheckpointError(f"train.resume: expected auto or never, got {mode!r}")
    latest = latest_checkpoint(run) if mode == "auto" else None
    if latest is not None:
        st = load_checkpoint(latest, model=model, optimizer=optimizer, scheduler=scheduler, cfg=cfg,
                             model_cfg=model_cfg, data_iterator=data_iterator, base=base)
        msg = f"resumed from {latest} (step {st.step}){'' if st.rng_restored else ', RNG reseeded'}"
    elif cfg.train.init_from:
        st = ResumeState(source=load_weights(cfg.train.init_from, model, model_cfg,
                                             fully_parallel=cfg.train.ckpt_fully_parallel_load))
        msg = f"initialised weights from {st.source}"
    else:
        st, msg = ResumeState(), ""
    if rank() == 0:
        trim_metrics(Path(run) / "metrics.jsonl", st.step)
        if msg:
            print(msg, flush=True)
    _barrier()
    return st


def trim_metrics(path: str | Path, last_step: int) -> int:
    """Keep only the rows of a metrics.jsonl with ``step <= last_step`` (and drop a torn last line);
    atomic replace. Returns the number of rows dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            ok = int(rec["step"]) <= last_step
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(x + "\n" for x in kept))
    return dropped


__all__ = [
    "ResumeState", "check_model_config", "latest_checkpoint", "load_checkpoint",
    "load_weights", "resume", "rotate_checkpoints", "save_checkpoint", "trim_metrics",
]
