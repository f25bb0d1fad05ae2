"""Every format the reader takes (img2dataset, parquet, OBELICS / MINT-1T interleaved in parquet, tar and
JSONL, image folders, Tessera's segments), built small here with damaged samples: exact counts per reason,
documents intact (text, order, pixels), per-shard detection, and a run with no documents failing with a hint."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_data_standins import ByteTokenizer, PatchColourTokenizer

from tessera.data.document import Document, document_to_tar_members, write_tar
from tessera.data.formats import FormatError, ReaderOptions, SkipStats, sniff_format
from tessera.data.pretokenize import PretokenizeError, pretokenize
from tessera.data.raw import expand_urls, iter_documents, iter_texts


def _image(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _counts(stats: SkipStats) -> dict[str, int]:
    return {k: v for k, v in stats.as_dict().items() if v}


def _read(urls, **opts) -> tuple[list[Document], dict[str, int]]:
    stats = SkipStats()
    docs = list(iter_documents(urls, stats, options=ReaderOptions(**opts)))
    return docs, _counts(stats)


def _same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.tobytes() == b.convert("RGB").tobytes()


# ---- img2dataset -----------------------------------------------------------------------------------
def write_img2dataset(path: Path) -> dict[str, tuple[str, Image.Image]]:
    """Good pairs (caption in .txt, in .json, or both: .txt wins) and one damaged sample per reason."""
    good = {}
    members = []
    for i in range(4):
        key = f"{i:09d}"
        img = _image(i)
        cap = f"a photo number {i}"
        good[key] = (cap, img)
        members.append((f"{key}.jpg" if i % 2 else f"{key}.png", _bytes(img, "PNG")))
        if i != 1:
            members.append((f"{key}.txt", cap.encode()))
        meta = {"url": f"http://x/{i}.jpg", "key": key, "status": "success"}
        if i in (1, 2):
            meta["caption"] = cap if i == 1 else "ignored: the .txt wins"
        members.append((f"{key}.json", json.dumps(meta).encode()))
    png = _bytes(_image(9))
    members += [
        ("000000100.png", png), ("000000100.json", b'{"url": "http://x"}'),  # missing_caption
        ("000000101.png", png[: len(png) // 2]), ("000000101.txt", b"half an image"),  # bad_image
        ("000000102.png", png), ("000000102.txt", b"caf\xe9 \xff"),  # invalid_utf8
        ("000000103.txt", b"no image at all"), ("000000103.json", b"{}"),  # missing_image
        ("000000104.jpg", b""), ("000000104.txt", b"empty"),  # empty_file
        ("000000105.png", png), ("000000105.json", b'{"caption": "x"'),  # invalid_json
    ]
    write_tar(path, members)
    return good


def test_img2dataset_pairs_both_orders_and_every_reason(tmp_path):
    good = write_img2dataset(tmp_path / "00000.tar")
    assert sniff_format(str(tmp_path / "00000.tar")) == "img2dataset"
    docs, counts = _read(str(tmp_path / "00000.tar"))
    assert counts == {"missing_caption": 1, "bad_image": 1, "invalid_utf8": 1, "missing_image": 1, "empty_file": 1,
                      "invalid_json": 1}
    assert [d.key for d in docs] == list(good)
    # caption first for exactly floor(n / 2) of the first n pairs: image, caption, image, caption
    assert [isinstance(d.segments[0], str) for d in docs] == [False, True, False, True]
    for d in docs:
        cap, img = good[d.key]
        assert [s for s in d.segments if isinstance(s, str)] == [cap]
        assert _same_pixels(d.images[0], img) and d.source == "img2dataset"
    for share, want in ((0.0, [False] * 4), (1.0, [True] * 4), (0.25, [False, False, False, True])):
        docs, _ = _read(str(tmp_path / "00000.tar"), caption_first=share)
        assert [isinstance(d.segments[0], str) for d in docs] == want


def test_truncated_img2dataset_shard_keeps_the_samples_before_the_damage(tmp_path):
    import tarfile

    good = write_img2dataset(tmp_path / "full.tar")
    with tarfile.open(tmp_path / "full.tar") as tf:
        cut = tf.getmember("000000003.jpg").offset_data + 100  # inside the fourth image's bytes
    (tmp_path / "cut.tar").write_bytes((tmp_path / "full.tar").read_bytes()[:cut])
    docs, counts = _read(str(tmp_path / "cut.tar"))
    assert counts == {"unreadable_shard": 1} and [d.key for d in docs] == list(good)[:3]


# ---- parquet (what Hugging Face datasets exports) ---------------------------------------------------
def write_hf_parquet(path: Path, local: Path) -> dict[str, tuple[str, Image.Image]]:
    """Image column as HF's Image feature (struct {bytes, path}), a text column; one damaged row per reason.
    Written in row groups of 2 so the reader crosses batch boundaries."""
    local.mkdir(exist_ok=True)
    on_disk = _image(21)
    on_disk.save(local / "disk.png")
    good_imgs = [_image(20), on_disk, _image(22)]
    rows = [
        {"image": {"bytes": _bytes(good_imgs[0]), "path": "a.png"}, "text": "from bytes"},
        {"image": {"bytes": None, "path": str(local / "disk.png")}, "text": "from a local path"},
        {"image": {"bytes": _bytes(good_imgs[2], "JPEG"), "path": None}, "text": "a jpeg"},
        {"image": {"bytes": None, "path": "https://example.com/x.jpg"}, "text": "a URL"},  # missing_image
        {"image": {"bytes": _bytes(_image(23)), "path": None}, "text": None},  # missing_caption
        {"image": {"bytes": b"garbage", "path": None}, "text": "not an image"},  # bad_image
        {"image": {"bytes": None, "path": str(local / "gone.png")}, "text": "deleted file"},  # missing_image
    ]
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("text", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=2)
    jpeg = Image.open(io.BytesIO(rows[2]["image"]["bytes"])).convert("RGB")
    return {"from bytes": ("from bytes", good_imgs[0]), "from a local path": ("from a local path", on_disk),
            "a jpeg": ("a jpeg", jpeg)}


def test_parquet_hf_image_feature_rows(tmp_path):
    want = write_hf_parquet(tmp_path / "train-00000-of-00001.parquet", tmp_path / "imgs")
    url = str(tmp_path / "train-00000-of-00001.parquet")
    assert sniff_format(url) == "parquet"
    docs, counts = _read(url, caption_first=1.0)
    assert counts == {"missing_image": 2, "missing_caption": 1, "bad_image": 1}
    assert [d.segments[0] for d in docs] == list(want)
    for d in docs:
        assert _same_pixels(d.images[0], want[d.segments[0]][1])
    assert [d.key for d in docs] == ["train-00000-of-00001-00000000", "train-00000-of-00001-00000001",
                                     "train-00000-of-00001-00000002"]


def test_parquet_named_columns_and_path_column(tmp_path):
    (tmp_path / "img.png").write_bytes(_bytes(_image(30)))
    pq.write_table(pa.table({"file": ["img.png", "img.png"], "caption_en": ["one", "two"], "key": ["k1", "k2"]}),
                   tmp_path / "p.parquet")
    with pytest.raises(FormatError, match="no image column.*--image-column"):
        _read(str(tmp_path / "p.parquet"))
    docs, counts = _read(str(tmp_path / "p.parquet"), image_column="file", text_column="caption_en", caption_first=0)
    assert counts == {} and [d.key for d in docs] == ["k1", "k2"]
    assert [d.segments[1] for d in docs] == ["one", "two"] and _same_pixels(docs[0].images[0], _image(30))
    with pytest.raises(FormatError, match="no column 'nope'"):
        _read(str(tmp_path / "p.parquet"), image_column="nope", text_column="caption_en")


def test_damaged_parquet_is_an_unreadable_shard(tmp_path):
    write_hf_parquet(tmp_path / "ok.parquet", tmp_path / "imgs")
    data = (tmp_path / "ok.parquet").read_bytes()
    (tmp_path / "bad.parquet").write_bytes(data[: len(data) // 2])
    docs, counts = _read([str(tmp_path / "bad.parquet"), str(tmp_path / "ok.parquet")], format="parquet")
    assert counts == {"unreadable_shard": 1, "missing_image": 2, "missing_caption": 1, "bad_image": 1}
    assert len(docs) == 3  # the next shard is read in full


# ---- interleaved: OBELICS / MINT-1T ----------------------------------------------------------------
def test_obelics_parquet_rows(tmp_path):
    a, b = _image(40), _image(41, (20, 50))
    img_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [
        {"texts": ["Title", None, "after the image", None], "images": [None, {"bytes": _bytes(a), "path": None}, None,
                                                                       {"bytes": _bytes(b), "path": None}]},
        {"texts": ["only text"], "images": [None]},
        {"texts": ["x", None], "images": [None, {"bytes": None, "path": "https://obelics/img.jpg"}]},  # missing_image
        {"texts": ["x", None], "images": [None]},  # bad_schema: lengths differ
        {"texts": [None], "images": [None]},  # bad_schema: nothing in it
    ]
    schema = pa.schema([("texts", pa.list_(pa.string())), ("images", pa.list_(img_t))])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "obelics.parquet")
    url = str(tmp_path / "obelics.parquet")
    assert sniff_format(url) == "interleaved"
    docs, counts = _read(url)
    assert counts == {"missing_image": 1, "bad_schema": 2}
    assert [len(d.segments) for d in docs] == [4, 1]
    s = docs[0].segments
    assert s[0] == "Title" and _same_pixels(s[1], a) and s[2] == "after the image" and _same_pixels(s[3], b)
    assert docs[1].segments == ["only text"]


def test_mint1t_tar_multi_frame_tiff_and_named_members(tmp_path):
    """MINT-1T PDF / ArXiv: KEY.json {texts, images} + one multi-frame KEY.tiff (frame k = k-th image)."""
    frames = [_image(50, (24, 24)), _image(51, (30, 20))]
    buf = io.BytesIO()
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:])
    doc1 = {"texts": ["page one", None, "page two", None], "images": [None, "page_0_image_85", None, "page_1_image_9"]}
    doc2 = {"texts": [None, "caption"], "images": ["doc2.0.png", None]}  # a named member
    doc3 = {"texts": ["text", None], "images": [None, "page_3_image_1"]}  # no tiff, no member: missing_image
    members = [("doc1.json", json.dumps(doc1).encode()), ("doc1.tiff", buf.getvalue()),
               ("doc2.json", json.dumps(doc2).encode()), ("doc2.0.png", _bytes(_image(52))),
               ("doc3.json", json.dumps(doc3).encode()),
               ("doc4.json", b'{"texts": "not a list", "images": []}')]  # bad_schema
    write_tar(tmp_path / "mint.tar", members)
    assert sniff_format(str(tmp_path / "mint.tar")) == "interleaved"
    docs, counts = _read(str(tmp_path / "mint.tar"))
    assert counts == {"missing_image": 1, "bad_schema": 1}
    d1, d2 = docs
    assert d1.segments[0] == "page one" and d1.segments[2] == "page two"
    assert _same_pixels(d1.segments[1], frames[0]) and _same_pixels(d1.segments[3], frames[1])
    assert _same_pixels(d2.segments[0], _image(52)) and d2.segments[1] == "caption"


def test_interleaved_jsonl_with_local_paths(tmp_path):
    _image(60).save(tmp_path / "p.png")
    lines = [json.dumps({"id": "a", "texts": ["hello", None], "images": [None, "p.png"]}), "",
             "{broken", json.dumps({"texts": [None], "images": ["http://web/img.png"]}),
             json.dumps({"texts": ["x"], "images": [None], "source": "blog"})]
    (tmp_path / "docs.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b'{"texts": ["\xff"]}\n')
    docs, counts = _read(str(tmp_path / "docs.jsonl"))
    assert counts == {"invalid_json": 1, "missing_image": 1, "invalid_utf8": 1}
    assert [d.key for d in docs] == ["a", "docs-00000004"] and docs[1].source == "blog"
    assert docs[0].segments[0] == "hello" and _same_pixels(docs[0].segments[1], _image(60))


# ---- a folder of images with same-named captions -----------------------------------------------------
def write_folder(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    _image(70).save(root / "a.jpg", quality=95)
    (root / "a.txt").write_text("first")
    _image(71).save(root / "b.png")
    (root / "b.txt").write_text("second")
    _image(72).save(root / "sub" / "c.webp", lossless=True)
    (root / "sub" / "c.txt").write_text("third, in a subfolder")
    _image(73).save(root / "nocap.png")  # missing_caption
    (root / "orphan.txt").write_text("no image")  # missing_image
    (root / "empty.png").write_bytes(b"")  # empty_file
    (root / "empty.txt").write_text("x")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")  # bad_image
    (root / "broken.txt").write_text("y")


def test_image_folder_with_captions(tmp_path):
    write_folder(tmp_path / "f")
    docs, counts = _read(str(tmp_path / "f"), caption_first=1.0)
    assert counts == {"missing_caption": 1, "missing_image": 1, "empty_file": 1, "bad_image": 1}
    assert [(d.key, d.segments[0]) for d in docs] == [("a", "first"), ("b", "second"), ("sub/c", "third, in a subfolder")]
    assert _same_pixels(docs[1].images[0], _image(71)) and _same_pixels(docs[2].images[0], _image(72))
    # text tokenizer training neither decodes nor checks images: broken.png's and empty.png's captions count
    assert list(iter_texts(str(tmp_path / "f"))) == ["first", "second", "y", "x", "third, in a subfolder"]


# ---- one run over every format; detection per shard; empty runs fail --------------------------------
def test_pretokenize_every_format_in_one_run(tmp_path):
    write_img2dataset(tmp_path / "i2d.tar")
    write_hf_parquet(tmp_path / "hf.parquet", tmp_path / "imgs")
    write_folder(tmp_path / "folder")
    write_tar(tmp_path / "seg.tar", document_to_tar_members(Document("s0", ["seg text", _image(80)], "mine")))
    shards = tmp_path / "shards"  # a folder of shards stands for the shards in it
    shards.mkdir()
    write_tar(shards / "a.tar", document_to_tar_members(Document("s1", ["in a folder of shards"], "mine")))
    inputs = [str(tmp_path / n) for n in ("i2d.tar", "hf.parquet", "folder", "seg.tar")] + [str(shards)]
    assert len(expand_urls(inputs)) == 5
    st = pretokenize(inputs, tmp_path / "out", ByteTokenizer(), PatchColourTokenizer(), progress=False)
    assert st["documents"] == 4 + 3 + 3 + 1 + 1
    assert st["sources"] == {"img2dataset": 4, "parquet": 3, "folder": 3, "mine": 2}
    assert {k: v for k, v in st["skipped"].items() if v} == {
        "missing_caption": 1 + 1 + 1, "bad_image": 1 + 1 + 1, "invalid_utf8": 1, "missing_image": 1 + 2 + 1,
        "empty_file": 1 + 1, "invalid_json": 1}
    assert st["images"] == 4 + 3 + 3 + 1


def test_a_run_without_documents_fails_and_names_the_layout(tmp_path):
    write_img2dataset(tmp_path / "00000.tar")
    write_img2dataset(tmp_path / "00001.tar")
    urls = [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]
    with pytest.raises(PretokenizeError, match=r"no documents read from 2 shard\(s\); skipped 20: bad_schema 12, "
                                               r"missing_json 6, invalid_json 2. These look like img2dataset shards: pass --format img2dataset"):
        pretokenize(urls, tmp_path / "out", ByteTokenizer(), PatchColourTokenizer(),
                    options=_opts(format="segments"), progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(FormatError, match="--format parquet cannot read .*00000.tar"):
        pretokenize(urls, tmp_path / "out", ByteTokenizer(), PatchColourTokenizer(), options=_opts(format="parquet"),
                    progress=False)
    st = pretokenize(urls, tmp_path / "out", ByteTokenizer(), PatchColourTokenizer(), progress=False)  # auto
    assert st["documents"] == 8


def test_image_urls_only_fail_with_the_reason(tmp_path):
    pq.write_table(pa.table({"texts": [["a", None]] * 3, "images": [[None, "https://web/x.jpg"]] * 3}), tmp_path / "o.parquet")
    with pytest.raises(PretokenizeError, match="missing_image 3.*never fetched"):
        pretokenize(str(tmp_path / "o.parquet"), tmp_path / "out", ByteTokenizer(), PatchColourTokenizer(), progress=False)


def _opts(**reader):
    from tessera.data.pretokenize import PretokenizeOptions

    return PretokenizeOptions(reader=ReaderOptions(**reader))


def test_cli_fails_in_one_line_on_a_run_without_documents(tmp_path, capsys):
    """`tessera data pretokenize --format segments` on img2dataset shards: exit 2, one line naming the fix."""
    from tessera.cli import main
    from tessera.tokenizers.image import ImageTokenizer, VQConfig
    from tessera.tokenizers.text_train import train_text_tokenizer

    write_img2dataset(tmp_path / "00000.tar")
    train_text_tokenizer([str(tmp_path / "00000.tar")], tmp_path / "text", 300)
    ImageTokenizer.from_config(VQConfig.preset("tiny")).save(tmp_path / "vq")
    args = ["data", "pretokenize", "--input", str(tmp_path / "00000.tar"), "--out", str(tmp_path / "out"),
            "--text-tokenizer", str(tmp_path / "text.model"), "--image-tokenizer", str(tmp_path / "vq")]
    assert main([*args, "--format", "segments"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the skip log lines
    assert len(err) == 1 and err[0].startswith("tessera data: error: no documents read from 1 shard(s)")
    assert err[0].endswith("These look like img2dataset shards: pass --format img2dataset")
    assert main([*args, "--caption-first", "1"]) == 0 and not (tmp_path / "out.partial").exists()
    st = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert st["documents"] == 4 and st["sources"] == {"img2dataset": 4}
