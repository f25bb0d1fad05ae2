"""Held-out evaluation during training: forward only through megatron's schedule, text / image loss and perplexity.

The held-out batches are the SAME at every evaluation (a fresh iterator from step 0 each time), so the
curve compares like with like. Sources, in order:

* ``data.eval_path``: another ``tessera data pretokenize`` directory with the training vocabulary
  (``tessera demo`` pretokenizes its held-out split there), read through the woven iterator;
* no ``data.path``: the mock dataset (deterministic random tokens), disjoint from the training batches;
* ``data.path`` without ``data.eval_path``: no evaluation (said once on rank 0).

Evaluation leaves training exactly as it was: the model goes back to train mode, every RNG state (torch,
CUDA, megatron's tracker) is restored, and the training iterator is never touched, so a run with
evaluation gives the same training losses as one without (tests/test_train_obs.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from megatron.core import parallel_state as ps

from tessera.config import ConfigError
from tessera.model.loss import language_model_loss
from tessera.pretrain.checkpointing import capture_rng_state, restore_rng_state
from tessera.pretrain.config import TrainConfig
from tessera.pretrain.device import training_device
from tessera.pretrain.metrics import CE_KEYS, MODALITIES, step_stats, sum_stats
from tessera.pretrain.mock import heldout_mock_batch

Batch = dict[str, torch.Tensor]


class Evaluator:
    """``Evaluator(cfg, model_chunks, n_micro, dp_rank, dp_size, modality).run() -> {"eval_loss": ...}``.

    Every rank calls ``run`` (it runs the pipeline schedule and all-reduces). ``modality`` is the
    vocabulary's id -> Modality table (per-modality losses), None for the mock dataset. ``batches``
    overrides the held-out source: ``batches(eval_step) -> this rank's micro-batches`` (tests). Host
    batches are copied to ``device`` (default: the training device) once per micro-batch.
    ``forward_backward_func``: megatron's schedule by default; ``model_kwargs``: extra model-call keywords."""

    def __init__(self, cfg: TrainConfig, model: list[torch.nn.Module], n_micro: int, dp_rank: int, dp_size: int,
                 modality: torch.Tensor | None = None, batches: Callable[[int], list[Batch]] | None = None,
                 device: torch.device | str | None = None, forward_backward_func: Callable | None = None,
                 model_kwargs: dict | None = None) -> None:
        from tessera.pretrain.step import BatchMover, stage_roles

        self.cfg, self.model, self.n_micro = cfg, model, n_micro
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.device = torch.device(device) if device is not None else training_device()
        self.mover = BatchMover(self.device, *stage_roles([_unwrap(m) for m in model]), modality=modality)
        self._fb = forward_backward_func  # None: megatron's schedule for the current layout
        self.model_kwargs = model_kwargs or {}  # bf16: logits stay bf16 (tessera.pretrain.step.model_kwargs)
        self.source = None
        self._it = None
        self.note = ""
        if batches is not None:
            self._batches = batches
        elif cfg.data.eval_path:
            if not cfg.data.path:
                raise ConfigError("data.eval_path needs data.path (the held-out set must use the training vocabulary)")
            self.source = self._open_source()
            self._batches = self._data_batches
        elif cfg.data.path:
            self._batches = None
            self.note = "no data.eval_path: held-out evaluation is off for this run"
        else:
            self._batches = self._mock_batches

    @property
    def enabled(self) -> bool:
        return self._batches is not None and self.cfg.train.eval_steps > 0

    def _open_source(self):
        from tessera.data.batches import PackedSource, PackingConfig
        from tessera.tokenizers.vocab import Vocabulary

        cfg = self.cfg
        train_vocab = Vocabulary.load(cfg.data.path)
        eval_vocab = Vocabulary.load(cfg.data.eval_path)
        if eval_vocab != train_vocab:
            raise ConfigError(f"data.eval_path {cfg.data.eval_path}: its vocabulary differs from data.path "
                              f"{cfg.data.path}'s; pretokenize both with the same tokenizers")
        return PackedSource(cfg.data.eval_path, PackingConfig(seq_length=cfg.data.seq_length, shuffle_seed=cfg.data.seed),
                            name="heldout")

    def _data_batches(self, step: int) -> list[Batch]:
        from tessera.data.batches import WovenBatchIterator
        from tessera.data.weave import WeaveSchedule

        if step == 0:  # the same held-out batches at every evaluation
            self._it = WovenBatchIterator({"heldout": self.source}, WeaveSchedule.constant({"heldout": 1.0}),
                                          global_batch=self.cfg.parallel.global_batch_size,
                                          micro_batch=self.cfg.parallel.micro_batch_size,
                                          dp_rank=self.dp_rank, dp_size=self.dp_size, seed=self.cfg.data.seed)
        return self._it.next_step()

    def _mock_batches(self, step: int) -> list[Batch]:
        return [heldout_mock_batch(self.cfg, step, self.dp_rank * self.n_micro + i) for i in range(self.n_micro)]

    def run(self) -> dict[str, float]:
        """Mean CE over every held-out token (no z-loss, no image weighting) and per modality, with
        perplexities exp(CE); keys ``eval_loss``, ``eval_ppl``, ``eval_ce_text``, ``eval_ppl_text``, ...,
        ``eval_tokens``. Empty when evaluation is off."""
        if not self.enabled:
            return {}
        from megatron.core.pipeline_parallel import get_forward_backward_func

        cfg, fb = self.cfg, self._fb or get_forward_backward_func()

        def forward_step(it, m):
            b = next(it)
            out = m(b.get("tokens"), b.get("position_ids"), None, **self.model_kwargs)

            def loss_fn(logits):
                lo = language_model_loss(logits, b["labels"], b["loss_mask"], 0.0, label_modality=b.get("label_modality"))
                return lo.ce, step_stats(lo)
            return out, loss_fn

        rng = capture_rng_state()
        modes = [m.training for m in self.model]
        for m in self.model:
            m.eval()  # no dropout
        sums = torch.zeros(len(CE_KEYS), dtype=torch.float64, device=self.device)
        try:
            with torch.no_grad():
                for step in range(cfg.train.eval_steps):
                    micro = self.mover.all(self._batches(step))
                    # virtual pipeline: each model chunk reads the same micro-batches through its own iterator
                    its = [iter(micro) for _ in self.model] if len(self.model) > 1 else iter(micro)
                    out = fb(forward_step_func=forward_step, data_iterator=its, model=self.model,
                             num_microbatches=self.n_micro, seq_length=cfg.data.seq_length,
                             micro_batch_size=cfg.parallel.micro_batch_size, forward_only=True)
                    # one contributor per DP replica (last stage, TP rank 0): the sums are replicated over TP
                    if out and ps.get_tensor_model_parallel_rank() == 0:
                        sums += sum_stats(out, CE_KEYS, self.device)
        finally:
            for m, mode in zip(self.model, modes, strict=True):
                m.train(mode)
            restore_rng_state(rng)
        torch.distributed.all_reduce(sums)
        tot = dict(zip(CE_KEYS, sums.tolist(), strict=True))
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
