"""`tessera tokenizer ...`: happy paths and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tessera.cli import main
from tessera.testing.shapes import write_shape_folder
from tessera.tokenizers.image import ImageTokenizer, VQConfig
from tessera.tokenizers.text import TextTokenizer


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("cli_vq") / "vq"
    ImageTokenizer.from_config(VQConfig.preset("tiny")).save(d)
    return d


def test_train_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.txt").write_text("the red circle\nthe blue square\n" * 50)
    assert main(["tokenizer", "train-text", "--input", str(tmp_path / "c.txt"), "--out", str(tmp_path / "t"),
                 "--vocab-size", "300"]) == 0
    tok = TextTokenizer.load(tmp_path / "t.model")
    assert tok.decode(tok.encode("the red square ")) == "the red square "
    assert "t.model" in capsys.readouterr().out


def test_train_text_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tokenizer", "train-text", "--input", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "t"),
                 "--vocab-size", "300"]) == 2
    assert "nope.txt: input file not found" in capsys.readouterr().err
    (tmp_path / "e.txt").write_text("")
    assert main(["tokenizer", "train-text", "--input", str(tmp_path / "e.txt"), "--out", str(tmp_path / "t"),
                 "--vocab-size", "300"]) == 2
    assert "empty corpus" in capsys.readouterr().err


def test_encode_decode(vq_dir: Path, tmp_path: Path) -> None:
    imgs = write_shape_folder(tmp_path / "imgs", 2, size=40)
    codes = tmp_path / "codes.json"
    assert main(["tokenizer", "encode", "--tokenizer", str(vq_dir), *map(str, imgs), "--out", str(codes)]) == 0
    doc = json.loads(codes.read_text())
    assert doc["latent_size"] == 8 and len(doc["images"]) == 2 and len(doc["images"][0]["codes"]) == 64
    tok = ImageTokenizer.load(vq_dir)
    assert doc["images"][1]["codes"] == tok.encode([Image.open(imgs[1])])[0].tolist()
    assert main(["tokenizer", "decode", "--tokenizer", str(vq_dir), str(codes), "--out", str(tmp_path / "r.png")]) == 0
    for i in range(2):
        with Image.open(tmp_path / f"r_{i}.png") as im:
            assert im.size == (32, 32) and im.mode == "RGB"
    one = tmp_path / "one.json"
    one.write_text(json.dumps(doc["images"][0]["codes"]))
    assert main(["tokenizer", "decode", "--tokenizer", str(vq_dir), str(one), "--out", str(tmp_path / "o.png")]) == 0
    assert (tmp_path / "o.png").is_file()


def test_encode_decode_errors(vq_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "c.json")
    assert main(["tokenizer", "encode", "--tokenizer", str(vq_dir), str(tmp_path / "x.png"), "--out", out]) == 2
    assert "x.png: image file not found" in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"definitely not a png")
    assert main(["tokenizer", "encode", "--tokenizer", str(vq_dir), str(tmp_path / "bad.png"), "--out", out]) == 2
    assert "bad.png: unreadable image" in capsys.readouterr().err
    assert not Path(out).exists()
    assert main(["tokenizer", "encode", "--tokenizer", str(tmp_path), str(tmp_path / "bad.png"), "--out", out]) == 2
    assert "not an image tokenizer" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"images": [{"codes": [1, 2]}]}')
    assert main(["tokenizer", "decode", "--tokenizer", str(vq_dir), str(tmp_path / "bad.json"), "--out",
                 str(tmp_path / "r.png")]) == 2
    assert "expected codes [n, 64]" in capsys.readouterr().err
    assert main(["tokenizer", "decode", "--tokenizer", str(vq_dir), str(tmp_path / "missing.json"), "--out",
                 str(tmp_path / "r.png")]) == 2
    assert "missing.json: codes file not found" in capsys.readouterr().err


def test_train_image_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_shape_folder(tmp_path / "d", 8, size=32)
    assert main(["tokenizer", "train-image", "--preset", "tiny", "--data", str(tmp_path / "d"), "--out",
                 str(tmp_path / "o"), "--train.steps", "2", "--train.batch_size", "4"]) == 0
    assert "after 2 steps" in capsys.readouterr().out
    assert ImageTokenizer.load(tmp_path / "o").num_codes == 64
    assert main(["tokenizer", "train-image", "--preset", "tiny", "--data", str(tmp_path / "empty"), "--out",
                 str(tmp_path / "o2")]) == 2
    assert "empty: data path not found" in capsys.readouterr().err
    assert main(["tokenizer", "train-image", "--preset", "tiny", "--data", str(tmp_path / "d"), "--out",
                 str(tmp_path / "o2"), "--vq.nonsense", "1"]) == 2
    assert "nonsense" in capsys.readouterr().err
    assert main(["tokenizer", "train-image", "--preset", "tiny", "--out", str(tmp_path / "o2")]) == 2
    assert "no training data" in capsys.readouterr().err
