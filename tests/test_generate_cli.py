"""``generate_document`` and ``tessera generate`` end to end on a tiny random checkpoint with real
(tiny) tokenizers built here: outputs exist and parse; bad inputs fail with clear messages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from tessera.cli import main as cli_main
from tessera.generate import GenerationConfig, Tokenizers, generate_document, load_tokenizers
from tessera.generate.config import SamplingParams
from tessera.tokenizers.vocab import ImageSegment, TextSegment, Vocabulary

CORPUS = "\n".join(
    f"a {size} {colour} {shape} {rel} a {colour2} {shape2}."
    for size in ("small", "large")
    for colour in ("red", "green", "blue", "yellow")
    for shape in ("circle", "square", "triangle")
    for rel, colour2, shape2 in (("above", "blue", "star"), ("left of", "red", "cross"))
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """RUN/checkpoints/step_0000000 (+ latest) with RUN/tokenizers/{text.model, image/}."""
    from tessera.model import ModelConfig, build_model, save_model_checkpoint
    from tessera.model.checkpoint import write_latest
    from tessera.model.parallel import ensure_single_process
    from tessera.tokenizers.image import ImageTokenizer, VQConfig
    from tessera.tokenizers.text_train import train_text_tokenizer

    root = tmp_path_factory.mktemp("gen")
    (root / "corpus.txt").write_text(CORPUS)
    tok_dir = root / "run" / "tokenizers"
    text = train_text_tokenizer([root / "corpus.txt"], tok_dir / "text", vocab_size=300)
    torch.manual_seed(0)
    image = ImageTokenizer.from_config(VQConfig.preset("tiny"))
    image.save(tok_dir / "image")
    vocab = Vocabulary(text.vocab_size, image.num_codes, image.tokens_per_image, pad_to_multiple_of=128)
    ensure_single_process()
    cfg = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                      vocab_size=vocab.padded_size, seq_length=160)
    model = build_model(cfg)
    ckpts = root / "run" / "checkpoints"
    save_model_checkpoint(model, cfg, ckpts / "step_0000000", vocab=vocab)
    write_latest(ckpts, "step_0000000")
    save_model_checkpoint(model, cfg, root / "novocab")  # a checkpoint without vocab.json
    return root


def png(path: Path, colour=(200, 30, 30)) -> Path:
    Image.new("RGB", (40, 40), colour).save(path)
    return path


def test_tokenizers_found_by_convention(run_dir):
    from tessera.generate.tokenizers import find_tokenizer_paths

    text, image = find_tokenizer_paths(run_dir / "run" / "checkpoints" / "step_0000000")
    assert text == run_dir / "run" / "tokenizers" / "text.model"
    assert image == run_dir / "run" / "tokenizers" / "image"


def test_generate_document_api(run_dir, tmp_path):
    import tessera.model

    model = tessera.model.load(run_dir / "run", device="cpu")
    toks = load_tokenizers(model.path)
    assert isinstance(toks, Tokenizers)
    prompt = ["a small red circle", Image.new("RGB", (32, 32), (0, 0, 255)), "then"]
    cfg = GenerationConfig(mode="image", max_new_tokens=70, seed=3, dtype="float32")
    doc = generate_document(model, toks, prompt, cfg)
    assert doc.finish_reason == "image" and doc.num_prompt_segments == 3
    kinds = [type(s) for s in doc.segments]
    assert kinds == [TextSegment, ImageSegment, TextSegment, ImageSegment]
    assert doc.segments[0].text == "a small red circle"
    assert len(doc.images) == 2 and doc.generated_images[0].size == (32, 32)
    assert len(doc.generated_segments[0].codes) == model.vocab.image_tokens_per_image
    out = doc.save(tmp_path / "doc")
    data = json.loads((out / "document.json").read_text())
    assert data["source"] == "tessera generate"
    assert data["segments"][1] == {"image": "0.png"} and data["segments"][3] == {"image": "1.png"}
    assert Image.open(out / "1.png").size == (32, 32)
    # Seeded: the same call gives the same tokens.
    assert generate_document(model, toks, prompt, cfg).new_ids == doc.new_ids


def test_cli_writes_document_json_pngs_html(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli_main([
        "generate", "--checkpoint", str(run_dir / "run"), "--prompt", "a large blue", "--image",
        str(png(tmp_path / "in.png")), "--prompt", "square", "--mode", "interleaved", "--max-new-tokens", "40",
        "--cfg-scale", "2", "--temperature", "0.8", "--seed", "1", "--dtype", "fp32", "--out", str(out),
        "--image.top_k", "5",
    ])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads((out / "document.json").read_text())
    assert doc["source"] == "tessera generate" and doc["prompt_segments"] == 3
    assert doc["config"]["image"]["top_k"] == 5 and doc["config"]["cfg_scale"] == 2.0
    segs = doc["segments"]
    assert segs[0] == {"text": "a large blue"} and segs[2] == {"text": "square"}
    images = [s["image"] for s in segs if "image" in s]
    assert images and all((out / name).is_file() for name in images)
    html = (out / "document.html").read_text()
    assert all(f'src="{name}"' in html for name in images) and "a large blue" in html
    assert not list(tmp_path.glob(".out.tmp-*"))  # no temporary left behind
    err = capsys.readouterr().err
    assert "[generate]" in err and "tok/s" in err  # progress lines


def test_cli_text_mode_stream(run_dir, tmp_path, capsys):
    out = tmp_path / "t"
    rc = cli_main(["generate", "--checkpoint", str(run_dir / "run"), "--prompt", "a small", "--mode", "text",
                   "--max-new-tokens", "12", "--stream", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "document.json").read_text())
    assert all("text" in s for s in doc["segments"])


@pytest.mark.parametrize("case", ["bad_image", "no_vocab", "too_long", "no_prompt", "missing_tokenizer"])
def test_cli_errors_are_clear(run_dir, tmp_path, capsys, case):
    ckpt = str(run_dir / "run")
    args = ["generate", "--checkpoint", ckpt, "--prompt", "a red circle", "--out", str(tmp_path / "o")]
    expect = ""
    if case == "bad_image":
        bad = tmp_path / "broken.png"
        bad.write_bytes(b"not a png at all")
        args += ["--image", str(bad)]
        expect = "broken.png"
    elif case == "no_vocab":
        args[2] = str(run_dir / "novocab")
        expect = "vocab"
    elif case == "too_long":
        args[4] = "red circle " * 200
        expect = "context is 160"
    elif case == "no_prompt":
        args = ["generate", "--checkpoint", ckpt, "--out", str(tmp_path / "o")]
        expect = "--prompt"
    elif case == "missing_tokenizer":
        ckpt_copy = tmp_path / "ck"
        shutil.copytree(run_dir / "run" / "checkpoints" / "step_0000000", ckpt_copy)
        args[2] = str(ckpt_copy)
        expect = "--text-tokenizer"
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "error" in err and expect in err, err
    assert not (tmp_path / "o").exists()


def test_text_sampling_params_reach_the_document(run_dir):
    import tessera.model

    model = tessera.model.load(run_dir / "run", device="cpu")
    toks = load_tokenizers(model.path)
    cfg = GenerationConfig(mode="text", max_new_tokens=10, dtype="float32", text=SamplingParams(0.0, 0, 1.0))
    a = generate_document(model, toks, ["a small red"], cfg)
    b = generate_document(model, toks, ["a small red"], GenerationConfig(**{**cfg.__dict__, "seed": 99}))
    assert a.new_ids == b.new_ids  # greedy ignores the seed
    assert a.generated_text == "".join(s.text for s in a.generated_segments)


@pytest.fixture(scope="module")
def imported_ckpt(tmp_path_factory) -> Path:
    """A tiny random transformers Chameleon imported with ``from_hf``: CKPT/tokenizers/text/ holds its
    tokenizer.json + id map (no sentencepiece model anywhere)."""
    from tessera.convert.hf import from_hf
    from tessera.testing.checkpoints import make_hf_chameleon

    root = tmp_path_factory.mktemp("imported")
    make_hf_chameleon(root / "hf", seed=5)
    from_hf(root / "hf", root / "ck")
    return root / "ck"


@pytest.mark.parametrize("kind", ["native", "imported"])
def test_cli_loads_native_and_imported_text_tokenizers(kind, run_dir, imported_ckpt, tmp_path, capsys):
    """``tessera generate --checkpoint`` finds the text tokenizer by convention, a sentencepiece
    RUN/tokenizers/text.model or an imported CKPT/tokenizers/text/, and its greedy text equals the
    Python API's with that tokenizer loaded explicitly (``tessera.convert.load_text_tokenizer``)."""
    import tessera.model
    from tessera.convert import HFTextTokenizer, load_text_tokenizer
    from tessera.generate.tokenizers import find_tokenizer_paths
    from tessera.tokenizers.text import TextTokenizer

    if kind == "native":
        ckpt, tok_path, cls = run_dir / "run", run_dir / "run" / "tokenizers" / "text.model", TextTokenizer
    else:
        ckpt, tok_path, cls = imported_ckpt, imported_ckpt / "tokenizers" / "text", HFTextTokenizer
    assert find_tokenizer_paths(ckpt)[0] == tok_path
    prompt = "a small red circle"
    out = tmp_path / "o"
    rc = cli_main(["generate", "--checkpoint", str(ckpt), "--prompt", prompt, "--mode", "text", "--temperature", "0",
                   "--max-new-tokens", "8", "--dtype", "fp32", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    data = json.loads((out / "document.json").read_text())
    tok = load_text_tokenizer(tok_path)
    assert isinstance(tok, cls)
    assert data["prompt_tokens"] == 1 + len(tok.encode(prompt))  # <bos> + this tokenizer's pieces
    assert data["segments"][0] == {"text": prompt} and data["new_tokens"] == 8

    model = tessera.model.load(ckpt, device="cpu")
    cfg = GenerationConfig(mode="text", max_new_tokens=8, dtype="float32", text=SamplingParams(0.0, 0, 1.0))
    doc = generate_document(model, Tokenizers(text=tok), [prompt], cfg)
    assert [s["text"] for s in data["segments"][1:]] == [s.text for s in doc.generated_segments]


def test_docs_example_regenerates_with_one_command(run_dir, tmp_path, capsys):
    """``python -m tessera.generate.example --run RUN --out DIR`` rebuilds docs/generation_example/:
    the documented prompt first, then whatever the model writes (interleaved mode: this untrained tiny
    model writes text; the demo model draws an image), and the same document again on a second run (seed 0)."""
    from tessera.demo.config import FULL
    from tessera.generate import example

    threads = torch.get_num_threads()  # the example pins one thread (--threads 1): restore it for later tests
    out = tmp_path / "example"
    try:
        assert example.main(["--run", str(run_dir / "run"), "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    doc = json.loads((out / "document.json").read_text())
    assert doc["segments"][0] == {"text": example.PROMPT} and doc["prompt_segments"] == 1
    # the example samples images as the demo's evaluation does
    assert doc["config"]["seed"] == 0 and doc["config"]["mode"] == "interleaved"
    assert doc["config"]["cfg_scale"] == FULL.cfg_scale and doc["config"]["image"]["temperature"] == FULL.image_temperature
    first = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".png"}
    try:
        assert example.main(["--run", str(run_dir / "run"), "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert json.loads((out / "document.json").read_text())["segments"] == doc["segments"]  # reproducible
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".png"} == first
    assert example.main(["--run", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "tessera demo" in capsys.readouterr().err
