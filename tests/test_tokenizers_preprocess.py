"""One image preprocessing: pretokenize, VQ training's loader and `tessera tokenizer encode` see the same
pixels and give the same codes for the same image file (EXIF-rotated, transparent, not square)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tessera.data.document import write_tar
from tessera.data.pretokenize import pretokenize
from tessera.tokenizers.image import ImageTokenizer, VQConfig, load_image, preprocess
from tessera.tokenizers.image_train import ImageDataset, discover_images
from tessera.tokenizers.preprocess import fit_image


class ByteTokenizer:
    vocab_size = 256

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode()) for t in texts]


class Recording:
    """The real tokenizer, recording the pixels it is asked to encode."""

    def __init__(self, tok: ImageTokenizer) -> None:
        self.tok, self.seen = tok, []
        self.num_codes, self.tokens_per_image, self.image_size = tok.num_codes, tok.tokens_per_image, tok.image_size

    def encode(self, images):
        self.seen += [preprocess(im, self.image_size) for im in images]
        return self.tok.encode(images)


def _photo() -> bytes:
    """A 61 x 40 JPEG whose EXIF says 'rotate 90 degrees' (orientation 6)."""
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (40, 61, 3), dtype=np.uint8)
    a[:, :20] = (250, 10, 10)
    img = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def vq(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("vq")
    ImageTokenizer.from_config(VQConfig.preset("tiny")).save(d)
    return d


def test_fit_image_is_chameleons_resize_and_crop():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 45, 3), dtype=np.uint8))
    want = img.resize((48, 32), Image.Resampling.LANCZOS).crop((8, 0, 40, 32))  # shortest side 32, centre crop
    assert fit_image(img, 32).tobytes() == want.tobytes()
    assert fit_image(want, 32) is want  # already the right size: unchanged
    la = Image.new("LA", (40, 32), (0, 0))  # fully transparent: white after the blend
    assert set(fit_image(la, 32).getdata()) == {(255, 255, 255)}


def test_pretokenize_vq_loader_and_encode_agree(vq, tmp_path):
    from tessera.cli import main

    jpg = _photo()
    (tmp_path / "photo.jpg").write_bytes(jpg)
    assert load_image(tmp_path / "photo.jpg").size == (40, 61)  # EXIF applied
    write_tar(tmp_path / "pairs.tar", [("000.jpg", jpg), ("000.txt", b"a red stripe")])
    tok = ImageTokenizer.load(vq)
    reference = preprocess(load_image(tmp_path / "photo.jpg"), tok.image_size)

    # VQ training's loader
    refs = discover_images([tmp_path / "pairs.tar"])
    loader_pixels = ImageDataset(refs, tok.image_size)[0]
    assert torch.equal(loader_pixels, reference)
    # pretokenize
    rec = Recording(tok)
    pretokenize(str(tmp_path / "pairs.tar"), tmp_path / "tok", ByteTokenizer(), rec, progress=False)
    assert len(rec.seen) == 1 and torch.equal(rec.seen[0], reference)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from tessera.tokenizers.vocab import Vocabulary

    vocab = Vocabulary.load(tmp_path / "tok")
    ds = IndexedDataset(str(tmp_path / "tok" / "data"))  # keep it alive: its items view its memory map
    ids = np.array(ds[0], dtype=np.int64)
    pretok_codes = ids[(ids >= vocab.image_offset) & (ids < vocab.size)] - vocab.image_offset
    # tessera tokenizer encode
    assert main(["tokenizer", "encode", "--tokenizer", str(vq), str(tmp_path / "photo.jpg"),
                 "--out", str(tmp_path / "codes.json")]) == 0
    cli_codes = json.loads((tmp_path / "codes.json").read_text())["images"][0]["codes"]
    loader_codes = tok.encode(loader_pixels[None])[0].tolist()
    assert pretok_codes.tolist() == cli_codes == loader_codes


def test_train_image_reads_a_folder_of_shards(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    jpg = _photo()
    for s in range(2):
        write_tar(shards / f"{s:05d}.tar", [(f"{s}{i}.jpg", jpg) for i in range(3)] + [(f"{s}9.txt", b"x")])
    refs = discover_images([shards])
    assert [(Path(r.path).name, r.member) for r in refs] == [
        ("00000.tar", "00.jpg"), ("00000.tar", "01.jpg"), ("00000.tar", "02.jpg"),
        ("00001.tar", "10.jpg"), ("00001.tar", "11.jpg"), ("00001.tar", "12.jpg")]
