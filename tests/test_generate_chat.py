"""Generation after fine-tuning: unmerged LoRA adapters decode like the merged model (KV cache, every step),
and chat generation goes through the training chat template and stops at its END: a special id is the
sampler's stop token (text mode masks specials otherwise), a multi-id text marker is matched on the host."""

from __future__ import annotations

import pytest
import torch
from test_data_standins import ByteTokenizer, PatchColourTokenizer
from test_generate import full_logits, make_model

from tessera.generate.config import GenerationConfig, SamplingParams
from tessera.generate.decoder import KVCacheDecoder
from tessera.generate.engine import GenerationEngine
from tessera.tokenizers.vocab import Vocabulary

ALL = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "output_layer")
# the stand-in tokenizers' vocabulary (bytes as text, 16 colour codes per image), with Tessera's reserved specials
CHAT_VOCAB = Vocabulary(256, 512, 16, pad_to_multiple_of=128)


def _adapted(seed: int = 0, vocab: Vocabulary | None = None):
    from tessera.model.lora import LoRASpec, apply_lora, lora_linears

    model = make_model(seed=seed) if vocab is None else _model_for(vocab, seed)
    apply_lora(model, LoRASpec(4, 8.0, 0.0, ALL), seed=1)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, m in lora_linears(model):
            m.lora_b.copy_(0.2 * torch.randn(m.lora_b.shape, generator=g))
    return model.eval()


def _model_for(vocab: Vocabulary, seed: int):
    from tessera.model.chameleon import build_model
    from tessera.model.config import ModelConfig
    from tessera.model.parallel import ensure_single_process

    ensure_single_process()
    cfg = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                      vocab_size=vocab.padded_size, seq_length=128)
    return build_model(cfg, init_seed=seed)


def test_unmerged_adapters_decode_like_the_merged_model():
    from tessera.model.lora import merge_lora

    unmerged, merged = _adapted(), _adapted()  # the same seeds: the same weights and adapters
    assert merge_lora(merged) == 9
    ids = [1, 5, 9, 17, 33, 2, 8, 40, 41, 3]
    dec_u = KVCacheDecoder(unmerged, dtype=torch.float32)
    dec_m = KVCacheDecoder(merged, dtype=torch.float32)
    assert dec_u.adapters == 9 and dec_m.adapters == 0
    assert "unmerged LoRA adapters" in dec_u.step_backend  # the fused C step has no low-rank term
    ref = full_logits(unmerged, ids)
    assert (ref - full_logits(merged, ids)).abs().max() < 1e-5
    for dec in (dec_u, dec_m):
        dec.allocate(1, len(ids))
        got = [dec.prefill(torch.tensor([ids[:4]]), torch.zeros(1, dtype=torch.long))[0]]
        got += [dec.step(torch.tensor([t]))[0] for t in ids[4:-1]]
        assert (torch.stack(got) - ref[3:-1]).abs().max() < 1e-4
    base = make_model()  # the same weights without adapters decode differently: the low-rank term is used
    assert (full_logits(base, ids) - ref).abs().max() > 1e-2


def _engine(model, vocab: Vocabulary) -> GenerationEngine:
    return GenerationEngine(model, vocab, context_length=128, dtype="float32", backend="reference")


def _boost(engine: GenerationEngine, at: dict[int, int]) -> None:
    """Logits of decoding step k (0: the prefill's) get +100 on id ``at[k]``: a model that writes it then."""
    dec = engine.decoder
    prefill, step, calls = dec.prefill, dec.step, [0]

    def bump(logits):
        k = calls[0]
        calls[0] += 1
        if k in at:
            logits = logits.clone()
            logits[:, at[k]] += 100.0
        return logits

    dec.prefill = lambda *a, **kw: bump(prefill(*a, **kw))
    dec.step = lambda *a, **kw: bump(step(*a, **kw))


GREEDY = GenerationConfig(mode="text", max_new_tokens=12, text=SamplingParams(temperature=0.0), cfg_scale=1.0,
                          dtype="float32")


def test_a_special_end_marker_is_the_samplers_stop_token():
    from tessera.data.chat import ChatTemplate

    template = ChatTemplate.for_vocabulary(CHAT_VOCAB, ByteTokenizer())
    end = template.stop_ids
    assert len(end) == 1 and end[0] < CHAT_VOCAB.text_offset  # <reserved2>: a special id
    model = _adapted(vocab=CHAT_VOCAB)
    prompt = [[CHAT_VOCAB.bos_id, 70, 71]]
    engine = _engine(model, CHAT_VOCAB)
    _boost(engine, {3: end[0]})
    (plain,), _ = engine.generate(prompt, GREEDY)  # text mode masks specials: END is never written
    assert end[0] not in plain.new_ids and plain.finish_reason in ("length", "eos")
    engine = _engine(model, CHAT_VOCAB)
    _boost(engine, {3: end[0]})
    (res,), _ = engine.generate(prompt, GREEDY, stop=end)
    assert res.finish_reason == "stop" and len(res.new_ids) == 4 and res.new_ids[-1] == end[0]


def test_a_text_end_marker_is_matched_on_the_host():
    model = _adapted(vocab=CHAT_VOCAB)
    stop = [CHAT_VOCAB.text_offset + ord(c) for c in "<|end|>"][:3]
    engine = _engine(model, CHAT_VOCAB)
    _boost(engine, {2: stop[0], 3: stop[1], 4: stop[2]})
    (res,), _ = engine.generate([[CHAT_VOCAB.bos_id, 70]], GREEDY, stop=stop)
    assert res.finish_reason == "stop" and res.new_ids[-3:] == stop and len(res.new_ids) == 5


def test_chat_prompt_is_the_training_template_and_the_reply_drops_end():
    from PIL import Image

    from tessera.data.chat import ChatTemplate, format_chat
    from tessera.generate.document import Generator
    from tessera.generate.tokenizers import Tokenizers

    toks = Tokenizers(text=ByteTokenizer(), image=PatchColourTokenizer())
    model = _adapted(vocab=CHAT_VOCAB)
    gen = Generator(_Loaded(model, CHAT_VOCAB), toks, GREEDY)
    end = ChatTemplate.for_vocabulary(CHAT_VOCAB, toks.text).stop_ids[0]
    reply = [CHAT_VOCAB.text_offset + ord(c) for c in "red"]
    _boost(gen.engine, {0: reply[0], 1: reply[1], 2: reply[2], 3: end})
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    messages = [{"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "What colour is it?"}]}]
    (doc,) = gen.chat([messages], GREEDY)
    assert doc.prompt_ids == format_chat(messages, CHAT_VOCAB, toks.text, toks.image, add_generation_prompt=True)
    assert doc.finish_reason == "stop" and doc.new_ids == reply + [end]
    assert doc.generated_text == "red"
    assert [type(s).__name__ for s in doc.prompt_segments] == ["TextSegment", "ImageSegment", "TextSegment"]


class _Loaded:
    """What Generator reads of a TesseraModel."""

    def __init__(self, module, vocab):
        self.module, self.vocab, self.config = module, vocab, None


@pytest.mark.parametrize("bad", ["[]", '{"messages": [{"role": "robot", "content": "hi"}]}', "not json"])
def test_chat_file_errors_name_the_file(tmp_path, bad):
    from tessera.generate.cli import read_conversation
    from tessera.generate.engine import GenerationError

    p = tmp_path / "conv.json"
    p.write_text(bad)
    with pytest.raises(GenerationError, match="conv.json"):
        read_conversation(p)
