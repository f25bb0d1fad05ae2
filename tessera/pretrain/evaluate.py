"""Held-out evaluation during training: forward only through megatron's schedule, text / image loss and perplexity.

The held-out batches are the SAME at every evaluation (a fresh iterator from step 0 each time), so the
curve compares like with like. Sources, in order:

* ``data.eval_sources`` (or its one-set shorthand ``data.eval_path``): ``tessera data pretokenize``
  directories with the training vocabulary (``tessera demo`` pretokenizes its held-out split there), each
  read through its own blended iterator of one source and evaluated on its own: ``train.eval_steps``
  global batches per set. Several sets report ``eval_loss/NAME``, ``eval_ppl/NAME``, ``eval_tokens/NAME``
  besides the figures over all of them;
* no training data: the mock dataset (deterministic random tokens), disjoint from the training batches;
* training data without held-out sets: no evaluation (said once on rank 0).

Document-masked runs (``data.document_mask``) evaluate as they train: THD rows, the same forward.

Evaluation leaves training exactly as it was: the model goes back to train mode, every RNG state (torch,
CUDA, megatron's tracker) is restored, and the training iterator is never touched, so a run with
evaluation gives the same training losses as one without (tests/test_train_obs.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from megatron.core import parallel_state as ps

from tessera.config import ConfigError
from tessera.model.loss import language_model_loss
from tessera.pretrain.checkpointing import capture_rng_state, restore_rng_state
from tessera.pretrain.config import TrainConfig
from tessera.pretrain.device import training_device
from tessera.pretrain.metrics import CE_KEYS, MODALITIES, step_stats, sum_stats
from tessera.pretrain.mock import heldout_mock_batch
from tessera.pretrain.step import attach_packed_seq_params, schedule_shape

Batch = dict[str, torch.Tensor]


class Evaluator:
    """``Evaluator(cfg, model_chunks, n_micro, dp_rank, dp_size, modality).run() -> {"eval_loss": ...}``.

    Every rank calls ``run`` (it runs the pipeline schedule and all-reduces). ``modality`` is the
    vocabulary's id -> Modality table (per-modality losses), None for the mock dataset. ``batches``
    overrides the held-out source: ``batches(eval_step) -> this rank's micro-batches`` (tests). Host
    batches are copied to ``device`` (default: the training device) once per micro-batch.
    ``forward_backward_func``: megatron's schedule by default; ``model_kwargs``: extra model-call keywords.
    ``vocab``: the training vocabulary, which every held-out set must share."""

    def __init__(self, cfg: TrainConfig, model: list[torch.nn.Module], n_micro: int, dp_rank: int, dp_size: int,
                 modality: torch.Tensor | None = None, batches: Callable[[int], list[Batch]] | None = None,
                 device: torch.device | str | None = None, forward_backward_func: Callable | None = None,
                 model_kwargs: dict | None = None, vocab: Any = None) -> None:
        from tessera.pretrain.step import BatchMover, stage_roles

        self.cfg, self.model, self.n_micro = cfg, model, n_micro
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.device = torch.device(device) if device is not None else training_device()
        self.mover = BatchMover(self.device, *stage_roles([_unwrap(m) for m in model]), modality=modality)
        self._fb = forward_backward_func  # None: megatron's schedule for the current layout
        self.model_kwargs = model_kwargs or {}  # bf16: logits stay bf16 (tessera.pretrain.step.model_kwargs)
        self.sources: dict = {}  # held-out set name -> PackedSource
        self.note = ""
        # set name -> batches(eval_step) -> this rank's micro-batches; None: evaluation off
        self._sets: dict[str, Callable[[int], list[Batch]]] | None
        held_out, train = cfg.data.held_out_sources(), cfg.data.train_sources()
        if batches is not None:
            self._sets = {"": batches}
        elif held_out:
            if not train:
                raise ConfigError("data.eval_path / data.eval_sources need training data (data.path or data.sources): "
                                  "the held-out sets must use the training vocabulary")
            self.sources = self._open_sources(vocab)
            self._sets = {n: partial(self._data_batches, n) for n in self.sources}
        elif train:
            self._sets = None
            self.note = "no data.eval_path / data.eval_sources: held-out evaluation is off for this run"
        else:
            self._sets = {"": self._mock_batches}
        self._its: dict = {}

    @property
    def enabled(self) -> bool:
        return self._sets is not None and self.cfg.train.eval_steps > 0

    def _open_sources(self, vocab: Any) -> dict:
        from tessera.tokenizers.vocab import Vocabulary

        data = self.cfg.data
        vocab = vocab if vocab is not None else Vocabulary.load(data.train_sources()[0].path)
        sources = data.open_sources(held_out=True)
        for i, (name, src) in enumerate(sources.items()):
            if src.vocab != vocab:
                where = "data.eval_path" if data.eval_path else f"data.eval_sources[{i}] ({name})"
                raise ConfigError(f"{where}: {src.path}'s vocabulary differs from the training data's; pretokenize "
                                  "both with the same tokenizers")
        return sources

    def _data_batches(self, name: str, step: int) -> list[Batch]:
        from tessera.data.config import held_out_iterator

        if step == 0:  # the same held-out batches at every evaluation
            p = self.cfg.parallel
            self._its[name] = held_out_iterator(self.sources[name], p.global_batch_size, p.micro_batch_size,
                                                self.dp_rank, self.dp_size, self.cfg.data.seed)
        return self._its[name].next_step()

    def _mock_batches(self, step: int) -> list[Batch]:
        return [heldout_mock_batch(self.cfg, step, self.dp_rank * self.n_micro + i) for i in range(self.n_micro)]

    def run(self) -> dict[str, float]:
        """Mean CE over every held-out token (no z-loss, no image weighting) and per modality, with
        perplexities exp(CE); keys ``eval_loss``, ``eval_ppl``, ``eval_ce_text``, ``eval_ppl_text``, ...,
        ``eval_tokens``; with several held-out sets also ``eval_loss/NAME``, ``eval_ppl/NAME``,
        ``eval_tokens/NAME`` per set. Empty when evaluation is off."""
        if not self.enabled:
            return {}
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from tessera.model import document_mask

        cfg, fb = self.cfg, self._fb or get_forward_backward_func()
        shape = schedule_shape(cfg.data.seq_length, cfg.parallel.micro_batch_size, cfg.data.document_mask)

        def forward_step(it, m):
            b = next(it)
            out = document_mask.forward(m, b, **self.model_kwargs)

            def loss_fn(logits):
                lo = language_model_loss(logits, b["labels"], b["loss_mask"], 0.0, label_modality=b.get("label_modality"))
                return lo.ce, step_stats(lo)
            return out, loss_fn

        rng = capture_rng_state()
        modes = [m.training for m in self.model]
        for m in self.model:
            m.eval()  # no dropout
        names = list(self._sets)
        sums = torch.zeros(len(names), len(CE_KEYS), dtype=torch.float64, device=self.device)
        try:
            with torch.no_grad():
                for i, batches in enumerate(self._sets.values()):
                    for step in range(cfg.train.eval_steps):
                        micro = self.mover.all(attach_packed_seq_params(b) for b in batches(step))
                        # virtual pipeline: each model chunk reads the same micro-batches through its own iterator
                        its = [iter(micro) for _ in self.model] if len(self.model) > 1 else iter(micro)
                        out = fb(forward_step_func=forward_step, data_iterator=its, model=self.model,
                                 num_microbatches=self.n_micro, forward_only=True, **shape)
                        # one contributor per DP replica (last stage, TP rank 0): the sums are replicated over TP
                        if out and ps.get_tensor_model_parallel_rank() == 0:
                            sums[i] += sum_stats(out, CE_KEYS, self.device)
        finally:
            for m, mode in zip(self.model, modes, strict=True):
                m.train(mode)
            restore_rng_state(rng)
        torch.distributed.all_reduce(sums)  # every set in one all-reduce, one read
        per_set = [dict(zip(CE_KEYS, row, strict=True)) for row in sums.tolist()]
        res = _figures({k: sum(t[k] for t in per_set) for k in CE_KEYS})
        if len(names) > 1:
            for name, tot in zip(names, per_set, strict=True):
                if tot["n"] > 0:
                    res[f"eval_loss/{name}"] = tot["ce"] / tot["n"]
                    res[f"eval_ppl/{name}"] = _ppl(res[f"eval_loss/{name}"])
                res[f"eval_tokens/{name}"] = tot["n"]
        return res


def _figures(tot: dict[str, float]) -> dict[str, float]:
    """Summed ``CE_KEYS`` -> eval_loss, eval_ppl, eval_ce_MODALITY, eval_ppl_MODALITY, eval_tokens."""
    res: dict[str, float] = {}
    if tot["n"] > 0:
        res["eval_loss"] = tot["ce"] / tot["n"]
        res["eval_ppl"] = _ppl(res["eval_loss"])
    for mname in MODALITIES:
        if tot[f"n_{mname}"] > 0:
            ce = tot[f"ce_{mname}"] / tot[f"n_{mname}"]
            res[f"eval_ce_{mname}"], res[f"eval_ppl_{mname}"] = ce, _ppl(ce)
    res["eval_tokens"] = tot["n"]
    return res


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    while not hasattr(module, "pre_process") and isinstance(getattr(module, "module", None), torch.nn.Module):
        module = module.module  # DDP / Float16Module wrappers
    return module


def _ppl(ce: float) -> float:
    return math.exp(ce) if ce < 700 else math.inf
