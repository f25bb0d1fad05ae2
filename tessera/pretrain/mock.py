"""The mock dataset used when a run has no ``data.path`` (tests, throughput runs): deterministic random tokens,
as megatron's ``MockGPTDataset``.

A micro-batch is a pure function of (data.seed, key, GLOBAL micro-batch index), so any DP size sees the same
global batch. Training keys on its step (>= 1), held-out evaluation on ``-1 - eval_step`` (<= -1), so the
two never draw the same batch. Integers only in the key: Python salts str hashes per process, and every
rank and every run must draw the same batches. Batches are built on the host (the trainer moves them).
"""

from __future__ import annotations

import torch

from tessera.pretrain.config import TrainConfig


def mock_batch(cfg: TrainConfig, key: int, micro: int, vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """``vocab_size``: the embedding size the run resolved (default ``cfg.model.vocab_size``)."""
    g = torch.Generator().manual_seed(hash((cfg.data.seed, key, micro)) % (2**62))
    b, s = cfg.parallel.micro_batch_size, cfg.data.seq_length
    t = torch.randint(0, vocab_size or cfg.model.vocab_size, (b, s + 1), generator=g)
    return {"tokens": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous(),
            "loss_mask": torch.ones(b, s), "position_ids": torch.arange(s).expand(b, s).contiguous()}


def train_mock_batch(cfg: TrainConfig, step: int, micro: int, vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    return mock_batch(cfg, step, micro, vocab_size)


def heldout_mock_batch(cfg: TrainConfig, eval_step: int, micro: int,
                       vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    return mock_batch(cfg, -1 - eval_step, micro, vocab_size)
