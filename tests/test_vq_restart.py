"""Error-weighted dead-code restarts (tessera.tokenizers.vq_restart) inside vector-quantize-pytorch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tessera.config import ConfigError
from tessera.tokenizers.image import VQConfig, VQModel
from tessera.tokenizers.vq_restart import draw_by_error, error_weighted_sampler, split_draws


def _one_live_code_then_step(mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of 512 latents, 480 equal to the only live code and 32 rare ones far away; one training
    forward of the quantizer, whose 63 other codes are dead. -> (rare vectors, codebook after)."""
    torch.manual_seed(0)
    cfg = VQConfig(**{**VQConfig.preset("tiny").__dict__, "dead_code_restart": mode})
    vq = VQModel(cfg).train().quantizer
    cb = vq._codebook
    d = cfg.embed_dim
    rare = torch.randn(32, d) + 10.0
    flat = torch.zeros(512, d)
    flat[::16] = rare
    z = flat.reshape(8, 8, 8, d).permute(0, 3, 1, 2).contiguous()  # [n, d, h, w]
    with torch.no_grad():
        cb.initted.fill_(True)  # no k-means: code 0 is live at the common vector, the others dead
        cb.embed.zero_()
        cb.embed_avg.zero_()
        cb.cluster_size.zero_()
        cb.cluster_size[0, 0] = 1000.0
        vq(z)
    return rare, cb.embed[0].clone()


def _held(vectors: torch.Tensor, codes: torch.Tensor) -> int:
    """How many of ``vectors`` are exactly a code."""
    return int((vectors[:, None] == codes[None]).all(dim=-1).any(dim=-1).sum())


def test_dead_codes_restart_at_the_vectors_the_codebook_misses() -> None:
    rare, codes = _one_live_code_then_step("error")
    held = _held(rare, codes)
    assert held == 32  # every rare vector now has a code of its own
    # the library's uniform draw spends the 63 restarts in proportion to frequency: mostly the common vector
    rare_u, codes_u = _one_live_code_then_step("uniform")
    assert _held(rare_u, codes_u) < 16


def test_draw_by_error_weights_and_fallbacks() -> None:
    torch.manual_seed(0)
    x = torch.arange(10.0)[:, None]
    err = torch.zeros(10)
    err[[2, 7]] = torch.tensor([1.0, 3.0])
    assert sorted(draw_by_error(x, err, 2).flatten().tolist()) == [2.0, 7.0]
    four = draw_by_error(x, err, 4).flatten().tolist()  # both with error, then two distinct others
    assert four[:2] == [2.0, 7.0] and len(set(four)) == 4
    counts = torch.zeros(10)
    for _ in range(400):
        counts[int(draw_by_error(x, err, 1).item())] += 1
    assert counts[[2, 7]].sum() == 400 and 2.0 < counts[7] / counts[2] < 4.5  # odds 3:1
    assert draw_by_error(x, torch.zeros(10), 3).unique().numel() == 3  # no error anywhere: uniform
    assert draw_by_error(x[:2], torch.ones(2), 5).shape == (5, 1)  # more draws than rows


def test_split_draws_is_proportional_and_exact() -> None:
    assert split_draws(10, [1.0, 1.0]) == [5, 5]
    assert split_draws(7, [3.0, 1.0, 0.0]) == [5, 2, 0]
    assert split_draws(5, [0.0, 0.0]) == [3, 2]
    assert sum(split_draws(63, [0.3, 2.9, 1.1, 0.0])) == 63


def test_config_rejects_unknown_restart() -> None:
    with pytest.raises(ConfigError, match="dead_code_restart"):
        VQConfig(dead_code_restart="kmeans")


class _Codebook(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("embed", torch.zeros(1, 4, 2))


def _rank(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(100 + rank)  # ranks draw with different generators
    # rank 0's vectors sit on the codes (no error) but one; rank 1's are all far
    if rank == 0:
        x = torch.zeros(16, 2)
        x[3] = torch.tensor([5.0, 5.0])
    else:
        x = torch.randn(16, 2) + 20.0
    sample = error_weighted_sampler(_Codebook(), distributed=True)
    got = sample(x[None], 6)
    torch.save({"got": got, "x": x}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ranks_restart_the_same_codes_at_the_same_vectors(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(2, f"file://{tmp_path}/pg", str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["got"].shape == (1, 6, 2) and torch.equal(r0["got"], r1["got"])
    drawn = r0["got"][0]
    # rank 1 holds nearly all the error, so nearly all draws; rank 0's zero-error vectors are never drawn
    assert not (drawn == 0).all(dim=-1).any()
    from_rank1 = sum(bool((r1["x"] == v).all(dim=-1).any()) for v in drawn)
    assert from_rank1 >= 5
