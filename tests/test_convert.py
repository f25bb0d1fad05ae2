"""End to end: transformers / Meta Chameleon checkpoints -> Tessera -> transformers.

Random-weight transformers models at small shapes (MHA / GQA / MQA, with and without swin_norm):
the imported Tessera model's logits equal transformers' (fp32, < 1e-4), to-hf(from-hf(x)) gives
back every tensor bit for bit, the Meta release layout (2 model-parallel shards, per-rank QK-norm)
imports to the same logits, and bad inputs fail with errors naming the file or tensor while
leaving nothing in OUT_DIR."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tessera.convert.errors import ConvertError
from tessera.convert.hf import from_hf, from_meta, to_hf
from tessera.convert.hf_vocab import IdMap
from tessera.convert.testing import make_hf_chameleon, write_meta_layout

SHAPES = {
    "mha": dict(hidden_size=64, num_heads=4, num_kv_heads=None, swin_norm=False),
    "gqa-swin": dict(hidden_size=64, num_heads=4, num_kv_heads=2, swin_norm=True),
    "mqa": dict(hidden_size=48, num_heads=6, num_kv_heads=1, swin_norm=False, intermediate_size=128),
}


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """transformers' logits before it masks the image tokens (the mask is a serving policy)."""
    with torch.no_grad():
        return model.lm_head(model.model(input_ids=ids).last_hidden_state)


def tessera_logits_in_hf_order(ckpt: Path, ids_hf: torch.Tensor) -> torch.Tensor:
    import tessera.model as tm

    idmap = IdMap.load(ckpt)
    m = tm.load(ckpt, device="cpu", dtype=torch.float32)
    out = m.logits(idmap.hf_to_tessera()[ids_hf])
    return idmap.rows_to_hf(out.movedim(-1, 0)).movedim(0, -1)


@pytest.fixture(scope="module", params=list(SHAPES))
def converted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    kw = dict(SHAPES[request.param])
    model = make_hf_chameleon(root / "hf", seed=len(request.param), max_shard_size="200KB", **kw)
    res = from_hf(root / "hf", root / "tessera")
    return model, root, res


def test_imported_logits_equal_transformers(converted):
    model, root, res = converted
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    ref = hf_logits(model, ids)
    got = tessera_logits_in_hf_order(root / "tessera", ids)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 1e-4
    # and the served logits (image tokens masked by transformers) agree on every other column
    with torch.no_grad():
        served = model(input_ids=ids).logits
    keep = served[0, 0] > torch.finfo(served.dtype).min
    assert (got[..., keep] - served[..., keep]).abs().max().item() < 1e-4


def test_round_trip_reproduces_every_tensor(converted):
    model, root, _ = converted
    out = root / "back"
    to_hf(root / "tessera", out)
    back: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        back.update(load_file(str(f)))
    orig = model.state_dict()
    assert set(back) == set(orig)
    for k, v in orig.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    src_cfg = json.loads((root / "hf" / "config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "num_key_value_heads", "swin_norm", "vocabulary_map", "bos_token_id"):
        assert cfg[key] == src_cfg[key], key
    assert (out / "tokenizer.json").read_bytes() == (root / "hf" / "tokenizer.json").read_bytes()


def test_exported_model_loads_in_transformers_with_a_working_processor(converted):
    from transformers import ChameleonForConditionalGeneration, ChameleonProcessor

    model, root, _ = converted
    out = root / "back"
    if not out.exists():
        to_hf(root / "tessera", out)
    reloaded = ChameleonForConditionalGeneration.from_pretrained(out).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    assert torch.equal(hf_logits(reloaded, ids), hf_logits(model, ids))
    proc = ChameleonProcessor.from_pretrained(out)
    from PIL import Image

    enc = proc(text="A red circle<image>", images=[Image.new("RGB", (40, 40), "red")], return_tensors="pt")
    n_img = int((enc["input_ids"] == reloaded.config.image_token_id).sum())
    assert n_img == proc.image_seq_length == 64
    with torch.no_grad():
        reloaded(**enc)  # the VQ encoder runs and its codes are spliced in


def test_imported_text_tokenizer_speaks_tessera_piece_ids(converted):
    from tokenizers import Tokenizer

    from tessera.convert.hf_tokenizer import HFTextTokenizer
    from tessera.tokenizers.vocab import TextSegment

    model, root, _ = converted
    tok = HFTextTokenizer.load(root / "tessera" / "tokenizers" / "text")
    hf_tok = Tokenizer.from_file(str(root / "hf" / "tokenizer.json"))
    text = "A red circle sits above 42 blue squares."
    pieces = tok.encode(text)
    idmap = IdMap.load(root / "tessera")
    ids = [int(idmap.tessera_index()[p + tok.vocab.text_offset]) for p in pieces]
    assert ids == hf_tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(pieces) == text
    doc = tok.vocab.encode_document([TextSegment(text)], tok.encode)
    assert tok.vocab.decode_document(doc, tok.decode) == [TextSegment(text)]


def test_imported_vq_tokenizer_matches_transformers_codes(converted):
    from tessera.tokenizers.image import ImageTokenizer

    model, root, _ = converted
    itok = ImageTokenizer.load(root / "tessera" / "tokenizers" / "image")
    torch.manual_seed(5)
    px = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = model.model.vqmodel.encode(px).image_tokens.reshape(3, -1)
    assert torch.equal(itok.encode(px), ref)
    # and the Tessera ids of those codes are the ids transformers feeds its LM
    idmap = IdMap.load(root / "tessera")
    from tessera.tokenizers.vocab import Vocabulary

    v = Vocabulary.load(root / "tessera")
    assert torch.equal(idmap.tessera_index()[v.image_codes_to_ids(ref)], model.model.get_image_tokens(px))


# ---- Meta ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def meta_converted(tmp_path_factory):
    from tessera.convert.vq import tessera_to_taming, vq_config_from_hf
    from tessera.tokenizers.image import VQModel

    root = tmp_path_factory.mktemp("meta")
    model = make_hf_chameleon(root / "hf", num_kv_heads=2, swin_norm=True, per_rank_qk_norm=2, seed=11)
    write_meta_layout(model, root / "meta", num_shards=2, hf_tokenizer_dir=root / "hf")
    # Meta's vqgan.ckpt carries the decoder that transformers drops: add a random one.
    ck = torch.load(root / "meta" / "tokenizer" / "vqgan.ckpt", weights_only=True)
    cfg = vq_config_from_hf(model.config.vq_config.to_dict())
    torch.manual_seed(2)
    dec = {k: v for k, v in tessera_to_taming(VQModel(cfg).state_dict(), cfg, decoder=True).items()
           if k.startswith("decoder.")}
    ck["state_dict"].update(dec)
    ck["state_dict"]["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)  # ignored, as upstream
    torch.save(ck, root / "meta" / "tokenizer" / "vqgan.ckpt")
    from_meta(root / "meta", root / "tessera")
    return model, root, dec


def test_meta_import_matches_transformers_logits_and_keeps_the_decoder(meta_converted):
    from tessera.convert.vq import tessera_to_taming
    from tessera.tokenizers.image import ImageTokenizer

    model, root, dec = meta_converted
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    got = tessera_logits_in_hf_order(root / "tessera", ids)
    assert (got - hf_logits(model, ids)).abs().max().item() < 1e-4
    itok = ImageTokenizer.load(root / "tessera" / "tokenizers" / "image")
    back = tessera_to_taming(itok.model.state_dict(), itok.config, decoder=True)
    assert all(torch.equal(back[k], v) for k, v in dec.items())
    imgs = itok.decode(itok.encode(torch.rand(1, 3, 32, 32) * 2 - 1))
    assert imgs[0].size == (32, 32)
    meta_tok = json.loads((root / "meta" / "tokenizer" / "text_tokenizer.json").read_text())
    assert "<reserved08707>" in meta_tok["model"]["vocab"]
    ours = json.loads((root / "tessera" / "tokenizers" / "text" / "tokenizer.json").read_text())
    assert ours["model"]["vocab"]["<image>"] == meta_tok["model"]["vocab"]["<reserved08707>"]


# ---- bad inputs ------------------------------------------------------------------------------
@pytest.fixture()
def hf_copy(converted, tmp_path):
    import shutil

    _, root, _ = converted
    shutil.copytree(root / "hf", tmp_path / "hf")
    return tmp_path


def _assert_nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_missing_shard_is_named(hf_copy):
    index = json.loads((hf_copy / "hf" / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (hf_copy / "hf" / shard).unlink()
    out = hf_copy / "out"
    with pytest.raises(ConvertError, match=shard):
        from_hf(hf_copy / "hf", out)
    _assert_nothing_written(hf_copy, out)


def test_mismatched_shape_is_named(hf_copy):
    index = json.loads((hf_copy / "hf" / "model.safetensors.index.json").read_text())
    key = "model.layers.1.self_attn.k_norm.bias"
    shard = hf_copy / "hf" / index["weight_map"][key]
    sd = load_file(str(shard))
    sd[key] = sd[key][:, :-1].contiguous()
    save_file(sd, str(shard))
    out = hf_copy / "out"
    with pytest.raises(ConvertError, match=key.replace(".", r"\.")):
        from_hf(hf_copy / "hf", out)
    _assert_nothing_written(hf_copy, out)


def test_unknown_config_key_is_named(hf_copy):
    cfg = json.loads((hf_copy / "hf" / "config.json").read_text())
    cfg["rope_scaling_magic"] = 2.0
    (hf_copy / "hf" / "config.json").write_text(json.dumps(cfg))
    out = hf_copy / "out"
    with pytest.raises(ConvertError, match="rope_scaling_magic"):
        from_hf(hf_copy / "hf", out)
    _assert_nothing_written(hf_copy, out)


def test_cli_reports_errors_and_refuses_to_overwrite(converted, tmp_path, capsys):
    from tessera.cli import main

    _, root, _ = converted
    rc = main(["convert", "from-hf", str(tmp_path / "nope"), str(tmp_path / "out")])
    assert rc == 2 and "nope" in capsys.readouterr().err
    rc = main(["convert", "to-hf", str(root / "tessera"), str(root / "tessera")])
    assert rc == 2 and "already exists" in capsys.readouterr().err
