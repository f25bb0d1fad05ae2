"""tessera.convert pieces that need no Tessera model: re-layouts, the vocabulary permutation, the
VQGAN mapping against transformers' ChameleonVQVAE, and the Meta layout reader."""

from __future__ import annotations

import json

import pytest
import torch

from tessera.convert.errors import ConvertError
from tessera.convert.hf_vocab import IdMap, image_code_from_name, image_token_name, vocab_from_chameleon
from tessera.convert.layout import (
    fuse_fc1,
    fuse_qkv,
    half_to_interleaved,
    interleaved_to_half,
    split_fc1,
    split_qkv,
)


def hf_permute(w, n_heads, dim1, dim2):  # transformers' convert_chameleon_weights_to_hf.permute, verbatim
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def test_rotary_permutation_matches_transformers_and_inverts():
    w = torch.randn(6 * 8, 20)
    assert torch.equal(interleaved_to_half(w, 6), hf_permute(w, 6, 48, 20))
    assert torch.equal(half_to_interleaved(interleaved_to_half(w, 6), 6), w)
    # the QK-norm vector rule of the same script: .view(hd // 2, 2).t().reshape(1, -1)
    v = torch.randn(8)
    assert torch.equal(interleaved_to_half(v, 1), v.view(4, 2).t().reshape(-1))


def test_rotary_permutation_is_what_rotate_half_needs():
    """Meta rotates adjacent pairs; after the permutation transformers' rotate_half gives the same q.k."""
    hd, pos = 8, 5
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    ang = pos * inv
    q, k = torch.randn(hd), torch.randn(hd)

    def rope_pairs(x):  # Meta: complex multiply of (x0 + i x1), (x2 + i x3), ...
        c = torch.view_as_complex(x.view(-1, 2).contiguous()) * torch.polar(torch.ones_like(ang), ang)
        return torch.view_as_real(c).reshape(-1)

    def rope_half(x):
        cos, sin = torch.cat([ang, ang]).cos(), torch.cat([ang, ang]).sin()
        rot = torch.cat([-x[hd // 2 :], x[: hd // 2]])
        return x * cos + rot * sin

    ref = rope_pairs(q) @ rope_pairs(k)
    got = rope_half(interleaved_to_half(q, 1)) @ rope_half(interleaved_to_half(k, 1))
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (8, 1)])
def test_qkv_fusion_is_megatrons_grouped_layout(heads, groups):
    hd, h = 4, 8
    q, k, v = torch.randn(heads * hd, h), torch.randn(groups * hd, h), torch.randn(groups * hd, h)
    qkv = fuse_qkv(q, k, v, heads, groups)
    per = heads // groups
    # megatron: [sq, b, ng * (np/ng + 2) * hn] viewed as [ng, (np/ng + 2), hn]
    view = qkv.view(groups, per + 2, hd, h)
    for g in range(groups):
        assert torch.equal(view[g, :per].reshape(-1, h), q.view(heads, hd, h)[g * per : (g + 1) * per].reshape(-1, h))
        assert torch.equal(view[g, per], k.view(groups, hd, h)[g])
        assert torch.equal(view[g, per + 1], v.view(groups, hd, h)[g])
    q2, k2, v2 = split_qkv(qkv, heads, groups)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


def test_fc1_fusion_and_shape_errors():
    g, u = torch.randn(6, 4), torch.randn(6, 4)
    fc1 = fuse_fc1(g, u)
    x = torch.randn(3, 4)
    a, b = (x @ fc1.t()).chunk(2, -1)  # megatron's swiglu: silu(first half) * second half
    torch.testing.assert_close(torch.nn.functional.silu(a) * b, torch.nn.functional.silu(x @ g.t()) * (x @ u.t()))
    assert all(torch.equal(s, t) for s, t in zip(split_fc1(fc1), (g, u), strict=True))
    with pytest.raises(ConvertError, match="gate_proj"):
        fuse_fc1(g, torch.randn(5, 4))
    with pytest.raises(ConvertError, match="query groups"):
        fuse_qkv(torch.randn(16, 4), torch.randn(12, 4), torch.randn(12, 4), 4, 3)


def _chameleon_map(n_codes=16, n_text=10):
    vm = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vm.update({image_token_name(c): 4 + c for c in range(n_codes)})
    base = 4 + n_codes
    vm.update({"<eoss>": base, "<racm3:break>": base + 1, "<image>": base + 2})
    vm.update({f"t{i}": base + 3 + i for i in range(n_text)})
    return vm, base + 3 + n_text


def test_image_token_names_round_trip():
    for c in (0, 7, 10, 8191):
        assert image_code_from_name(image_token_name(c)) == c
    assert image_token_name(1234) == "IMGIMGBCDEZ"
    with pytest.raises(ConvertError):
        image_code_from_name("IMGIMGxZ")


def test_vocabulary_permutation_puts_codes_in_tessera_layout():
    vm, size = _chameleon_map()
    vocab, idmap = vocab_from_chameleon(vm, size + 2, image_tokens_per_image=4, bos_id=0, eos_id=2, pad_id=1)
    assert vocab.num_image_codes == 16 and vocab.size == size + 2
    hf = idmap.tessera_index()
    assert [int(hf[vocab.special_id(s)]) for s in ("<pad>", "<bos>", "<eos>", "<boi>", "<eoi>")] == [
        1, 0, 2, vm["<racm3:break>"], vm["<eoss>"],
    ]
    for c in range(16):  # image code c lands on Tessera's image_offset + c
        assert int(hf[vocab.image_offset + c]) == vm[image_token_name(c)]
    text_hf = hf[vocab.text_offset : vocab.image_offset].tolist()
    assert text_hf == sorted(text_hf) and vm["<unk>"] in text_hf and size + 1 in text_hf  # unnamed ids are text
    rows = torch.randn(size + 2, 3)
    t_rows = idmap.rows_to_tessera(rows, vocab.padded_size)
    assert t_rows.shape[0] == vocab.padded_size and not t_rows[vocab.size :].any()
    assert torch.equal(idmap.rows_to_hf(t_rows), rows)
    assert torch.equal(idmap.hf_to_tessera()[hf], torch.arange(vocab.size))


def test_vocabulary_errors_name_the_problem():
    vm, size = _chameleon_map()
    del vm["<racm3:break>"]
    with pytest.raises(ConvertError, match="begin-of-image"):
        vocab_from_chameleon(vm, size, 4)
    vm, size = _chameleon_map()
    del vm[image_token_name(3)]
    with pytest.raises(ConvertError, match="codes 0..N-1"):
        vocab_from_chameleon(vm, size, 4)
    with pytest.raises(ConvertError, match="bijection"):
        IdMap((0, 0, 1), 3)


def test_idmap_save_load(tmp_path):
    m = IdMap((2, 0, 1), 3)
    m.save(tmp_path)
    assert IdMap.load(tmp_path) == m
    (tmp_path / "hf_id_map.json").write_text("{")
    with pytest.raises(ConvertError, match="hf_id_map.json"):
        IdMap.load(tmp_path)


# ---- VQGAN ----------------------------------------------------------------------------------
def _random_hf_vqvae(seed=0):
    from transformers import ChameleonVQVAE, ChameleonVQVAEConfig

    from tessera.testing.checkpoints import tiny_vq_config

    torch.manual_seed(seed)
    vq = tiny_vq_config(32)
    model = ChameleonVQVAE(ChameleonVQVAEConfig(**vq)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # GroupNorm affines away from 1 / 0
    return model, vq


def test_imported_vq_encoder_gives_transformers_codes_exactly():
    from tessera.convert.vq import image_tokenizer_from_taming, tessera_to_taming

    hf, vq = _random_hf_vqvae()
    tok, has_decoder = image_tokenizer_from_taming(hf.state_dict(), vq, "test")
    assert not has_decoder
    torch.manual_seed(1)
    images = torch.rand(8, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = hf.encode(images).image_tokens.reshape(8, -1)
    got = tok.encode(images)
    assert got.shape == (8, tok.tokens_per_image) == ref.shape
    assert torch.equal(got, ref)
    assert len(set(ref.flatten().tolist())) > 4  # not a degenerate all-one-code case
    back = tessera_to_taming(tok.model.state_dict(), tok.config, decoder=False)
    sd = hf.state_dict()
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_vq_shape_mismatch_names_the_tensor():
    from tessera.convert.vq import image_tokenizer_from_taming

    hf, vq = _random_hf_vqvae()
    sd = dict(hf.state_dict())
    sd["quantize.embedding.weight"] = torch.randn(31, 8)
    with pytest.raises(ConvertError, match="quantize.embedding.weight"):
        image_tokenizer_from_taming(sd, vq, "test")
    sd = dict(hf.state_dict())
    del sd["encoder.conv_in.bias"]
    with pytest.raises(ConvertError, match="encoder.conv_in.bias"):
        image_tokenizer_from_taming(sd, vq, "test")


# ---- Meta layout -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_and_meta(tmp_path_factory):
    from tessera.testing.checkpoints import make_hf_chameleon, write_meta_layout

    root = tmp_path_factory.mktemp("meta")
    model = make_hf_chameleon(root / "hf", num_heads=4, num_kv_heads=2, swin_norm=True, per_rank_qk_norm=2, seed=3)
    write_meta_layout(model, root / "meta", num_shards=2, hf_tokenizer_dir=root / "hf")
    return model, root


def test_meta_reader_reproduces_transformers_conversion(hf_and_meta):
    from tessera.convert.meta import read_meta

    model, root = hf_and_meta
    ck = read_meta(root / "meta")
    sd = model.state_dict()
    assert set(ck.state) == set(sd)
    for k, v in sd.items():
        assert torch.equal(ck.state[k], v), k
    assert ck.hf_config["swin_norm"] and ck.hf_config["num_key_value_heads"] == 2
    assert ck.hf_config["intermediate_size"] == model.config.intermediate_size
    assert ck.tokenizer_json["model"]["vocab"]["<image>"] == model.config.vocabulary_map["<image>"]


def test_meta_missing_shard_and_bad_shapes(hf_and_meta, tmp_path):
    import shutil

    from tessera.convert.meta import read_meta

    _, root = hf_and_meta
    meta = tmp_path / "meta"
    shutil.copytree(root / "meta", meta)
    shard1 = meta / "models" / "7b" / "consolidated.01.pth"
    saved = torch.load(shard1, weights_only=True)
    shard1.unlink()
    with pytest.raises(ConvertError, match="consolidated.01.pth"):
        read_meta(meta)
    bad = dict(saved)
    bad["layers.1.attention.q_normalization.weight"] = torch.randn(3)
    torch.save(bad, shard1)
    with pytest.raises(ConvertError, match=r"consolidated.01.pth.*layers.1.attention.q_normalization.weight"):
        read_meta(meta)
    bad = dict(saved)
    bad["layers.0.feed_forward.w1.weight"] = bad["layers.0.feed_forward.w1.weight"][:-1]
    torch.save(bad, shard1)
    with pytest.raises(ConvertError, match="layers.0.feed_forward.w1.weight"):
        read_meta(meta)
    torch.save(saved, shard1)
    params = json.loads((meta / "models" / "7b" / "params.json").read_text())
    params["model"]["mystery_knob"] = 3
    (meta / "models" / "7b" / "params.json").write_text(json.dumps(params))
    with pytest.raises(ConvertError, match="mystery_knob"):
        read_meta(meta)


def test_config_keys_generic_ones_pass_unknown_ones_are_named(tmp_path):
    from tessera.convert.hf_config import read_hf_config

    cfg = {
        "model_type": "chameleon", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "rope_theta": 10000.0, "rope_scaling": None,
        "qk_layernorm": True, "torch_dtype": "bfloat16", "do_sample": False,  # transformers 4.x leftovers
        "vq_config": {"resolution": 32, "ch": 32, "temperature": 1.0, "bad_words_ids": None},
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert read_hf_config(tmp_path)["hidden_size"] == 64
    for key, value, where in (("attention_bias", True, "attention_bias"), ("layer_scale", 0.1, "layer_scale")):
        (tmp_path / "config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ConvertError, match=where):
            read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "vq_config": {"quantizer_kind": "fsq"}}))
    with pytest.raises(ConvertError, match="quantizer_kind"):
        read_hf_config(tmp_path)


def test_transformer_engine_fused_norm_names_translate_both_ways():
    from tessera.convert.model_io import to_local_names, to_model_names

    local = {"decoder.layers.0.input_layernorm.weight": 1, "decoder.layers.0.pre_mlp_layernorm.weight": 2,
             "decoder.layers.0.post_mlp_layernorm.weight": 3}
    te_keys = {"decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
               "decoder.layers.0.mlp.linear_fc1.layer_norm_weight", "decoder.layers.0.post_mlp_layernorm.weight"}
    te = to_model_names(local, te_keys)
    assert set(te) == te_keys
    assert to_local_names(te) == local
    assert to_model_names(local, set(local)) == local  # the local spec keeps its names


def test_hf_vq_config_refuses_what_transformers_cannot_express() -> None:
    from tessera.convert.vq import hf_vq_config
    from tessera.tokenizers.image import VQConfig

    base = {**VQConfig.preset("tiny").__dict__, "base_channels": 32, "num_groups": 32}
    assert hf_vq_config(VQConfig(**base))["embed_dim"] == base["embed_dim"]
    with pytest.raises(ConvertError, match="'patch' encoder"):
        hf_vq_config(VQConfig(**{**base, "encoder": "patch"}))
    with pytest.raises(ConvertError, match="GroupNorm"):
        hf_vq_config(VQConfig(**{**base, "num_groups": 16}))
