"""KV-cached decoding, the sampling state machine through the engine, CFG, determinism, and greedy
equivalence with transformers' Chameleon (tiny random models, CPU, fp32)."""

from __future__ import annotations

import shutil

import pytest
import torch

from tessera.generate.config import GenerationConfig, SamplingParams
from tessera.generate.decoder import KVCacheDecoder
from tessera.generate.engine import GenerationEngine, GenerationError
from tessera.model.chameleon import build_model
from tessera.model.config import ModelConfig
from tessera.model.parallel import ensure_single_process
from tessera.tokenizers.vocab import Modality, Vocabulary


def has_c_compiler() -> bool:
    return any(shutil.which(c) for c in ("cc", "gcc", "clang"))


VOCAB = Vocabulary(num_text_tokens=40, num_image_codes=32, image_tokens_per_image=4, pad_to_multiple_of=128)


def make_model(groups: int | None = 2, swin: bool = False, seed: int = 0, seq: int = 96, scale: float = 0.1):
    """A tiny Chameleon GPTModel with every weight (QK-norm affines included) randomised."""
    ensure_single_process()
    cfg = ModelConfig(
        num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=groups,
        vocab_size=VOCAB.padded_size, seq_length=seq, swin_norm=swin,
    )
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture(scope="module")
def model():
    return make_model()


def full_logits(model, ids: list[int]) -> torch.Tensor:
    """The GPTModel's own full forward (no cache): logits [s, V]."""
    x = torch.tensor([ids])
    with torch.no_grad():
        return model(x, torch.arange(len(ids))[None], None)[0].float()


@pytest.mark.parametrize("fused", [False, True], ids=["torch-step", "fused-c-step"])
@pytest.mark.parametrize("groups,swin", [(2, False), (None, False), (2, True)], ids=["gqa", "mha", "swin"])
def test_cached_decoding_equals_full_forward(groups, swin, fused):
    """Both step implementations (PyTorch ops; the fused C step, tessera/kernels/cpu_decode.c)."""
    if fused and not has_c_compiler():
        pytest.skip("no C compiler: the fused CPU step cannot be built")
    model = make_model(groups=groups, swin=swin, seed=1)
    dec = KVCacheDecoder(model, dtype=torch.float32, fused_cpu_step=fused)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(8, 80, (n,), generator=g).tolist() for n in (13, 7, 10)]
    prompt = [9, 3, 6]  # ragged prompt lengths in one left-padded batch
    width = max(prompt)
    ids = torch.zeros(3, width, dtype=torch.long)
    for r, (s, p) in enumerate(zip(seqs, prompt, strict=True)):
        ids[r, width - p :] = torch.tensor(s[:p])
    pad = torch.tensor([width - p for p in prompt])
    dec.allocate(3, width + 5)
    refs = [full_logits(model, s) for s in seqs]
    got = dec.prefill(ids, pad)
    for step in range(3):
        for r, p in enumerate(prompt):
            torch.testing.assert_close(got[r].float(), refs[r][p - 1 + step], atol=2e-5, rtol=1e-4)
        got = dec.step(torch.tensor([seqs[r][prompt[r] + step] for r in range(3)]))


def test_prefill_all_positions_equal_full_forward(model):
    dec = KVCacheDecoder(model, dtype=torch.float32)
    ids = list(range(8, 30))
    dec.allocate(1, len(ids))
    got = dec.prefill(torch.tensor([ids]), torch.tensor([0]), all_logits=True)[0]
    torch.testing.assert_close(got, full_logits(model, ids), atol=2e-5, rtol=1e-4)


def uniform_engine(model) -> GenerationEngine:
    """Flat logits (plus a push towards <boi>, away from <eos>): the sampler then draws from whatever
    the state machine allows, exercising every transition (text, <boi>, codes, forced <eoi>, <eos>,
    and <boi> refused near the end of the budget)."""
    eng = GenerationEngine(model, VOCAB, context_length=96, dtype="float32")
    with torch.no_grad():
        eng.decoder.final_norm.weight.zero_()  # the engine's private copy; the model is untouched
    bias = torch.zeros(VOCAB.padded_size)
    bias[VOCAB.boi_id], bias[VOCAB.eos_id] = 2.5, -1.0
    dec = eng.decoder
    for name in ("prefill", "step"):
        setattr(dec, name, (lambda f: lambda *a, **k: f(*a, **k) + bias)(getattr(dec, name)))
    return eng


def check_grammar(ids: list[int], allow_images: bool) -> int:
    """Assert the token grammar; return the number of complete images."""
    table = VOCAB.modality_table()
    images = 0
    inside, codes = False, 0
    for t in ids:
        if inside:
            if codes < VOCAB.image_tokens_per_image:
                assert table[t] == Modality.IMAGE, f"non-code {t} inside an image"
                codes += 1
            else:
                assert t == VOCAB.eoi_id, "image not closed right after its last code"
                inside, images = False, images + 1
            continue
        assert table[t] != Modality.IMAGE, f"image code {t} outside an image"
        if t == VOCAB.boi_id:
            assert allow_images, "<boi> in text mode"
            inside, codes = True, 0
        else:
            assert table[t] == Modality.TEXT or t == VOCAB.eos_id, f"forbidden special {t}"
    assert not inside, "an image was cut off (it must only start where it fits)"
    return images


def test_state_machine_interleaved_and_text_modes(model):
    eng = uniform_engine(model)
    prompts = [[VOCAB.bos_id, 10, 11], [VOCAB.bos_id, 12], [VOCAB.bos_id], [VOCAB.bos_id, 13, 14, 15]] * 2
    total_images = 0
    # One batch of 8 rows (each row draws its own uniforms) keeps the step count, hence the time, low.
    cfg = GenerationConfig(mode="interleaved", max_new_tokens=64, seed=0, cfg_scale=1.0,
                           text=SamplingParams(1.0, 0, 1.0), image=SamplingParams(1.0, 0, 1.0))
    res, _ = eng.generate(prompts, cfg)
    for r in res:
        body = r.new_ids[:-1] if r.finish_reason == "eos" else r.new_ids
        assert VOCAB.eos_id not in body
        total_images += check_grammar(body, allow_images=True)
        assert len(r.prompt_ids) + len(r.new_ids) <= 96
    cfg.mode, cfg.max_new_tokens = "text", 32
    for r in eng.generate(prompts, cfg)[0]:
        check_grammar(r.new_ids[:-1] if r.finish_reason == "eos" else r.new_ids, allow_images=False)
    assert total_images > 0  # uniform over ~42 allowed ids: images do happen


def test_image_mode_exact_codes_then_stops(model):
    eng = GenerationEngine(model, VOCAB, context_length=96, dtype="float32")
    cfg = GenerationConfig(mode="image", max_new_tokens=20, seed=5)
    res, _ = eng.generate([[VOCAB.bos_id, 10, 11, 12], [VOCAB.bos_id, 13]], cfg)
    for r in res:
        assert r.finish_reason == "image"
        assert r.open_prefix == [VOCAB.boi_id] and r.prompt_ids[-1] == VOCAB.boi_id
        segs = VOCAB.decode_document(r.prompt_ids + r.new_ids, lambda p: "x" * len(p), strict=True)
        assert len(segs[-1].codes) == VOCAB.image_tokens_per_image  # the whole sequence is well formed
        n = VOCAB.image_tokens_per_image
        assert len(r.new_ids) == n + 1 and r.new_ids[-1] == VOCAB.eoi_id
        assert all(VOCAB.image_offset <= t < VOCAB.size for t in r.new_ids[:n])


def test_max_images_limits_boi(model):
    eng = uniform_engine(model)
    cfg = GenerationConfig(mode="interleaved", max_new_tokens=80, max_images=1, cfg_scale=1.0,
                           text=SamplingParams(1.0, 0, 1.0))
    for seed in range(1):
        cfg.seed = seed
        for r in eng.generate([[VOCAB.bos_id]] * 8, cfg)[0]:
            assert r.new_ids.count(VOCAB.boi_id) <= 1


def test_cfg_rows_and_layout(model):
    eng = GenerationEngine(model, VOCAB, context_length=96, dtype="float32")
    img = [VOCAB.boi_id] + [VOCAB.image_offset + k for k in range(4)] + [VOCAB.eoi_id]
    prompt = [VOCAB.bos_id, 10, 11] + img + [12]
    plan = eng.plan([prompt], GenerationConfig(mode="image", cfg_scale=3.0, cfg_image_scale=1.5))
    assert plan.streams == 3
    assert plan.rows == [prompt + [VOCAB.boi_id], [VOCAB.bos_id, VOCAB.boi_id], [VOCAB.bos_id] + img + [VOCAB.boi_id]]
    plan = eng.plan([prompt], GenerationConfig(mode="interleaved", cfg_scale=3.0))
    assert plan.streams == 2 and plan.rows[1] == [VOCAB.bos_id]
    assert eng.plan([prompt], GenerationConfig(mode="text", cfg_scale=3.0)).streams == 1
    assert eng.plan([prompt], GenerationConfig(mode="image", cfg_scale=1.0)).streams == 1


def test_cfg_scale_one_equals_no_cfg(model):
    eng = GenerationEngine(model, VOCAB, context_length=96, dtype="float32")
    prompts = [[VOCAB.bos_id, 10, 11, 12], [VOCAB.bos_id, 20]]
    base = GenerationConfig(mode="image", max_new_tokens=12, seed=7, cfg_scale=1.0, image=SamplingParams(1.0, 0, 1.0))
    assert eng.plan(prompts, base).streams == 1  # scale 1: no guidance rows at all
    plain, _ = eng.generate(prompts, base)
    forced = GenerationConfig(**{**base.__dict__, "cfg_scale": 1.0, "cfg_force": True})
    assert eng.plan(prompts, forced).streams == 2
    guided1, stats = eng.generate(prompts, forced)
    assert stats.rows == 4
    assert [r.new_ids for r in guided1] == [r.new_ids for r in plain]
    strong = GenerationConfig(**{**base.__dict__, "cfg_scale": 5.0})
    guided5, _ = eng.generate(prompts, strong)
    assert [r.new_ids for r in guided5] != [r.new_ids for r in plain]  # guidance is really applied


def test_seeded_determinism_and_streaming(model):
    eng = GenerationEngine(model, VOCAB, context_length=96, dtype="float32")
    prompts = [[VOCAB.bos_id, 10], [VOCAB.bos_id, 11, 12, 13]]
    cfg = GenerationConfig(mode="interleaved", max_new_tokens=30, seed=11, text=SamplingParams(1.0, 0, 1.0))
    seen: dict[int, list[int]] = {0: [], 1: []}
    a, _ = eng.generate(prompts, cfg, on_token=lambda s, t: seen[s].append(t))
    b, _ = eng.generate(prompts, cfg)
    assert [r.new_ids for r in a] == [r.new_ids for r in b]
    assert [seen[0], seen[1]] == [r.new_ids for r in a]
    cfg.seed = 12
    c, _ = eng.generate(prompts, cfg)
    assert [r.new_ids for r in c] != [r.new_ids for r in a]


def test_bf16_decoding_close_to_fp32(model):
    """The fast path: bf16 greedy text agrees with fp32 on most tokens of a tiny random model."""
    prompts = [[VOCAB.bos_id, 10, 11, 12]]
    cfg = GenerationConfig(mode="text", max_new_tokens=8, text=SamplingParams(0.0, 0, 1.0))
    f32 = GenerationEngine(model, VOCAB, 96, dtype="float32").decoder
    b16 = GenerationEngine(model, VOCAB, 96, dtype="bfloat16").decoder
    ids = torch.tensor(prompts)
    for d in (f32, b16):
        d.allocate(1, 8)
    a = f32.prefill(ids, torch.tensor([0]))
    b = b16.prefill(ids, torch.tensor([0])).float()
    assert (a - b).abs().max() < 0.05 * a.abs().max() + 0.05
    assert cfg.mode == "text"


def test_errors_are_clear(model):
    eng = GenerationEngine(model, VOCAB, context_length=96, dtype="float32")
    with pytest.raises(GenerationError, match="context is 96"):
        eng.generate([[VOCAB.bos_id] + [10] * 100], GenerationConfig(mode="text"))
    with pytest.raises(GenerationError, match="an image needs"):
        eng.generate([[VOCAB.bos_id] + [10] * 93], GenerationConfig(mode="image"))
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        eng.generate([[VOCAB.bos_id, 10_000]], GenerationConfig(mode="text"))
    with pytest.raises(GenerationError, match="vocabulary"):
        GenerationEngine(model, None, context_length=96)


def test_greedy_equals_transformers_greedy(model):
    """Same weights in transformers' ChameleonForConditionalGeneration: identical greedy text."""
    from tessera.testing.hf_reference import build_hf_chameleon

    hf = build_hf_chameleon(model, VOCAB, max_position_embeddings=96)
    eng = GenerationEngine(model, VOCAB, context_length=96, dtype="float32")
    prompts = [[VOCAB.bos_id, 10, 11, 12, 13], [VOCAB.bos_id, 30, 9]]
    cfg = GenerationConfig(mode="text", max_new_tokens=24, text=SamplingParams(0.0, 0, 1.0))
    ours, _ = eng.generate(prompts, cfg)
    table = VOCAB.modality_table()
    # Text mode allows text pieces and <eos>; transformers masks image ids itself, the rest we suppress.
    suppress = [i for i in range(VOCAB.padded_size) if table[i] != Modality.TEXT and i != VOCAB.eos_id]
    # Compare the logits of the first step too (not only the argmax).
    with torch.no_grad():
        hf_logits = hf(torch.tensor([prompts[0]])).logits[0, -1]
    torch.testing.assert_close(hf_logits[VOCAB.text_offset : VOCAB.image_offset],
                               full_logits(model, prompts[0])[-1][VOCAB.text_offset : VOCAB.image_offset],
                               atol=1e-4, rtol=1e-4)
    for p, r in zip(prompts, ours, strict=True):
        out = hf.generate(
            torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=24,
            do_sample=False, suppress_tokens=suppress, eos_token_id=VOCAB.eos_id, pad_token_id=VOCAB.pad_id,
        )
        theirs = out[0, len(p) :].tolist()
        if VOCAB.eos_id in theirs:
            theirs = theirs[: theirs.index(VOCAB.eos_id) + 1]
        assert r.new_ids == theirs
