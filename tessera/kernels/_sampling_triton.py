"""Triton kernel for one modality-masked sampling step (see sampling.py for the contract).

One program per CFG group (= per sequence without CFG). The vocabulary row is streamed in BLOCK
chunks on every pass and recomputed from the logits (CFG combine, mask, temperature), so nothing of
vocabulary size is written except the optional probability output. Passes over the row:
1 max/argmax/count, 32 top-k bisection steps (only with top-k), 1 top-k normaliser,
33 top-p bisection steps (only with top-p), 1 final normaliser, 1 inverse-CDF scan.
Keep this module free of anything but @triton.jit functions: _backend reloads it to switch
between compiled and interpreted kernels.
"""

import triton
import triton.language as tl


@triton.jit
def _mix32(h):
    # murmur3 fmix32 on uint32 (wrapping arithmetic); mirrored bit-for-bit by sampling._mix32_torch.
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    h = h ^ (h >> 16)
    return h


@triton.jit
def _order_key(z):
    # int32 whose signed order is the float order (+0.0 canonical: callers add 0.0 first).
    b = z.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _load_z(
    logits_ptr, stride, g, n_groups, offs, V, table_ptr, in_img, allow_boi, eos_id, boi_id, inv_temp,
    g_img, g_txt, CFG: tl.constexpr,
):
    inb = offs < V
    c = tl.load(logits_ptr + g * stride + offs, mask=inb, other=0.0).to(tl.float32)
    x = c
    if CFG >= 2:
        # Unconditional (and image-only) rows are read only inside an image: masked loads touch no memory.
        # A scalar bool cannot be and-ed into a block mask (the interpreter rejects the dtype): broadcast it.
        m_img = inb & ((tl.zeros_like(offs) + in_img.to(tl.int32)) != 0)
        u = tl.load(logits_ptr + (g + n_groups) * stride + offs, mask=m_img, other=0.0).to(tl.float32)
        if CFG == 3:
            i = tl.load(logits_ptr + (g + 2 * n_groups) * stride + offs, mask=m_img, other=0.0).to(tl.float32)
            comb = u + g_img * (i - u) + g_txt * (c - i)
        else:
            comb = u + g_img * (c - u)
        x = tl.where(in_img, comb, c)
    mod = tl.load(table_ptr + offs, mask=inb, other=2)
    ok_text = (mod == 0) | (offs == eos_id) | ((offs == boi_id) & allow_boi)
    allowed = inb & tl.where(in_img, mod == 1, ok_text)
    z = tl.where(allowed, x * inv_temp, float("-inf")) + 0.0
    return z, allowed


# rng_key is any uint32: Triton would compile a key equal to 1 as a constant, which has no .to()
@triton.jit(do_not_specialize=["rng_key"])
def sample_step_kernel(
    logits_ptr, stride, table_ptr, mode_ptr, cw_ptr, pos_ptr, done_ptr, tok_ptr, probs_ptr, probs_stride,
    V, n_groups, boi_id, eoi_id, eos_id, pad_id, n_img, max_len,
    t_temp, t_k, t_p, i_temp, i_k, i_p, g_img, g_txt, rng_key,
    CFG: tl.constexpr, WRITE_PROBS: tl.constexpr, BLOCK: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    mode = tl.load(mode_ptr + g)
    cw = tl.load(cw_ptr + g)
    pos = tl.load(pos_ptr + g)
    done = tl.load(done_ptr + g)
    in_img = mode == 1
    temp = tl.where(in_img, i_temp, t_temp)
    top_k = tl.where(in_img, i_k, t_k)
    top_p = tl.where(in_img, i_p, t_p)
    greedy = temp <= 0.0
    inv_temp = tl.where(greedy, 1.0, 1.0 / tl.where(greedy, 1.0, temp))
    allow_boi = pos + n_img + 2 <= max_len
    forced_eoi = in_img & (cw >= n_img)
    sampling = (done == 0) & (forced_eoi == 0)
    ar = tl.arange(0, BLOCK)

    neg_inf = float("-inf")
    m = tl.full([], neg_inf, tl.float32)
    am = tl.full([], 0, tl.int32)
    tok = tl.full([], 0, tl.int32)
    tk = tl.full([], -2147483648, tl.int64)
    tp = tl.full([], -2147483648, tl.int64)
    total = tl.full([], 1.0, tl.float32)
    if sampling:
        # Pass 1: max, first argmax, number of allowed ids.
        cnt = tl.full([], 0, tl.int32)
        for start in range(0, V, BLOCK):
            offs = start + ar
            z, allowed = _load_z(logits_ptr, stride, g, n_groups, offs, V, table_ptr, in_img, allow_boi,
                                 eos_id, boi_id, inv_temp, g_img, g_txt, CFG)
            bm = tl.max(z, 0)
            ba = tl.argmax(z, 0).to(tl.int32) + start
            upd = bm > m
            am = tl.where(upd, ba, am)
            m = tl.where(upd, bm, m)
            cnt += tl.sum(allowed.to(tl.int32), 0)
        tok = am
        if greedy == 0:
            # Top-k: largest order key t with count(key >= t) >= k, found by bisection over int32 keys;
            # kept = key >= t, i.e. every id whose value ties or beats the k-th largest.
            if (top_k > 0) & (top_k < cnt):
                lo = tl.full([], -2147483648, tl.int64)
                hi = _order_key(m).to(tl.int64)
                for _ in range(32):
                    mid = (lo + hi + 1) >> 1
                    c = tl.full([], 0, tl.int32)
                    for start in range(0, V, BLOCK):
                        offs = start + ar
                        z, allowed = _load_z(logits_ptr, stride, g, n_groups, offs, V, table_ptr, in_img,
                                             allow_boi, eos_id, boi_id, inv_temp, g_img, g_txt, CFG)
                        c += tl.sum((allowed & (_order_key(z).to(tl.int64) >= mid)).to(tl.int32), 0)
                    ok = c >= top_k
                    lo = tl.where(ok, mid, lo)
                    hi = tl.where(ok, hi, mid - 1)
                tk = lo
            if top_p < 1.0:
                zk = tl.full([], 0.0, tl.float32)
                for start in range(0, V, BLOCK):
                    offs = start + ar
                    z, allowed = _load_z(logits_ptr, stride, g, n_groups, offs, V, table_ptr, in_img,
                                         allow_boi, eos_id, boi_id, inv_temp, g_img, g_txt, CFG)
                    keep = allowed & (_order_key(z).to(tl.int64) >= tk)
                    zk += tl.sum(tl.where(keep, tl.exp(z - m), 0.0), 0)
                # Top-p: smallest key t with mass(key > t) < p * Zk (mass over the top-k survivors);
                # kept = key >= t: an id stays iff the probability strictly above it is < top_p.
                plo = tl.full([], -2147483649, tl.int64)
                phi = _order_key(m).to(tl.int64)
                bound = top_p * zk
                for _ in range(33):
                    mid = (plo + phi) >> 1
                    s = tl.full([], 0.0, tl.float32)
                    for start in range(0, V, BLOCK):
                        offs = start + ar
                        z, allowed = _load_z(logits_ptr, stride, g, n_groups, offs, V, table_ptr, in_img,
                                             allow_boi, eos_id, boi_id, inv_temp, g_img, g_txt, CFG)
                        key = _order_key(z).to(tl.int64)
                        keep = allowed & (key >= tk) & (key > mid)
                        s += tl.sum(tl.where(keep, tl.exp(z - m), 0.0), 0)
                    ok = s < bound
                    phi = tl.where(ok, mid, phi)
                    plo = tl.where(ok, plo, mid)
                tp = phi
            thr = tl.maximum(tk, tp)
            total = tl.full([], 0.0, tl.float32)
            for start in range(0, V, BLOCK):
                offs = start + ar
                z, allowed = _load_z(logits_ptr, stride, g, n_groups, offs, V, table_ptr, in_img, allow_boi,
                                     eos_id, boi_id, inv_temp, g_img, g_txt, CFG)
                keep = allowed & (_order_key(z).to(tl.int64) >= thr)
                total += tl.sum(tl.where(keep, tl.exp(z - m), 0.0), 0)
            # Inverse CDF in vocabulary order: the first kept id whose running mass exceeds u * total.
            u = (_mix32(rng_key.to(tl.uint32) ^ (g.to(tl.uint32) * 0x9E3779B9)) >> 8).to(tl.float32) * (
                1.0 / 16777216.0
            )
            target = u * total
            run = tl.full([], 0.0, tl.float32)
            chosen = tl.full([], -1, tl.int32)
            last = tl.full([], -1, tl.int32)
            for start in range(0, V, BLOCK):
                offs = start + ar
                z, allowed = _load_z(logits_ptr, stride, g, n_groups, offs, V, table_ptr, in_img, allow_boi,
                                     eos_id, boi_id, inv_temp, g_img, g_txt, CFG)
                keep = allowed & (_order_key(z).to(tl.int64) >= thr)
                w = tl.where(keep, tl.exp(z - m), 0.0)
                cs = tl.cumsum(w, 0) + run
                first = tl.min(tl.where(keep & (cs > target), offs, 2147483647), 0)
                chosen = tl.where((chosen < 0) & (first < 2147483647), first, chosen)
                last = tl.maximum(last, tl.max(tl.where(keep, offs, -1), 0))
                run += tl.sum(w, 0)
            # Rounding can leave u * total just above the scanned sum: fall back to the last kept id.
            tok = tl.where(chosen >= 0, chosen, last)
    tok = tl.where(done != 0, pad_id, tl.where(forced_eoi, eoi_id, tok))

    if WRITE_PROBS:
        # The distribution the token was drawn from: one-hot for done / forced / greedy rows.
        stochastic = sampling & (greedy == 0)
        thr2 = tl.maximum(tk, tp)
        for start in range(0, V, BLOCK):
            offs = start + ar
            z, allowed = _load_z(logits_ptr, stride, g, n_groups, offs, V, table_ptr, in_img, allow_boi,
                                 eos_id, boi_id, inv_temp, g_img, g_txt, CFG)
            keep = allowed & (_order_key(z).to(tl.int64) >= thr2)
            p = tl.where(keep, tl.exp(z - m), 0.0) / total
            p = tl.where(stochastic, p, (offs == tok).to(tl.float32))
            tl.store(probs_ptr + g * probs_stride + offs, p, mask=offs < V)

    # New state (identical for every row of the CFG group).
    new_mode = tl.where(in_img, tl.where(forced_eoi, 0, 1), tl.where(tok == boi_id, 1, 0))
    new_cw = tl.where(in_img & (forced_eoi == 0), cw + 1, 0)
    new_pos = pos + 1
    new_done = ((tok == eos_id) | (new_pos >= max_len)).to(tl.int32)
    is_done = done != 0
    new_mode = tl.where(is_done, mode, new_mode)
    new_cw = tl.where(is_done, cw, new_cw)
    new_pos = tl.where(is_done, pos, new_pos)
    new_done = tl.where(is_done, done, new_done)
    for k in tl.static_range(CFG):
        r = g + k * n_groups
        tl.store(tok_ptr + r, tok.to(tl.int64))
        tl.store(mode_ptr + r, new_mode.to(tl.int32))
        tl.store(cw_ptr + r, new_cw.to(tl.int32))
        tl.store(pos_ptr + r, new_pos.to(tl.int32))
        tl.store(done_ptr + r, new_done.to(tl.int32))
