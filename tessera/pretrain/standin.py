"""The deterministic random-token stand-in stream used when a run has no ``data.path`` (tests, throughput).

A micro-batch is a pure function of (data.seed, key, GLOBAL micro-batch index), so any DP size sees the same
global batch. Training keys on its step (>= 1), held-out evaluation on ``-1 - eval_step`` (<= -1), so the
two never draw the same batch. Integers only in the key: Python salts str hashes per process, and every
rank and every run must draw the same batches.
"""

from __future__ import annotations

import torch

from tessera.pretrain.config import TrainConfig


def standin_batch(cfg: TrainConfig, key: int, micro: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(hash((cfg.data.seed, key, micro)) % (2**62))
    b, s = cfg.parallel.micro_batch_size, cfg.data.seq_length
    t = torch.randint(0, cfg.model.vocab_size, (b, s + 1), generator=g)
    return {"tokens": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous(),
            "loss_mask": torch.ones(b, s), "position_ids": torch.arange(s).expand(b, s).contiguous()}


def train_standin_batch(cfg: TrainConfig, step: int, micro: int) -> dict[str, torch.Tensor]:
    return standin_batch(cfg, step, micro)


def heldout_standin_batch(cfg: TrainConfig, eval_step: int, micro: int) -> dict[str, torch.Tensor]:
    return standin_batch(cfg, -1 - eval_step, micro)
