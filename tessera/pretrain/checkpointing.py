"""Full-state training checkpoints: save, auto-resume, rotation, SIGTERM, crash-consistency hooks.

One checkpoint is a ``tessera.model.checkpoint`` directory (tessera.json, config.yaml, vocab.json, dist/)
whose dist_checkpointing save holds, beside ``model``:

    optimizer    megatron ``optimizer.sharded_state_dict(model_sd)``: Adam moments (and fp32 main params
                 under bf16) as ShardedTensors keyed like the model's, so they reshard across TP/PP/DP
    scheduler    ``OptimizerParamScheduler.state_dict()`` (common: written once by rank 0)
    train_state  {step, bad_steps, data (``WovenBatchIterator.state_dict()`` or None for the mock
                 dataset, which is keyed by step), layout (tp, pp, dp), optimizer metadata} (common)
    rng_state    one ShardedObject per rank, at offset (pp_rank, tp_rank, dp_rank) of shape (pp, tp, dp):
                 python, numpy, torch CPU, CUDA (when present) and megatron's RNG-tracker states

RNG states only mean something for the rank that drew them, so they are restored only when the
resuming run has the same (tp, pp, dp) layout; under another layout every rank reseeds from
(train.seed, step) instead and says so (weights, optimizer, scheduler and data position still load exactly).

Resume (``train.resume: auto``): if ``RUN/checkpoints/latest`` exists, everything above is loaded and
training continues at step + 1; ``RUN/metrics.jsonl`` keeps only rows up to that step (a killed run may
have logged steps it never saved). ``train.init_from`` loads only the model weights of another
checkpoint (a fresh optimizer, step 1) when there is nothing to resume.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tessera.config import to_dict
from tessera.model.checkpoint import (
    DIST_DIR,
    LATEST_FILE,
    META_FILE,
    CheckpointError,
    model_sharded_state_dict,
    read_checkpoint_meta,
    read_model_config,
    resolve_checkpoint,
    save_model_checkpoint,
    step_dir_name,
    write_latest,
)

TRAIN_STATE_VERSION = 1
# megatron's reshardable layout for the distributed optimizer; the plain optimizer ignores it
OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}
# model fields that do not change the weights: init_from may change them, resume may not
_INIT_FROM_FREE_FIELDS = frozenset({"hidden_dropout", "attention_dropout"})
_STEP_DIR = re.compile(r"^step_(\d+)$")


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


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _chunks(model: Any) -> list:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _load_model_state(model: Any, state: dict) -> None:
    chunks = _chunks(model)
    if len(chunks) == 1:
        chunks[0].load_state_dict(state)
    else:  # virtual pipeline: model_sharded_state_dict nests each chunk under chunk{i}
        for i, c in enumerate(chunks):
            c.load_state_dict(state[f"chunk{i}"])


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
def save_checkpoint(run: str | Path, step: int, *, model: Any, optimizer: Any, scheduler: Any, cfg: Any,
                    vocab: Any = None, data_iterator: Any = None, bad_steps: int = 0) -> Path:
    """Collective: write ``RUN/checkpoints/step_N`` (full state), then ``latest``, then rotate."""
    checkpoints = Path(run) / "checkpoints"
    name = step_dir_name(step)
    model_sd = model_sharded_state_dict(model)
    extra = {
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=False, metadata=OPTIM_METADATA),
        "scheduler": scheduler.state_dict(),
        "train_state": {
            "version": TRAIN_STATE_VERSION, "step": int(step), "bad_steps": int(bad_steps),
            "data": data_iterator.state_dict() if data_iterator is not None else None,
            "layout": _layout(), "optim_metadata": OPTIM_METADATA,
        },
        "rng_state": _rng_sharded(capture_rng_state()),
    }
    kill = debug_kill_step(cfg, "save")

    def before_commit(tmp: Path) -> None:
        if kill == step:  # crash-consistency test: die with a complete-looking tmp dir never renamed
            _sigkill(f"train.debug_kill_at save:{step}: SIGKILL before renaming {tmp.name}")

    path = save_model_checkpoint(model, cfg.model, checkpoints / name, vocab=vocab, extra_config=to_dict(cfg),
                                 step=step, extra_state=extra, extra_meta={"layout": _layout()},
                                 before_commit=before_commit)
    if _rank() == 0:
        write_latest(checkpoints, name)  # updated last: `latest` never names a partial checkpoint
        rotate_checkpoints(checkpoints, cfg.train.keep_last_n)
    _barrier()
    return path


def _checkpoint_steps(checkpoints: Path) -> list[tuple[int, Path]]:
    out = []
    for p in checkpoints.iterdir() if checkpoints.is_dir() else []:
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def rotate_checkpoints(checkpoints: str | Path, keep_last_n: int) -> list[Path]:
    """Delete all but the newest ``keep_last_n`` complete step dirs (0 = keep all), never the one ``latest``
    names, and any leftover ``*.tmp-*`` / ``*.old-*`` dirs of killed saves. Call after ``latest`` is written.
    Returns what was removed."""
    checkpoints = Path(checkpoints)
    latest = checkpoints / LATEST_FILE
    keep = {latest.read_text().strip()} if latest.is_file() else set()
    removed = []
    complete = [p for _, p in _checkpoint_steps(checkpoints) if (p / META_FILE).is_file()]
    if keep_last_n > 0:
        removed += [p for p in complete[:-keep_last_n] if p.name not in keep]
    removed += [p for p in checkpoints.iterdir() if p.is_dir() and (".tmp-" in p.name or ".old-" in p.name)]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


# ---- load --------------------------------------------------------------------------------------
def check_model_config(ckpt: Path, model_cfg: Any, ignore: frozenset[str] = frozenset()) -> None:
    """Raise CheckpointError naming every field where the checkpoint's model config and the run's differ."""
    saved = to_dict(read_model_config(ckpt))
    mine = to_dict(model_cfg)
    diff = sorted(k for k in set(saved) | set(mine) if k not in ignore and saved.get(k) != mine.get(k))
    if diff:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs run {mine.get(k)!r}" for k in diff)
        raise CheckpointError(f"{ckpt}: the checkpoint's model config differs from this run's ({detail})")


def _load(ckpt: Path, sharded: dict) -> dict:
    from megatron.core import dist_checkpointing

    try:
        return dist_checkpointing.load(sharded, str(ckpt / DIST_DIR))
    except CheckpointError:
        raise
    except Exception as exc:  # megatron raises several types for missing / mismatched entries
        raise CheckpointError(f"{ckpt / DIST_DIR}: cannot load: {exc}") from exc


def load_checkpoint(ckpt: str | Path, *, model: Any, optimizer: Any, scheduler: Any, cfg: Any,
                    data_iterator: Any = None) -> ResumeState:
    """Collective: restore model, optimizer, scheduler, data position and (same layout) RNG from ``ckpt``."""
    from megatron.core import dist_checkpointing

    ckpt = Path(ckpt)
    read_checkpoint_meta(ckpt)
    check_model_config(ckpt, cfg.model)
    common = dist_checkpointing.load_common_state_dict(str(ckpt / DIST_DIR))
    ts = common.get("train_state")
    if not isinstance(ts, dict) or ts.get("version") != TRAIN_STATE_VERSION:
        raise CheckpointError(f"{ckpt}: holds no training state (a model-only checkpoint?); "
                              "use train.init_from to start from its weights")
    if (ts["data"] is None) != (data_iterator is None):
        has = "a data position" if ts["data"] is not None else "no data position (mock dataset)"
        raise CheckpointError(f"{ckpt}: saved with {has}, but this run {'has' if data_iterator else 'has no'} "
                              "data.path; resume with the same data setting or use train.init_from")
    same_layout = ts["layout"] == _layout()
    model_sd = model_sharded_state_dict(model)
    sharded = dict(model_sd)
    sharded["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                        metadata=ts.get("optim_metadata") or OPTIM_METADATA)
    if same_layout:
        sharded["rng_state"] = _rng_sharded(None)
    state = _load(ckpt, sharded)
    _load_model_state(model, state["model"])
    optimizer.load_state_dict(state["optimizer"])
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
        if _rank() == 0:
            print(f"resume: layout {ts['layout']} -> {_layout()}: RNG states not restored, reseeded from "
                  f"(train.seed, step {step})", flush=True)
    return ResumeState(step=step, bad_steps=int(ts.get("bad_steps", 0)), source=ckpt, rng_restored=same_layout)


def load_weights(ckpt: str | Path, model: Any, model_cfg: Any) -> Path:
    """``train.init_from``: only the model weights of a checkpoint (any layout); returns the resolved path."""
    ckpt = resolve_checkpoint(ckpt)
    read_checkpoint_meta(ckpt)
    check_model_config(ckpt, model_cfg, ignore=_INIT_FROM_FREE_FIELDS)
    state = _load(ckpt, model_sharded_state_dict(model))
    _load_model_state(model, state["model"])
    return ckpt


def latest_checkpoint(run: str | Path) -> Path | None:
    """The checkpoint ``RUN/checkpoints/latest`` names, None when there is no ``latest`` file."""
    if not (Path(run) / "checkpoints" / LATEST_FILE).is_file():
        return None
    return resolve_checkpoint(Path(run) / "checkpoints")  # raises if latest names an incomplete dir


def resume(cfg: Any, run: str | Path, *, model: Any, optimizer: Any, scheduler: Any,
           data_iterator: Any = None) -> ResumeState:
    """Start-up: resume from ``latest`` (``train.resume: auto``), else ``train.init_from`` weights, else fresh.

    Also trims ``RUN/metrics.jsonl`` to the rows up to the step training continues from (rank 0)."""
    mode = cfg.train.resume
    if mode not in ("auto", "never"):
        raise CheckpointError(f"train.resume: expected auto or never, got {mode!r}")
    latest = latest_checkpoint(run) if mode == "auto" else None
    if latest is not None:
        st = load_checkpoint(latest, model=model, optimizer=optimizer, scheduler=scheduler, cfg=cfg,
                             data_iterator=data_iterator)
        msg = f"resumed from {latest} (step {st.step}){'' if st.rng_restored else ', RNG reseeded'}"
    elif cfg.train.init_from:
        st = ResumeState(source=load_weights(cfg.train.init_from, model, cfg.model))
        msg = f"initialised weights from {st.source}"
    else:
        st, msg = ResumeState(), ""
    if _rank() == 0:
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
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(x + "\n" for x in kept))
        tmp.replace(path)
    return dropped


# ---- crash-consistency hooks (tests) ---------------------------------------------------------------
def debug_kill_step(cfg: Any, phase: str) -> int | None:
    """``train.debug_kill_at: "PHASE:STEP"`` -> STEP when PHASE matches (phases: ``step``, after step STEP's
    metrics row and before its save; ``save``, inside step STEP's save before its tmp dir is renamed)."""
    spec = getattr(cfg.train, "debug_kill_at", "") or ""
    if not spec:
        return None
    ph, _, st = spec.partition(":")
    if ph not in ("step", "save") or not st.isdigit():
        raise CheckpointError(f"train.debug_kill_at: expected 'step:N' or 'save:N', got {spec!r}")
    return int(st) if ph == phase else None


def _sigkill(message: str) -> None:
    print(message, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def maybe_kill_after_step(cfg: Any, step: int) -> None:
    if debug_kill_step(cfg, "step") == step:
        _sigkill(f"train.debug_kill_at step:{step}: SIGKILL")


__all__ = [
    "ResumeState", "check_model_config", "latest_checkpoint", "load_checkpoint",
    "load_weights", "maybe_kill_after_step", "resume", "rotate_checkpoints", "save_checkpoint", "trim_metrics",
]
