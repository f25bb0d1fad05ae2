"""Fused, vocab-parallel cross-entropy with z-loss, never materialising fp32 logits or softmax.

``cross_entropy_z(logits, labels, z_loss_weight)`` takes ``logits`` [tokens, V/TP] (fp32, bf16 or
fp16; this TP rank's contiguous slice of the vocabulary, megatron's layout) and ``labels`` [tokens]
(global ids, ``ignore_index`` for tokens that do not count) and returns per-token fp32 vectors:

* ``lse``  = logsumexp of the row over the whole (TP-global) vocabulary,
* ``ce``   = lse - logit[label]                                        (0 on ignored tokens),
* ``z``    = z_loss_weight * lse^2                                      (0 on ignored tokens),
* ``loss`` = ce + z.

Forward, per row: one pass over this rank's vocabulary slice in chunks keeping a running max and a
sum of exp rescaled to it (online logsumexp), plus the target logit read by the rank that owns the
label. With a TP group: all-reduce MAX of the row maxima, rescale the partial sums to the global
max, then one all-reduce SUM of [partial sums; target logits]: only [tokens] vectors cross ranks,
as in megatron's ``vocab_parallel_cross_entropy``.
Backward (analytic, no autograd graph over the vocabulary): with g_ce and g_lse the incoming
gradients of ``ce`` and ``lse`` (``z`` and ``loss`` reach them through torch),
``d logits = (g_ce + g_lse) * softmax - g_ce * onehot(label)``, computed chunk by chunk and written
in the logits' dtype. No collective is needed: the loss is replicated on every TP rank and each rank
differentiates its own slice. ``inplace_backward=True`` writes the gradient over the saved logits
(megatron does the same) to save a logits-sized buffer; it is honoured only when ``logits`` is not
a leaf tensor, and is only safe when nothing else reads the logits after the loss (the training
loss function; not code that inspects the logits afterwards).

``cross_entropy_z_reference`` (chunked torch ops) and ``cross_entropy_z_triton`` (two Triton
kernels, _ce_triton.py) share the signature; ``cross_entropy_z(..., backend=)`` dispatches
(Triton for CUDA tensors, the reference otherwise; ``backend="triton"`` on CPU needs the
interpreter). Labels must be in [0, V) or equal ``ignore_index`` (not checked: a check would sync).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from ._backend import resolve_backend

# Reference: the work is tiled into blocks of whole rows (``block`` columns at a time when given), each
# copied to fp32 in ONE workspace reused for every tile. A tile of <= _REF_TILE_ELEMENTS stays in the
# cache across the copy / max / exp / sum passes, and the small workspace comes from the heap: a
# [tokens, V]-sized fp32 temporary is page-faulted in afresh on every call (the allocator returns big
# blocks to the OS), which on the CPU cost more than the arithmetic.
_REF_TILE_ELEMENTS = 1 << 18
_REF_MIN_ROWS = 8  # bounds the per-tile Python overhead for very wide vocabulary slices
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class CrossEntropyZOutput(NamedTuple):
    loss: torch.Tensor  # fp32 [tokens]: ce + z
    ce: torch.Tensor  # fp32 [tokens]
    z: torch.Tensor  # fp32 [tokens]: z_loss_weight * lse^2
    lse: torch.Tensor  # fp32 [tokens]: logsumexp over the full vocabulary


# ---- the two implementations of the per-row statistics and of the gradient -----------------------
def _ref_tiles(tokens: int, v: int, block: int | None) -> tuple[int, int]:
    """(rows, columns) of one reference tile."""
    cols = max(1, min(block, v)) if block is not None else v
    rows = max(_REF_MIN_ROWS, _REF_TILE_ELEMENTS // cols)
    return min(rows, max(tokens, 1)), cols


def _forward_stats_reference(logits, labels, vocab_start: int, block: int | None):
    tokens, v = logits.shape
    rows, cols = _ref_tiles(tokens, v, block)
    m = torch.empty(tokens, dtype=torch.float32, device=logits.device)
    s = torch.empty_like(m)
    work = torch.empty(rows, cols, dtype=torch.float32, device=logits.device)
    for r0 in range(0, tokens, rows):
        r1 = min(r0 + rows, tokens)
        mr = sr = None
        for c0 in range(0, v, cols):
            src = logits[r0:r1, c0 : c0 + cols]
            x = work[: src.shape[0], : src.shape[1]]
            cm = src.amax(dim=1).float()  # the max of a bf16 row is exact in fp32
            if mr is not None:  # online logsumexp across column chunks
                cm = torch.maximum(mr, cm)
            torch.sub(src, cm.unsqueeze(1), out=x)  # fp32 (x - max) of the tile, then exp in place
            part = x.exp_().sum(dim=1)
            sr = part if mr is None else sr * torch.exp(mr - cm) + part
            mr = cm
        m[r0:r1], s[r0:r1] = mr, sr
    local = labels - vocab_start
    owned = (local >= 0) & (local < v)
    t = logits.gather(1, torch.where(owned, local, 0).unsqueeze(1)).squeeze(1).float()
    return m, s, torch.where(owned, t, 0.0)


def _backward_reference(logits, labels, lse, coef_sm, coef_hot, vocab_start: int, grad, block: int | None):
    tokens, v = logits.shape
    rows, cols = _ref_tiles(tokens, v, block)
    local = labels - vocab_start
    # per column chunk: where each row's one-hot falls in it (column 0 and a zero coefficient if elsewhere:
    # adding -0 leaves the value bit-for-bit unchanged)
    hot = []
    for c0 in range(0, v, cols):
        inside = (local >= c0) & (local < min(c0 + cols, v))
        hot.append((torch.where(inside, local - c0, 0).unsqueeze(1), torch.where(inside, -coef_hot, 0.0).unsqueeze(1)))
    # fp32 gradients are computed in their own tile of ``grad`` (the logits themselves when in place);
    # others in an fp32 workspace and cast on the way out
    work = None if grad.dtype == torch.float32 else torch.empty(rows, cols, dtype=torch.float32, device=logits.device)
    for r0 in range(0, tokens, rows):
        r1 = min(r0 + rows, tokens)
        lse_r, coef_r = lse[r0:r1].unsqueeze(1), coef_sm[r0:r1].unsqueeze(1)
        for ci, c0 in enumerate(range(0, v, cols)):
            out = grad[r0:r1, c0 : c0 + cols]
            g = out if work is None else work[: out.shape[0], : out.shape[1]]
            src = logits[r0:r1, c0 : c0 + cols]
            # same arithmetic as coef_sm * exp(x - lse) - coef_hot * onehot, in fp32
            if g.data_ptr() == src.data_ptr():  # fp32 logits overwritten by their gradient
                g.sub_(lse_r)
            else:
                torch.sub(src, lse_r, out=g)
            g.exp_().mul_(coef_r)
            idx, neg = hot[ci]
            g.scatter_add_(1, idx[r0:r1], neg[r0:r1])
            if g is not out:
                out.copy_(g)  # casts to grad's dtype


# Every vocabulary chunk the Triton kernels can be launched with (tessera.kernels.aot compiles each
# ahead of time): 4096 by default, a smaller power of two for a narrower vocabulary or when asked.
TRITON_BLOCKS = tuple(1 << i for i in range(4, 13))


def _triton_block(v: int, block: int | None) -> int:
    b = block if block is not None else TRITON_BLOCKS[-1]
    if b not in TRITON_BLOCKS:
        raise ValueError(f"cross_entropy_z: the Triton block must be a power of two from {TRITON_BLOCKS[0]} to "
                         f"{TRITON_BLOCKS[-1]}, got {block}")
    return max(TRITON_BLOCKS[0], min(b, 1 << (v - 1).bit_length()))


def _triton_num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def _forward_stats_triton(logits, labels, vocab_start: int, block: int | None):
    from . import _ce_triton

    tokens, v = logits.shape
    m = torch.empty(tokens, dtype=torch.float32, device=logits.device)
    s = torch.empty_like(m)
    t = torch.empty_like(m)
    blk = _triton_block(v, block)
    _ce_triton.ce_forward_kernel[(tokens,)](
        logits, logits.stride(0), labels, m, s, t, v, vocab_start, BLOCK=blk, num_warps=_triton_num_warps(blk)
    )
    return m, s, t


def _backward_triton(logits, labels, lse, coef_sm, coef_hot, vocab_start: int, grad, block: int | None):
    from . import _ce_triton

    tokens, v = logits.shape
    blk = _triton_block(v, block)
    _ce_triton.ce_backward_kernel[(tokens,)](
        logits, logits.stride(0), grad, grad.stride(0), labels, lse, coef_sm, coef_hot, v, vocab_start,
        BLOCK=blk, num_warps=_triton_num_warps(blk),
    )


_IMPLS = {
    "reference": (_forward_stats_reference, _backward_reference),
    "triton": (_forward_stats_triton, _backward_triton),
}


# ---- autograd --------------------------------------------------------------------------------------
def _tp(group) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


class _CrossEntropyZ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, tp_group, inplace_backward, impl, block):
        fwd, _ = _IMPLS[impl]
        world, rank = _tp(tp_group)
        vocab_start = rank * logits.shape[1]
        m, s, t = fwd(logits, labels, vocab_start, block)
        if world > 1:
            gmax = m.clone()
            dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=tp_group)
            packed = torch.stack([s * torch.exp(m - gmax), t])  # one SUM for both vectors
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=tp_group)
            m, s, t = gmax, packed[0], packed[1]
        lse = m + torch.log(s)
        valid = labels != ignore_index
        ce = torch.where(valid, lse - t, 0.0)
        ctx.save_for_backward(logits, labels, lse, valid)
        ctx.vocab_start, ctx.inplace, ctx.impl, ctx.block = vocab_start, inplace_backward, impl, block
        return ce, lse

    @staticmethod
    def backward(ctx, g_ce, g_lse):
        logits, labels, lse, valid = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        zeros = torch.zeros_like(lse)
        coef_hot = torch.where(valid, g_ce.float(), 0.0) if g_ce is not None else zeros
        coef_sm = coef_hot + g_lse.float() if g_lse is not None else coef_hot
        grad = logits if ctx.inplace else torch.empty_like(logits)
        _IMPLS[ctx.impl][1](logits, labels, lse, coef_sm.contiguous(), coef_hot.contiguous(), ctx.vocab_start, grad,
                            ctx.block)
        return grad, None, None, None, None, None, None


def _run(impl, logits, labels, z_loss_weight, ignore_index, tp_group, inplace_backward, block) -> CrossEntropyZOutput:
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"cross_entropy_z: logits must be [tokens, V/TP] and labels [tokens]; got logits {tuple(logits.shape)}, "
            f"labels {tuple(labels.shape)}"
        )
    if logits.dtype not in _DTYPES:
        raise ValueError(f"cross_entropy_z: logits dtype must be one of {_DTYPES}, got {logits.dtype}")
    if logits.shape[1] == 0:
        raise ValueError("cross_entropy_z: logits have an empty vocabulary dimension")
    if logits.stride(-1) != 1 or logits.stride(0) < logits.shape[1]:
        logits = logits.contiguous()
    labels = labels.to(device=logits.device, dtype=torch.int64).contiguous()
    if logits.shape[0] == 0:
        empty = logits.new_zeros(0, dtype=torch.float32) + logits.sum() * 0  # keeps the graph connected
        return CrossEntropyZOutput(empty, empty, empty, empty)
    # in place over a leaf (or a view of one) would overwrite the caller's own tensor: only
    # intermediate logits qualify
    root = logits._base if logits._base is not None else logits
    inplace = bool(inplace_backward) and logits.grad_fn is not None and root.grad_fn is not None
    ce, lse = _CrossEntropyZ.apply(logits, labels, ignore_index, tp_group, inplace, impl, block)
    valid = labels != ignore_index
    z = torch.where(valid, z_loss_weight * lse.square(), 0.0) if z_loss_weight else torch.zeros_like(ce)
    return CrossEntropyZOutput(ce + z, ce, z, lse)


def cross_entropy_z_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    z_loss_weight: float = 0.0,
    *,
    ignore_index: int = -100,
    tp_group=None,
    inplace_backward: bool = False,
    block: int | None = None,
) -> CrossEntropyZOutput:
    """PyTorch reference (chunked over the vocabulary, ``block`` columns at a time; same contract)."""
    return _run("reference", logits, labels, z_loss_weight, ignore_index, tp_group, inplace_backward, block)


def cross_entropy_z_triton(
    logits: torch.Tensor,
    labels: torch.Tensor,
    z_loss_weight: float = 0.0,
    *,
    ignore_index: int = -100,
    tp_group=None,
    inplace_backward: bool = False,
    block: int | None = None,
) -> CrossEntropyZOutput:
    """Triton kernels, one program per token (``block``: vocabulary chunk, a power of two)."""
    return _run("triton", logits, labels, z_loss_weight, ignore_index, tp_group, inplace_backward, block)


def cross_entropy_z(
    logits: torch.Tensor,
    labels: torch.Tensor,
    z_loss_weight: float = 0.0,
    *,
    ignore_index: int = -100,
    tp_group=None,
    inplace_backward: bool = False,
    block: int | None = None,
    backend: str = "auto",
) -> CrossEntropyZOutput:
    """Per-token CE, z-loss and logsumexp of ``logits`` [tokens, V/TP] against global ``labels`` [tokens].

    ``tp_group``: the tensor-parallel group the vocabulary is split over (rank r holds ids
    [r*V/TP, (r+1)*V/TP)); None = the whole vocabulary is here. backend: 'auto' (Triton on CUDA,
    else the reference), 'triton' or 'reference'. See the module docstring for the contract."""
    impl = resolve_backend(backend, logits, "cross_entropy_z")
    return _run(impl, logits, labels, z_loss_weight, ignore_index, tp_group, inplace_backward, block)
