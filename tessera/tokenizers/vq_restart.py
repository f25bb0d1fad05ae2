"""Where a VQ codebook's dead codes restart: at batch vectors drawn in proportion to how badly the
codebook represents them (the squared distance to their nearest code, as k-means++ seeds its centres),
instead of uniformly.

vector-quantize-pytorch restarts a code whose EMA cluster size fell under ``threshold_ema_dead_code`` at a
uniformly drawn vector of the batch. When most vectors are alike (a plain background around small
objects) those draws land where the codebook is already good, the new code finds no vectors and dies
again, and rare patterns never hold a code. Drawn by error, restarts go where the codebook is worst.

Under data parallelism every rank must restart the same codes at the same vectors: the ranks share out
the draws in proportion to their error totals (the same split on every rank), draw locally and gather.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

# (samples [1, n, d], how many) -> [1, how many, d]: the library's ``replace_sample_fn`` signature
SampleFn = Callable[[torch.Tensor, int], torch.Tensor]


def nearest_code_error(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Squared distance [n] from each row of ``x`` [n, d] to its nearest row of ``codes`` [c, d]."""
    return torch.cdist(x.float(), codes.float()).amin(dim=-1).square()


def draw_by_error(x: torch.Tensor, err: torch.Tensor, num: int) -> torch.Tensor:
    """``num`` distinct rows of ``x`` drawn with probability proportional to ``err``. When fewer rows
    than ``num`` have any error, all of those, then the rest uniformly among the others (repeating rows
    only when ``x`` has fewer than ``num``)."""
    if num <= 0:
        return x[:0]
    weights = err.clamp(min=0).nan_to_num(0.0, posinf=0.0)
    has_error = weights > 0
    positive = int(has_error.sum())
    if num <= positive:
        return x[torch.multinomial(weights, num)]
    extra, others = num - positive, len(x) - positive
    if others > 0:
        fill = torch.multinomial((~has_error).float(), extra, replacement=extra > others)
    else:
        fill = torch.randint(0, len(x), (extra,), device=x.device)
    return torch.cat([x[has_error], x[fill]])


def split_draws(num: int, totals: list[float]) -> list[int]:
    """``num`` draws shared out in proportion to ``totals`` (largest remainder: the same answer on every
    rank, summing to ``num``); evenly when every total is zero."""
    weights = [max(t, 0.0) for t in totals]
    s = sum(weights)
    if s <= 0:
        weights, s = [1.0] * len(totals), float(len(totals))
    exact = [num * w / s for w in weights]
    counts = [int(e) for e in exact]
    order = sorted(range(len(totals)), key=lambda r: (counts[r] - exact[r], r))
    for r in order[: num - sum(counts)]:
        counts[r] += 1
    return counts


def error_weighted_sampler(codebook: torch.nn.Module, distributed: bool | None = None) -> SampleFn:
    """A ``replace_sample_fn`` for a vector-quantize-pytorch ``Codebook`` (``VectorQuantize._codebook``,
    one codebook head). ``distributed`` defaults to the codebook's own ``use_ddp``."""
    if codebook.embed.shape[0] != 1:
        raise ValueError(f"error-weighted restarts support one codebook head, got {codebook.embed.shape[0]}")
    ddp = bool(getattr(codebook, "use_ddp", False)) if distributed is None else distributed

    def sample(samples: torch.Tensor, num: int) -> torch.Tensor:
        x = samples.reshape(-1, samples.shape[-1])
        err = nearest_code_error(x, codebook.embed[0].detach())
        if not (ddp and dist.is_initialized() and dist.get_world_size() > 1):
            return draw_by_error(x, err, num)[None]
        world, rank = dist.get_world_size(), dist.get_rank()
        total = err.sum().reshape(1).double()
        totals = [torch.zeros_like(total) for _ in range(world)]
        dist.all_gather(totals, total)
        counts = split_draws(num, [float(t) for t in totals])
        width = max(counts)
        local = torch.zeros(width, x.shape[-1], dtype=x.dtype, device=x.device)
        local[: counts[rank]] = draw_by_error(x, err, counts[rank])
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local)
        return torch.cat([g[:c] for g, c in zip(gathered, counts, strict=True)])[None]

    return sample
