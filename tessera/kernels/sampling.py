"""Modality-masked sampling: one decoding step for the whole batch, one kernel launch.

``sample_step(logits, state, rules, params, seed, offset)`` masks what each sequence's decoding state
forbids, combines classifier-free-guidance rows for image tokens, applies temperature / top-k / top-p
of the current modality, draws the next token from a counter-based random number, and advances the
state in place. ``sample_step_triton`` and ``sample_step_reference`` share that signature and, given
the same ``seed`` / ``offset``, consume the same uniform per sequence (``sampling_uniforms``), so
they return the same tokens up to float rounding at a CDF boundary.

State machine (per sequence; docs/kernels.md has the table):
* done                     -> emit <pad>, state unchanged
* image, codes == N        -> emit <eoi> (forced), back to text
* image, codes <  N        -> only image codes allowed, codes += 1
* text                     -> text pieces, <eos>, and <boi> only if <boi> + N codes + <eoi> still fit
                              (position + N + 2 <= max_seq_len); every other special is masked
* after any emitted token: position += 1; done if the token is <eos> or position reaches max_seq_len.

CFG layout: ``logits`` rows are ``cfg_groups`` blocks of n sequences: rows [0, n) conditional,
[n, 2n) unconditional, [2n, 3n) image-only (3 groups). Inside an image the guided logits are
``u + g_img*(i - u) + g_txt*(c - i)`` (3 groups) or ``u + g*(c - u)`` (2 groups); in text mode the
conditional row is used as is. The state is read from the conditional row and the token and new
state are written to every row of the group.

Top-k / top-p (kernel and reference compute the same sets, including ties):
* z = guided logits / temperature on the allowed ids (temperature 0 = greedy, first argmax).
* top-k keeps every allowed id with z >= the k-th largest z (ties with it stay).
* top-p runs on the top-k survivors with p_i = exp(z_i - max) / sum over survivors, and keeps id i
  iff the probability of the survivors with z strictly greater than z_i is < top_p (the smallest
  prefix of the descending order whose mass reaches top_p; a tie group is kept or dropped whole).
* the token is the first kept id, in vocabulary order, whose running sum of exp(z - max) exceeds
  u * (sum over kept ids).
The kernel finds both thresholds by bisection over the int32 order key of the fp32 values (32 / 33
passes over the row, no sort, nothing of vocabulary size written); the reference uses torch.topk
(plus a sort of the k survivors, or of the row when top-k is off).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._backend import resolve_backend

MODE_TEXT = 0
MODE_IMAGE = 1
_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class ModalitySampling:
    """Sampling parameters of one modality."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class SamplingParams:
    text: ModalitySampling = ModalitySampling()
    image: ModalitySampling = ModalitySampling()
    cfg_groups: int = 1  # 1 = no CFG; 2 = (cond, uncond); 3 = (cond, uncond, image-only)
    cfg_scale: float = 1.0  # g (2 groups) or g_img (3 groups)
    cfg_scale_text: float = 1.0  # g_txt (3 groups only)

    def __post_init__(self) -> None:
        if self.cfg_groups not in (1, 2, 3):
            raise ValueError(f"cfg_groups must be 1, 2 or 3, got {self.cfg_groups}")


@dataclass(frozen=True)
class TokenRules:
    """What the state machine needs from the vocabulary and the context length."""

    modality_table: torch.Tensor  # int8 [V]: 0 text, 1 image, 2 special (Vocabulary.modality_table())
    boi_id: int
    eoi_id: int
    eos_id: int
    pad_id: int
    image_tokens_per_image: int
    max_seq_len: int

    @classmethod
    def from_vocab(cls, vocab, max_seq_len: int, device: torch.device | str | None = None) -> TokenRules:
        return cls(
            modality_table=vocab.modality_table(padded=True).to(device),
            boi_id=vocab.boi_id,
            eoi_id=vocab.eoi_id,
            eos_id=vocab.eos_id,
            pad_id=vocab.pad_id,
            image_tokens_per_image=vocab.image_tokens_per_image,
            max_seq_len=max_seq_len,
        )


@dataclass
class DecodeState:
    """Per-row decoding state, int32 [B] each, updated in place by every step."""

    mode: torch.Tensor  # 0 text, 1 inside an image
    codes_written: torch.Tensor  # image codes written in the current image
    position: torch.Tensor  # current sequence length (index the next token goes to)
    done: torch.Tensor  # 1 once <eos> was emitted or the context is full

    @classmethod
    def start(cls, positions: torch.Tensor | list[int], device: torch.device | str | None = None) -> DecodeState:
        """Text mode after prompts of the given lengths (prompts must not end inside an image)."""
        pos = torch.as_tensor(positions, dtype=torch.int32, device=device).clone()
        z = torch.zeros_like(pos)
        return cls(mode=z.clone(), codes_written=z.clone(), position=pos, done=z.clone())

    def clone(self) -> DecodeState:
        return DecodeState(self.mode.clone(), self.codes_written.clone(), self.position.clone(), self.done.clone())


# ---- counter-based random numbers (shared bit-for-bit by kernel and reference) ------------------
def _mix32_int(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK32
    h ^= h >> 16
    return h


def _mix32_torch(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def rng_key(seed: int, offset: int) -> int:
    """One 32-bit key per (seed, step): the kernel and the reference hash it with the row index."""
    return _mix32_int((seed & _MASK32) ^ ((offset * 0x9E3779B9 + 0x7F4A7C15) & _MASK32))


def sampling_uniforms(seed: int, offset: int, n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """fp32 [n] in [0, 1): the uniform each CFG group / sequence uses at step ``offset``."""
    g = torch.arange(n, dtype=torch.int64, device=device)
    h = _mix32_torch(rng_key(seed, offset) ^ ((g * 0x9E3779B9) & _MASK32))
    return (h >> 8).to(torch.float32) * (1.0 / 16777216.0)


def _order_key(z: torch.Tensor) -> torch.Tensor:
    b = z.contiguous().view(torch.int32)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


# ---- checks ------------------------------------------------------------------------------------
def _check(logits: torch.Tensor, state: DecodeState, rules: TokenRules, params: SamplingParams) -> int:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"logits dtype must be fp32/bf16/fp16, got {logits.dtype}")
    b, v = logits.shape
    if b % params.cfg_groups:
        raise ValueError(f"batch {b} is not a multiple of cfg_groups={params.cfg_groups}")
    t = rules.modality_table
    if t.dtype != torch.int8 or t.dim() != 1 or t.numel() != v:
        raise ValueError(f"rules.modality_table must be int8 [{v}] (the logits' vocab), got {t.dtype} {tuple(t.shape)}")
    for name in ("mode", "codes_written", "position", "done"):
        x = getattr(state, name)
        if x.dtype != torch.int32 or x.shape != (b,) or x.device != logits.device or not x.is_contiguous():
            raise ValueError(
                f"state.{name} must be a contiguous int32 [{b}] tensor on {logits.device}, "
                f"got {x.dtype} {tuple(x.shape)} on {x.device}"
            )
    for name in ("boi_id", "eoi_id", "eos_id", "pad_id"):
        if not 0 <= getattr(rules, name) < v:
            raise ValueError(f"rules.{name}={getattr(rules, name)} outside the vocabulary [0, {v})")
    return b // params.cfg_groups


# ---- reference -----------------------------------------------------------------------------------
def _keep_reference(z: torch.Tensor, allowed: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Kept ids of rows that share one (top_k, top_p); z is -inf where not allowed."""
    n_allowed = allowed.sum(-1, keepdim=True)
    keep = allowed.clone()
    if top_k > 0:
        k = min(top_k, z.shape[-1])
        kth = torch.topk(z, k, dim=-1).values[:, -1:]
        keep &= (z >= kth) | (n_allowed <= top_k)
    if top_p < 1.0:
        m = z.max(-1, keepdim=True).values
        w = torch.where(keep, torch.exp(z - m), 0.0)
        zk = w.sum(-1, keepdim=True)
        if top_k > 0:
            vals = torch.topk(torch.where(keep, z, float("-inf")), min(top_k, z.shape[-1]), dim=-1).values
        else:
            vals = torch.sort(torch.where(keep, z, float("-inf")), dim=-1, descending=True).values
        ws = torch.exp(vals - m)  # -inf entries give 0
        excl = torch.cumsum(ws, -1) - ws
        ok = (excl < top_p * zk) & torch.isfinite(vals)
        thr = torch.where(ok, vals, float("inf")).min(-1, keepdim=True).values
        keep &= z >= thr
    return keep


def _guided(x: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Classifier-free guidance of x [groups, n, V] (fp32): the logits image rows sample from; x[0] (the
    conditional stream) without CFG."""
    c = x[0]
    if params.cfg_groups == 2:
        return x[1] + params.cfg_scale * (c - x[1])
    if params.cfg_groups == 3:
        u, i = x[1], x[2]
        return u + params.cfg_scale * (i - u) + params.cfg_scale_text * (c - i)
    return c


def _allowed(rules: TokenRules, in_img: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """[n, V] tokens each row may emit: text rows text ids, <eos>, and <boi> when a whole image still fits;
    image rows image codes (the forced <eoi> is applied after sampling). Built from two [V] masks and one
    <boi> column, not [n, V] id comparisons."""
    table = rules.modality_table
    text_ok = table == 0
    text_ok[rules.eos_id] = True
    img_ok = table == 1
    fits = pos + rules.image_tokens_per_image + 2 <= rules.max_seq_len
    allowed = torch.where(in_img[:, None], img_ok[None, :], text_ok[None, :])
    allowed[:, rules.boi_id] = torch.where(in_img, img_ok[rules.boi_id], text_ok[rules.boi_id] | fits)
    return allowed


def sample_step_reference(
    logits: torch.Tensor,
    state: DecodeState,
    rules: TokenRules,
    params: SamplingParams,
    seed: int,
    offset: int,
    probs_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-PyTorch sampling step (same contract as ``sample_step``)."""
    n = _check(logits, state, rules, params)
    g_rows = params.cfg_groups
    dev = logits.device
    mode = state.mode[:n].long()
    cw = state.codes_written[:n].long()
    pos = state.position[:n].long()
    done = state.done[:n] != 0
    in_img = mode == MODE_IMAGE
    if probs_out is None and _all_greedy(params, in_img):
        return _greedy_step(logits, state, rules, params, n, mode, cw, pos, done, in_img)
    x = logits.float().view(g_rows, n, -1)
    v = x.shape[-1]
    ids = torch.arange(v, device=dev)
    xg = torch.where(in_img[:, None], _guided(x, params), x[0])
    allowed = _allowed(rules, in_img, pos)

    temps = torch.where(in_img, params.image.temperature, params.text.temperature).to(torch.float32)
    greedy = temps <= 0
    inv_t = torch.where(greedy, 1.0, 1.0 / torch.where(greedy, 1.0, temps))
    z = torch.where(allowed, xg * inv_t[:, None], float("-inf")) + 0.0
    m = z.max(-1, keepdim=True).values
    if all(mp.top_k == 0 and mp.top_p >= 1.0 for mp in (params.text, params.image)):
        keep = allowed  # no truncation in either modality: _keep_reference would return allowed
    else:
        keep = torch.zeros_like(allowed)
        for flag, mp in ((False, params.text), (True, params.image)):
            rows = in_img == flag
            if bool(rows.any()):
                keep[rows] = _keep_reference(z[rows], allowed[rows], mp.top_k, mp.top_p)
    w = torch.where(keep, torch.exp(z - m), 0.0)
    total = w.sum(-1)
    u = sampling_uniforms(seed, offset, n, dev)
    cs = torch.cumsum(w, -1)
    hit = keep & (cs > (u * total)[:, None])
    big = torch.full_like(ids, v)
    first = torch.where(hit, ids[None, :], big[None, :]).min(-1).values
    last = torch.where(keep, ids[None, :], -1).max(-1).values
    tok = torch.where(first < v, first, last)
    tok = torch.where(greedy, z.argmax(-1), tok)
    forced = in_img & (cw >= rules.image_tokens_per_image)
    tok = torch.where(forced, rules.eoi_id, tok)
    tok = torch.where(done, rules.pad_id, tok)

    if probs_out is not None:
        probs = w / total[:, None]
        onehot = (ids[None, :] == tok[:, None]).float()
        stochastic = ~done & ~forced & ~greedy
        probs_out.copy_(torch.where(stochastic[:, None], probs, onehot))

    return _advance(state, rules, g_rows, tok, mode, cw, pos, done, in_img, forced)


def _advance(state, rules, g_rows, tok, mode, cw, pos, done, in_img, forced) -> torch.Tensor:
    """Write the new state of every row of each group (in place) and return the tokens [g_rows * n]."""
    new_mode = torch.where(in_img, torch.where(forced, 0, 1), (tok == rules.boi_id).long())
    new_cw = torch.where(in_img & ~forced, cw + 1, 0)
    new_pos = pos + 1
    new_done = (tok == rules.eos_id) | (new_pos >= rules.max_seq_len)
    new_mode = torch.where(done, mode, new_mode)
    new_cw = torch.where(done, cw, new_cw)
    new_pos = torch.where(done, pos, new_pos)
    new_done = done | new_done
    if g_rows == 1:  # copy_ casts to int32 itself; no repeat needed
        state.mode.copy_(new_mode)
        state.codes_written.copy_(new_cw)
        state.position.copy_(new_pos)
        state.done.copy_(new_done)
        return tok
    rep = (g_rows,)
    state.mode.copy_(new_mode.repeat(rep).to(torch.int32))
    state.codes_written.copy_(new_cw.repeat(rep).to(torch.int32))
    state.position.copy_(new_pos.repeat(rep).to(torch.int32))
    state.done.copy_(new_done.repeat(rep).to(torch.int32))
    return tok.repeat(rep)


def _all_greedy(params: SamplingParams, in_img: torch.Tensor) -> bool:
    """Every row's modality samples greedily (temperature 0): top-k / top-p and the uniform cannot
    change an argmax, so the step is a masked argmax (``_greedy_step``)."""
    t, i = params.text.temperature <= 0, params.image.temperature <= 0
    if t and i:
        return True
    if not (t or i):
        return False
    any_img = bool(in_img.any())  # one host sync; this path is the CPU reference
    return (t and not any_img) or (i and bool(in_img.all()))


def _greedy_step(logits, state, rules, params, n, mode, cw, pos, done, in_img) -> torch.Tensor:
    """The reference's greedy branch with less work: no temperature / exp / cumsum / uniforms, no
    [n, V] id comparisons (the allowed set is two [V] masks and one column). Same tokens: the
    reference's greedy token is ``argmax(where(allowed, x * 1.0, -inf) + 0.0)`` (first maximum), and
    masking x directly ranks the same values (bf16 -> fp32 is exact; -0.0 == 0.0)."""
    g_rows = params.cfg_groups
    if g_rows == 1 or not bool(in_img.any()):
        xg = logits[:n]  # text rows use the conditional row as is
    else:
        x = logits.float().view(g_rows, n, -1)
        xg = torch.where(in_img[:, None], _guided(x, params), x[0])
    tok = torch.where(_allowed(rules, in_img, pos), xg, float("-inf")).argmax(-1)
    forced = in_img & (cw >= rules.image_tokens_per_image)
    tok = torch.where(forced, rules.eoi_id, tok)
    tok = torch.where(done, rules.pad_id, tok)
    return _advance(state, rules, g_rows, tok, mode, cw, pos, done, in_img, forced)


# ---- Triton ---------------------------------------------------------------------------------------
# The vocabulary chunks the kernel is launched with: 4096 for real vocabularies, 512 for small ones
# (test and demo vocabularies). Two sizes, not one per power of two: each constexpr value is another
# compile at the first launch on a GPU and in tessera.kernels.aot's sweep, for no speed that matters.
TRITON_BLOCKS = (512, 4096)


def _block_size(v: int) -> int:
    return TRITON_BLOCKS[0] if v <= TRITON_BLOCKS[0] else TRITON_BLOCKS[1]


def _aligned_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` [B, V] when every row starts 16-byte aligned (base address, and a row stride Triton sees as
    divisible by 16), else a copy into such a buffer. The kernel re-reads the logits on every pass;
    aligned rows get vectorised loads, and one compiled variant instead of one per misalignment."""
    if x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and x.stride(0) % 16 == 0:
        return x
    b, v = x.shape
    out = torch.empty(b, -(-v // 16) * 16, dtype=x.dtype, device=x.device)[:, :v]
    out.copy_(x)
    return out


def sample_step_triton(
    logits: torch.Tensor,
    state: DecodeState,
    rules: TokenRules,
    params: SamplingParams,
    seed: int,
    offset: int,
    probs_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One Triton launch for the whole batch (same contract as ``sample_step``)."""
    from . import _sampling_triton

    n = _check(logits, state, rules, params)
    logits = _aligned_rows(logits)
    b, v = logits.shape
    tokens = torch.empty(b, dtype=torch.int64, device=logits.device)
    write_probs = probs_out is not None
    if write_probs:
        if probs_out.shape != (n, v) or probs_out.dtype != torch.float32 or probs_out.stride(-1) != 1:
            raise ValueError(f"probs_out must be fp32 [{n}, {v}] with unit last stride")
    probs = probs_out if write_probs else tokens  # dummy pointer when unused
    table = rules.modality_table.to(logits.device)
    if table.stride(0) != 1 or table.data_ptr() % 16:
        table = table.clone(memory_format=torch.contiguous_format)  # read on every pass, as the logits
    tp, ip = params.text, params.image
    _sampling_triton.sample_step_kernel[(n,)](
        logits, logits.stride(0), table, state.mode, state.codes_written, state.position, state.done,
        tokens, probs, probs.stride(0) if write_probs else 0,
        v, n, rules.boi_id, rules.eoi_id, rules.eos_id, rules.pad_id, rules.image_tokens_per_image,
        rules.max_seq_len,
        float(tp.temperature), int(tp.top_k), float(tp.top_p),
        float(ip.temperature), int(ip.top_k), float(ip.top_p),
        float(params.cfg_scale), float(params.cfg_scale_text), rng_key(seed, offset),
        CFG=params.cfg_groups, WRITE_PROBS=write_probs, BLOCK=_block_size(v),
    )
    return tokens


def sample_step(
    logits: torch.Tensor,
    state: DecodeState,
    rules: TokenRules,
    params: SamplingParams,
    seed: int,
    offset: int,
    probs_out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Sample the next token of every row and advance ``state`` in place.

    logits: [B, V] fp32/bf16, B = cfg_groups * n. Returns int64 [B] (rows of a CFG group share the
    token). ``probs_out`` (fp32 [n, V]) receives the distribution each group's token was drawn from
    (one-hot for greedy, forced and done rows). ``offset`` is the decoding step: the same
    (seed, offset) gives the same uniforms. backend: 'auto' (Triton on CUDA, else reference),
    'triton' or 'reference'.
    """
    if resolve_backend(backend, logits, "sample_step") == "triton":
        return sample_step_triton(logits, state, rules, params, seed, offset, probs_out)
    return sample_step_reference(logits, state, rules, params, seed, offset, probs_out)
