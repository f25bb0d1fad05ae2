"""Triton kernels for the fused cross-entropy + z-loss (see cross_entropy.py for the contract).

One program per row (token). Both kernels stream the row's vocabulary slice in BLOCK chunks, so
nothing of vocabulary size is allocated in fp32: the forward keeps a running max and a sum of exp
rescaled to it (online logsumexp); the backward recomputes exp(x - lse) chunk by chunk and writes the
gradient in the logits' dtype (possibly over the logits themselves: each element is read before it
is written, by the same program).
Keep this module free of anything but @triton.jit functions: _backend reloads it to switch between
compiled and interpreted kernels.
"""

import triton
import triton.language as tl


@triton.jit
def ce_forward_kernel(
    logits_ptr, stride, labels_ptr, max_ptr, sumexp_ptr, target_ptr, V, vocab_start, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        # every chunk holds at least one in-range element, so m_new is finite for finite logits
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    # target logit: only the shard that owns the label has it (others, and ignored rows, store 0)
    local = tl.load(labels_ptr + row) - vocab_start
    owned = (local >= 0) & (local < V)
    t = tl.load(base + tl.where(owned, local, 0), mask=owned, other=0.0).to(tl.float32)
    tl.store(max_ptr + row, m)
    tl.store(sumexp_ptr + row, s)
    tl.store(target_ptr + row, t)


@triton.jit
def ce_backward_kernel(
    logits_ptr, stride, grad_ptr, grad_stride, labels_ptr, lse_ptr, coef_sm_ptr, coef_hot_ptr, V, vocab_start,
    BLOCK: tl.constexpr,
):
    # grad[j] = coef_sm * exp(x_j - lse) - coef_hot * [j == label]
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    gbase = grad_ptr + row * grad_stride
    lse = tl.load(lse_ptr + row)
    a = tl.load(coef_sm_ptr + row)
    b = tl.load(coef_hot_ptr + row)
    local = tl.load(labels_ptr + row) - vocab_start
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < V
        x = tl.load(base + offs, mask=inb, other=0.0).to(tl.float32)
        g = a * tl.exp(x - lse) - tl.where(offs == local, b, 0.0)
        tl.store(gbase + offs, g.to(grad_ptr.dtype.element_ty), mask=inb)
