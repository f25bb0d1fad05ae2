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
from tessera.testing.checkpoints import make_hf_chameleon, write_meta_layout

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

    from tessera.convert import HFTextTokenizer, load_text_tokenizer
    from tessera.tokenizers.vocab import TextSegment

    model, root, _ = converted
    tok = load_text_tokenizer(root / "tessera" / "tokenizers" / "text")
    assert isinstance(tok, HFTextTokenizer) and tok.vocab_size == tok.vocab.num_text_tokens
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
    from tessera.tokenizers.image import ImageTokenizerError

    with pytest.raises(ImageTokenizerError, match="no decoder"):  # transformers dropped it
        itok.decode(ref)
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
    rc = main(["convert", "to-hf", str(root / "tessera"), str(tmp_path / "cli-out"), "--max-shard-gib", "0.0001"])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    assert (tmp_path / "cli-out" / "model.safetensors.index.json").is_file()


# ---- a checkpoint trained in Tessera -> transformers ----------------------------------------
@pytest.fixture(scope="module")
def native_checkpoint(tmp_path_factory):
    import tessera.model as tm
    from tessera.model.parallel import ensure_single_process
    from tessera.testing.checkpoints import CORPUS
    from tessera.tokenizers.image import ImageTokenizer, VQConfig
    from tessera.tokenizers.text_train import train_text_tokenizer
    from tessera.tokenizers.vocab import Vocabulary

    root = tmp_path_factory.mktemp("native")
    (root / "corpus.txt").write_text("\n".join(CORPUS + ["héllo wörld 你好 🙂  double  spaces"]))
    text = train_text_tokenizer([root / "corpus.txt"], root / "text", vocab_size=400)
    vq = VQConfig(image_size=32, base_channels=32, channel_mults=(1, 1, 2), num_res_blocks=1, num_groups=32,
                  z_channels=8, embed_dim=8, codebook_size=32, kmeans_init=False, attn_resolutions=(16,))
    vocab = Vocabulary(num_text_tokens=text.vocab_size, num_image_codes=32, image_tokens_per_image=vq.tokens_per_image,
                       pad_to_multiple_of=128)
    ensure_single_process()
    cfg = tm.ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4,
                         num_query_groups=2, vocab_size=vocab.padded_size, seq_length=64, swin_norm=True)
    torch.manual_seed(0)
    model = tm.build_model(cfg, pre_process=True, post_process=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # ones / zeros at init would hide a wrong mapping
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
    ckpt = root / "ckpt"
    tm.save_model_checkpoint(model, cfg, ckpt, vocab=vocab)
    torch.manual_seed(1)
    ImageTokenizer.from_config(vq).save(ckpt / "tokenizers" / "image")
    return root, ckpt, text, vocab


def test_native_checkpoint_exports_to_transformers(native_checkpoint):
    from PIL import Image
    from transformers import ChameleonForConditionalGeneration, ChameleonProcessor, PreTrainedTokenizerFast

    import tessera.model as tm

    root, ckpt, text, vocab = native_checkpoint
    out = root / "hf"
    to_hf(ckpt, out, text_tokenizer=text.path)
    hf = ChameleonForConditionalGeneration.from_pretrained(out).eval()
    ids = torch.randint(0, vocab.size, (2, 20))
    ours = tm.load(ckpt, device="cpu", dtype=torch.float32).logits(ids)
    assert (hf_logits(hf, ids) - ours).abs().max().item() < 1e-4
    tok = PreTrainedTokenizerFast.from_pretrained(out)
    s = "A red circle sits above a blue square 42 héllo 🙂"
    assert tok.encode(s, add_special_tokens=False) == [p + vocab.text_offset for p in text.encode(s)]
    assert tok.decode(tok.encode(s, add_special_tokens=False)) == s
    assert hf.config.vocabulary_map["<racm3:break>"] == vocab.boi_id
    proc = ChameleonProcessor.from_pretrained(out)
    enc = proc(text="A red circle<image>", images=[Image.new("RGB", (50, 40), "red")], return_tensors="pt")
    with torch.no_grad():
        hf(**enc)
    # and back in: importing the export gives the same logits again
    from_hf(out, root / "again")
    assert (tessera_logits_in_hf_order(root / "again", ids) - ours).abs().max().item() < 1e-4


def test_bf16_source_stays_bf16_and_round_trips(tmp_path):
    src = tmp_path / "hf"
    model = make_hf_chameleon(src, num_kv_heads=2, seed=7)
    for f in src.glob("*.safetensors"):
        sd = load_file(str(f))
        save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(f), metadata={"format": "pt"})
    from_hf(src, tmp_path / "t")
    assert json.loads((tmp_path / "t" / "convert.json").read_text())["params_dtype"] == "bfloat16"
    to_hf(tmp_path / "t", tmp_path / "back")
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(back) == set(model.state_dict())
    for k, v in model.state_dict().items():  # the VQ goes bf16 -> fp32 (image tokenizer) -> bf16: exact too
        assert back[k].dtype == torch.bfloat16 and torch.equal(back[k], v.to(torch.bfloat16)), k


# ---- an imported checkpoint under tensor parallelism -------------------------------------------
def _tp2_worker(rank, port, ckpt, ids_path, out_path):
    import faulthandler
    import os

    faulthandler.dump_traceback_later(240, exit=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from tessera.model import build_model, destroy_parallel, initialize_parallel
    from tessera.model.checkpoint import read_model_config

    initialize_parallel(tp=2, pp=1)
    model = build_model(read_model_config(ckpt))
    model.load_state_dict(dist_checkpointing.load({"model": model.sharded_state_dict()}, f"{ckpt}/dist")["model"])
    model.eval()
    ids = torch.load(ids_path)
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
    with torch.no_grad():
        local = model(ids, pos, None)  # [b, s, vocab / 2]: the output layer is vocab-parallel
    parts = [torch.empty_like(local) for _ in range(2)]
    dist.all_gather(parts, local.contiguous())
    if rank == 0:
        torch.save(torch.cat(parts, dim=-1), out_path)
    destroy_parallel()


@pytest.mark.timeout(300)
def test_imported_checkpoint_loads_under_tensor_parallel_2(meta_converted, tmp_path):
    """The Meta import (GQA, swin_norm, per-rank QK-norm) re-sharded to TP=2 by dist_checkpointing."""
    import socket

    import torch.multiprocessing as mp

    model, root, _ = meta_converted
    ckpt = root / "tessera"
    idmap = IdMap.load(ckpt)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    torch.save(idmap.hf_to_tessera()[ids], tmp_path / "ids.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_tp2_worker, args=(port, str(ckpt), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")),
                       nprocs=2, join=True, start_method="spawn")
    got = torch.load(tmp_path / "out.pt")
    got_hf = idmap.rows_to_hf(got.movedim(-1, 0)).movedim(0, -1)
    assert (got_hf - hf_logits(model, ids)).abs().max().item() < 1e-4


def test_run_trained_from_an_import_exports_in_chameleon_order(converted, tmp_path):
    """A run started from an imported checkpoint saves plain Tessera checkpoints; to-hf finds the import's
    id map in the run's tokenizers/ (copied along) or takes it from --from-import."""
    import shutil

    model, root, _ = converted
    ckpt = root / "tessera"
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_0000010"
    step.mkdir(parents=True)
    for name in ("tessera.json", "config.yaml", "vocab.json", "dist"):  # what tessera train writes
        (shutil.copytree if (ckpt / name).is_dir() else shutil.copyfile)(ckpt / name, step / name)
    (run / "checkpoints" / "latest").write_text("step_0000010\n")
    with pytest.raises(ConvertError, match="--from-import"):
        to_hf(run, tmp_path / "lost", allow_missing_vq=True)  # nothing says where the ids came from: refuse
    out = tmp_path / "explicit"
    to_hf(run, out, from_import=ckpt)
    shutil.copytree(ckpt / "tokenizers", run / "tokenizers")
    to_hf(run, tmp_path / "found")
    orig = model.state_dict()
    for d in (out, tmp_path / "found"):
        back: dict[str, torch.Tensor] = {}
        for f in sorted(d.glob("*.safetensors")):
            back.update(load_file(str(f)))
        assert set(back) == set(orig) and all(torch.equal(back[k], v) for k, v in orig.items())
        assert json.loads((d / "config.json").read_text())["vocabulary_map"] == model.config.vocabulary_map


def test_generation_engine_runs_on_a_meta_import(meta_converted):
    """tessera.generate's Python API on an imported checkpoint: Chameleon's BPE through HFTextTokenizer,
    images through the imported VQ (Meta's release has the decoder)."""
    from tessera.convert import load_text_tokenizer
    from tessera.generate.config import GenerationConfig
    from tessera.generate.document import generate_document
    from tessera.generate.tokenizers import Tokenizers
    from tessera.model import load
    from tessera.tokenizers.image import ImageTokenizer
    from tessera.tokenizers.vocab import ImageSegment, TextSegment

    _, root, _ = meta_converted
    ckpt = root / "tessera"
    model = load(ckpt, device="cpu", dtype=torch.float32)
    toks = Tokenizers(text=load_text_tokenizer(ckpt / "tokenizers" / "text"),
                      image=ImageTokenizer.load(ckpt / "tokenizers" / "image"))
    cfg = GenerationConfig(mode="image", max_new_tokens=model.vocab.image_span + 2, dtype="float32", seed=3,
                           cfg_scale=1.0)
    doc = generate_document(model, toks, [TextSegment("A red circle")], cfg)
    images = [s for s in doc.segments if isinstance(s, ImageSegment)]
    assert len(images) == 1 and len(images[0].codes) == model.vocab.image_tokens_per_image
    assert doc.images[-1].size == (32, 32)
    text = generate_document(model, toks, [TextSegment("A red circle")],
                             GenerationConfig(mode="text", max_new_tokens=8, dtype="float32", seed=3))
    assert isinstance(text.segments[0], TextSegment) and text.segments[0].text == "A red circle"
