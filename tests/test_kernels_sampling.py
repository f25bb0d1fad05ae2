"""Modality-masked sampling: Triton kernel (interpreted on CPU) vs the PyTorch reference, state machine,
CFG combine, and top-k / top-p against brute-force sort-based sets."""

import os
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest
import torch

from tessera.kernels import _backend
from tessera.kernels.sampling import (
    DecodeState,
    ModalitySampling,
    SamplingParams,
    TokenRules,
    sample_step,
)

# Small synthetic vocabulary: specials | text | image codes | padding (special).
PAD, EOS, BOI, EOI = 0, 1, 2, 3
N_SPECIAL, N_TEXT, N_IMAGE, N_PAD = 8, 192, 128, 8
V = N_SPECIAL + N_TEXT + N_IMAGE + N_PAD  # 336
TEXT = range(N_SPECIAL, N_SPECIAL + N_TEXT)
IMAGE = range(N_SPECIAL + N_TEXT, N_SPECIAL + N_TEXT + N_IMAGE)
N_CODES = 4
MAX_LEN = 32


def _rules(max_len: int = MAX_LEN) -> TokenRules:
    table = torch.full((V,), 2, dtype=torch.int8)
    table[TEXT.start : TEXT.stop] = 0
    table[IMAGE.start : IMAGE.stop] = 1
    return TokenRules(table, BOI, EOI, EOS, PAD, N_CODES, max_len)


def _state(rows: list[tuple[int, int, int, int]], groups: int = 1) -> DecodeState:
    """rows: (mode, codes_written, position, done) per sequence, replicated over the CFG groups."""
    cols = [torch.tensor([r[j] for r in rows] * groups, dtype=torch.int32) for j in range(4)]
    return DecodeState(*cols)


@pytest.fixture(scope="module", autouse=True)
def _interp():
    _backend.use_triton_interpreter()


def _step(backend, logits, state, rules, params, seed=7, offset=0):
    n = logits.shape[0] // params.cfg_groups
    probs = torch.zeros(n, logits.shape[1], dtype=torch.float32)
    tok = sample_step(logits, state, rules, params, seed, offset, probs_out=probs, backend=backend)
    return tok, probs


def _assert_same_state(a: DecodeState, b: DecodeState):
    for f in ("mode", "codes_written", "position", "done"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f


MIXED = [(0, 0, 3, 0), (1, 1, 10, 0), (1, N_CODES, 12, 0), (0, 0, MAX_LEN - N_CODES - 2, 0)]

PARAMS = {
    "default": SamplingParams(),
    "per_modality": SamplingParams(
        text=ModalitySampling(temperature=0.7, top_k=20, top_p=0.9),
        image=ModalitySampling(temperature=1.3, top_k=0, top_p=0.8),
    ),
    "greedy_text_topk_image": SamplingParams(
        text=ModalitySampling(temperature=0.0), image=ModalitySampling(temperature=1.0, top_k=5)
    ),
    "cfg2": SamplingParams(image=ModalitySampling(top_k=30, top_p=0.95), cfg_groups=2, cfg_scale=3.0),
    "cfg3": SamplingParams(
        text=ModalitySampling(top_p=0.9),
        image=ModalitySampling(temperature=0.9, top_k=40),
        cfg_groups=3,
        cfg_scale=2.5,
        cfg_scale_text=1.5,
    ),
}


@pytest.mark.parametrize("name", list(PARAMS))
def test_kernel_matches_reference_over_steps(name):
    params = PARAMS[name]
    g = params.cfg_groups
    rules = _rules()
    gen = torch.Generator().manual_seed(hash(name) % 1000)
    s_ref = _state(MIXED, g)
    s_tri = s_ref.clone()
    for step in range(4):
        logits = torch.randn(g * len(MIXED), V, generator=gen) * 2.0
        t_ref, p_ref = _step("reference", logits, s_ref, rules, params, seed=11, offset=step)
        t_tri, p_tri = _step("triton", logits, s_tri, rules, params, seed=11, offset=step)
        assert torch.equal(t_ref, t_tri), (step, t_ref, t_tri)
        _assert_same_state(s_ref, s_tri)
        assert torch.equal(p_ref == 0, p_tri == 0)  # same kept sets
        torch.testing.assert_close(p_tri, p_ref, atol=1e-6, rtol=1e-5)
        # Every row of a CFG group gets the same token and state.
        assert (t_tri.view(g, -1) == t_tri.view(g, -1)[:1]).all()
        assert (s_tri.position.view(g, -1) == s_tri.position.view(g, -1)[:1]).all()
        assert (s_tri.mode.view(g, -1) == s_tri.mode.view(g, -1)[:1]).all()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_state_transitions(backend):
    rules = _rules()
    params = SamplingParams()
    logits = torch.zeros(6, V)
    logits[:, BOI] = 50.0  # <boi> dominates wherever it is allowed
    logits[:, IMAGE.start + 5] = 40.0  # would win in text mode if image codes were allowed
    rows = [
        (0, 0, MAX_LEN - N_CODES - 2, 0),  # <boi> + N codes + <eoi> still fit -> <boi>
        (0, 0, MAX_LEN - N_CODES - 1, 0),  # does not fit -> <boi> masked
        (1, 2, 10, 0),  # inside an image -> only image codes
        (1, N_CODES, 12, 0),  # last code written -> forced <eoi>
        (0, 0, 5, 1),  # done -> <pad>, state unchanged
        (1, N_CODES - 1, MAX_LEN - 1, 0),  # last position of the context -> done after this token
    ]
    state = _state(rows)
    tok, probs = _step(backend, logits, state, rules, params)
    tok = tok.tolist()
    assert tok[0] == BOI
    assert tok[1] != BOI and tok[1] in TEXT or tok[1] == EOS
    assert probs[1, BOI] == 0 and probs[1, IMAGE.start + 5] == 0
    assert tok[2] == IMAGE.start + 5
    assert probs[2, : IMAGE.start].sum() == 0 and probs[2, IMAGE.stop :].sum() == 0
    assert tok[3] == EOI and probs[3, EOI] == 1.0
    assert tok[4] == PAD
    assert tok[5] in IMAGE
    # Text rows: only text pieces, <eos>, (<boi>) have mass; other specials never.
    other_specials = [i for i in range(N_SPECIAL) if i not in (EOS, BOI)] + list(range(IMAGE.stop, V))
    assert probs[1, other_specials].sum() == 0
    assert state.mode.tolist() == [1, 0, 1, 0, 0, 1]
    assert state.codes_written.tolist() == [0, 0, 3, 0, 0, N_CODES]
    assert state.position.tolist() == [MAX_LEN - N_CODES - 1, MAX_LEN - N_CODES, 11, 13, 5, MAX_LEN]
    assert state.done.tolist() == [0, 0, 0, 0, 1, 1]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_eos_marks_done_and_full_image_cycle(backend):
    rules = _rules()
    logits = torch.full((1, V), -5.0)
    logits[0, EOS] = 30.0
    state = _state([(0, 0, 3, 0)])
    tok, _ = _step(backend, logits, state, rules, SamplingParams())
    assert tok.item() == EOS and state.done.item() == 1 and state.position.item() == 4
    # text -> <boi> -> N codes -> forced <eoi> -> text, greedy.
    params = SamplingParams(text=ModalitySampling(temperature=0.0), image=ModalitySampling(temperature=0.0))
    logits = torch.zeros(1, V)
    logits[0, BOI] = 10.0
    logits[0, IMAGE.start + 1] = 5.0
    state = _state([(0, 0, 0, 0)])
    seq = [_step(backend, logits, state, rules, params, offset=i)[0].item() for i in range(N_CODES + 2)]
    assert seq == [BOI] + [IMAGE.start + 1] * N_CODES + [EOI]
    assert state.mode.item() == 0 and state.codes_written.item() == 0 and state.position.item() == N_CODES + 2


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("groups", [2, 3])
def test_cfg_combine_by_hand(backend, groups):
    rules = _rules()
    params = SamplingParams(cfg_groups=groups, cfg_scale=2.0, cfg_scale_text=0.5)
    gen = torch.Generator().manual_seed(groups)
    logits = torch.randn(groups * 2, V, generator=gen) * 2.0
    state = _state([(1, 1, 10, 0), (0, 0, 3, 0)], groups)
    tok, probs = _step(backend, logits, state, rules, params)
    c, u = logits[0], logits[2]
    if groups == 3:
        i = logits[4]
        guided = u + 2.0 * (i - u) + 0.5 * (c - i)
    else:
        guided = u + 2.0 * (c - u)
    want = torch.zeros(V)
    want[IMAGE.start : IMAGE.stop] = torch.softmax(guided[IMAGE.start : IMAGE.stop].double(), 0).float()
    torch.testing.assert_close(probs[0], want, atol=1e-6, rtol=1e-5)
    # Text mode uses the conditional row alone.
    text_ids = [EOS, BOI] + list(TEXT)
    want_t = torch.zeros(V)
    want_t[text_ids] = torch.softmax(logits[1, text_ids].double(), 0).float()
    torch.testing.assert_close(probs[1], want_t, atol=1e-6, rtol=1e-5)
    assert (tok.view(groups, 2) == tok.view(groups, 2)[:1]).all()


def _brute_keep(z: torch.Tensor, top_k: int, top_p: float) -> set[int]:
    """Sort-based top-k / top-p over finite z (ties with the k-th value stay; tie groups kept whole)."""
    ids = [i for i in range(len(z)) if torch.isfinite(z[i])]
    order = sorted(ids, key=lambda i: -float(z[i]))
    if 0 < top_k < len(order):
        kth = float(z[order[top_k - 1]])
        order = [i for i in order if float(z[i]) >= kth]
    if top_p < 1.0:
        m = max(float(z[i]) for i in order)
        w = {i: torch.exp(torch.tensor(float(z[i]) - m, dtype=torch.float64)).item() for i in order}
        tot = sum(w.values())
        order = [i for i in order if sum(w[j] for j in order if float(z[j]) > float(z[i])) / tot < top_p]
    return set(order)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("top_k,top_p", [(7, 1.0), (0, 0.6), (25, 0.7), (1, 0.5), (500, 0.3)])
def test_topk_topp_sets_brute_force(backend, top_k, top_p):
    rules = _rules()
    temp = 0.8
    params = SamplingParams(
        text=ModalitySampling(temperature=temp, top_k=top_k, top_p=top_p),
        image=ModalitySampling(temperature=temp, top_k=top_k, top_p=top_p),
    )
    gen = torch.Generator().manual_seed(top_k * 10 + int(top_p * 10))
    logits = torch.round(torch.randn(3, V, generator=gen) * 4.0) / 2.0  # coarse grid -> many ties
    state = _state([(0, 0, 3, 0), (1, 0, 10, 0), (0, 0, MAX_LEN - 2, 0)])
    _, probs = _step(backend, logits, state, rules, params)
    allowed_text = torch.zeros(V, dtype=torch.bool)
    allowed_text[list(TEXT) + [EOS]] = True
    allowed_img = torch.zeros(V, dtype=torch.bool)
    allowed_img[IMAGE.start : IMAGE.stop] = True
    masks = [allowed_text.clone(), allowed_img, allowed_text]
    masks[0][BOI] = True  # row 0 has room for an image, row 2 does not
    for r in range(3):
        z = torch.where(masks[r], logits[r] / temp, float("-inf"))
        want = _brute_keep(z, top_k, top_p)
        got = set(torch.nonzero(probs[r] > 0).flatten().tolist())
        assert got == want, (r, sorted(got ^ want))
        kept = sorted(want)
        w = torch.exp((z[kept] - z[kept].max()).double())
        torch.testing.assert_close(probs[r, kept].double(), w / w.sum(), atol=1e-6, rtol=1e-5)


def test_backend_dispatch_and_errors():
    rules = _rules()
    state = _state([(0, 0, 3, 0)])
    logits = torch.randn(1, V)
    # auto on CPU = reference; same tokens as triton for the same (seed, offset).
    a = sample_step(logits, state.clone(), rules, SamplingParams(), 3, 1)
    b = sample_step(logits, state.clone(), rules, SamplingParams(), 3, 1, backend="triton")
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="backend"):
        sample_step(logits, state.clone(), rules, SamplingParams(), 3, 1, backend="cuda")
    with pytest.raises(ValueError, match="cfg_groups"):
        sample_step(torch.randn(3, V), _state([(0, 0, 3, 0)] * 3), rules, SamplingParams(cfg_groups=2), 3, 1)


def test_use_triton_interpreter_after_compiled_import():
    """Switching to the interpreter after the kernel module was imported compiled re-decorates it."""
    code = (
        "import os; os.environ.pop('TRITON_INTERPRET', None)\n"
        "from tessera.kernels import _backend, _sampling_triton\n"
        "assert not _backend._kernels_interpreted()\n"
        "import tessera.kernels as k; k.use_triton_interpreter()\n"
        "assert _backend._kernels_interpreted()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_streams_row_in_several_blocks(monkeypatch, dtype):
    """Small blocks (3 per row) exercise the cross-block max/argmax, bisection counts and running CDF."""
    from tessera.kernels import sampling

    monkeypatch.setattr(sampling, "_block_size", lambda v: 128)
    params = SamplingParams(
        text=ModalitySampling(temperature=0.9, top_k=50, top_p=0.85),
        image=ModalitySampling(temperature=1.1, top_p=0.9),
        cfg_groups=2,
        cfg_scale=2.0,
    )
    rules = _rules()
    gen = torch.Generator().manual_seed(5)
    s_ref = _state(MIXED, 2)
    s_tri = s_ref.clone()
    for step in range(2):
        logits = (torch.randn(2 * len(MIXED), V, generator=gen) * 2.0).to(dtype)
        t_ref, p_ref = _step("reference", logits, s_ref, rules, params, seed=2, offset=step)
        t_tri, p_tri = _step("triton", logits, s_tri, rules, params, seed=2, offset=step)
        assert torch.equal(t_ref, t_tri)
        _assert_same_state(s_ref, s_tri)
        torch.testing.assert_close(p_tri, p_ref, atol=1e-6, rtol=1e-5)


GREEDY = ModalitySampling(temperature=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(text=GREEDY, image=GREEDY),
        SamplingParams(text=GREEDY, image=GREEDY, cfg_groups=2, cfg_scale=3.0),
        SamplingParams(text=GREEDY, image=GREEDY, cfg_groups=3, cfg_scale=2.5, cfg_scale_text=1.5),
        SamplingParams(text=GREEDY, image=ModalitySampling(temperature=1.0, top_p=0.9)),  # fast while all text
        SamplingParams(text=ModalitySampling(top_k=5), image=GREEDY),  # fast while all in an image
        SamplingParams(),  # no truncation: keep = allowed without _keep_reference
    ],
    ids=["greedy", "greedy_cfg2", "greedy_cfg3", "greedy_text", "greedy_image", "untruncated"],
)
def test_reference_fast_paths_equal_general_path(params, dtype):
    """The reference's greedy / untruncated fast paths give the general path's tokens and states (the
    general path runs when probs_out is requested). Integer logits make ties (first maximum wins);
    rows cover text, image, forced <eoi>, done, and <boi> fitting exactly / not fitting."""
    rules = _rules()
    g = params.cfg_groups
    rows = [(0, 0, 3, 0), (1, 1, 10, 0), (1, N_CODES, 12, 0), (0, 0, MAX_LEN - N_CODES - 2, 0),
            (0, 0, MAX_LEN - N_CODES - 1, 0), (0, 0, 5, 1)]
    text_rows = [r for r in rows if r[0] == 0]
    img_rows = [r for r in rows if r[0] == 1 and r[1] < N_CODES]
    gen = torch.Generator().manual_seed(5)
    for state_rows in (rows, text_rows, img_rows):
        fast, general = _state(state_rows, g), _state(state_rows, g)
        for step in range(4):
            logits = torch.randint(-3, 4, (g * len(state_rows), V), generator=gen).to(dtype)
            logits[:, BOI] = 5  # <boi> wins whenever it is allowed
            t_fast = sample_step(logits, fast, rules, params, 3, step, backend="reference")
            t_gen, _ = _step("reference", logits, general, rules, params, seed=3, offset=step)
            assert torch.equal(t_fast, t_gen), (state_rows, step, t_fast, t_gen)
            _assert_same_state(fast, general)


def test_untruncated_keep_is_allowed():
    """What the untruncated shortcut (keep = allowed) skips: _keep_reference with top-k and top-p off."""
    from tessera.kernels.sampling import _keep_reference

    gen = torch.Generator().manual_seed(0)
    allowed = torch.rand(3, V, generator=gen) > 0.3
    z = torch.where(allowed, torch.randint(-3, 4, (3, V), generator=gen).float(), float("-inf"))
    assert torch.equal(_keep_reference(z, allowed, 0, 1.0), allowed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unaligned_logits_and_table_are_realigned(dtype):
    """A misaligned view with an odd row stride (and a misaligned modality table): the host code copies
    them to 16-byte-aligned rows for the kernel (one compiled variant, vectorised loads); same result."""
    from tessera.kernels.sampling import _aligned_rows

    params = PARAMS["per_modality"]
    gen = torch.Generator().manual_seed(9)
    flat = (torch.randn(len(MIXED) * (V + 3) + 1, generator=gen) * 2.0).to(dtype)
    logits = flat[1:].view(len(MIXED), V + 3)[:, :V]
    assert logits.data_ptr() % 16 and logits.stride(0) % 16
    aligned = _aligned_rows(logits)
    assert aligned.data_ptr() % 16 == 0 and aligned.stride(0) % 16 == 0 and torch.equal(aligned, logits)
    assert _aligned_rows(aligned) is aligned
    rules = _rules()
    table = torch.empty(V + 1, dtype=torch.int8)[1:]
    rules = TokenRules(table.copy_(rules.modality_table), *[getattr(rules, f) for f in
                       ("boi_id", "eoi_id", "eos_id", "pad_id", "image_tokens_per_image", "max_seq_len")])
    s_ref, s_tri = _state(MIXED), _state(MIXED)
    t_ref, p_ref = _step("reference", logits, s_ref, rules, params)
    t_tri, p_tri = _step("triton", logits, s_tri, rules, params)
    assert torch.equal(t_ref, t_tri)
    _assert_same_state(s_ref, s_tri)
    torch.testing.assert_close(p_tri, p_ref, atol=1e-6, rtol=1e-5)
