"""Raw shard reading: every kind of corrupt sample is counted and skipped; good ones survive intact;
unusual image modes are converted, not rejected."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from tessera.data.document import document_to_tar_members, write_tar
from tessera.data.raw import SKIP_REASONS, DocumentLimits, SkipStats, iter_documents
from tessera.data.synth import document_rng, make_document


def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _meta(key: str, segs: list[dict]) -> bytes:
    return json.dumps({"segments": segs, "source": "test"}).encode()


def good_docs(n: int, seed: int = 0):
    return [make_document(document_rng(seed, i), 32, key=f"good{i:03d}") for i in range(n)]


def corrupt_members() -> dict[str, list[tuple[str, bytes]]]:
    """One corrupt sample per reason (two for empty_file), keyed by the reason it must be counted under."""
    img = Image.new("RGB", (32, 32), (200, 10, 10))
    png = _png(img)
    return {
        "empty_file": [("bad0.json", b"")],
        "empty_file_image": [("bad1.json", _meta("bad1", [{"image": "bad1.0.png"}])), ("bad1.0.png", b"")],
        "invalid_utf8": [("bad2.json", b'{"segments": [{"text": "caf\xe9 \xff"}]}')],
        "invalid_json": [("bad3.json", b'{"segments": [{"text": "x"}')],
        "bad_schema": [("bad4.json", _meta("bad4", [{"txt": "x"}]))],
        "missing_json": [("bad5.0.png", png)],
        "missing_image": [("bad6.json", _meta("bad6", [{"text": "hi"}, {"image": "bad6.0.png"}]))],
        "bad_image": [("bad7.json", _meta("bad7", [{"image": "bad7.0.png"}])), ("bad7.0.png", png[: len(png) // 2])],
        "bad_image_garbage": [("bad8.json", _meta("bad8", [{"image": "bad8.0.png"}])), ("bad8.0.png", b"not an image")],
        "too_long": [("bad9.json", _meta("bad9", [{"image": f"bad9.{i}.png"} for i in range(5)]))]
        + [(f"bad9.{i}.png", png) for i in range(5)],
    }


EXPECTED = {"empty_file": 2, "invalid_utf8": 1, "invalid_json": 1, "bad_schema": 1, "missing_json": 1, "missing_caption": 0,
            "missing_image": 1, "bad_image": 2, "too_long": 1, "unreadable_shard": 0, "bad_role": 0,
            "empty_conversation": 0, "no_targets": 0}


def write_corrupt_corpus(directory: Path, n_good: int = 12) -> tuple[list, list[Path]]:
    """Good synthetic documents with the corrupt samples interleaved, in two shards."""
    goods = good_docs(n_good)
    bad = list(corrupt_members().values())
    rng = random.Random(0)
    members: list[list[tuple[str, bytes]]] = [document_to_tar_members(d) for d in goods] + bad
    order = list(range(len(members)))
    rng.shuffle(order)
    half = len(order) // 2
    paths = []
    for s, part in enumerate([order[:half], order[half:]]):
        p = directory / f"mixed-{s:06d}.tar"
        write_tar(p, [m for i in part for m in members[i]])
        paths.append(p)
    # keep the good documents in the order the shards hold them
    good_keys = [members[i][0][0].split(".")[0] for i in order if i < len(goods)]
    by_key = {d.key: d for d in goods}
    return [by_key[k] for k in good_keys], paths


def test_every_corrupt_kind_counted_and_good_docs_intact(tmp_path, caplog):
    goods, paths = write_corrupt_corpus(tmp_path)
    stats = SkipStats()
    with caplog.at_level("WARNING", logger="tessera.data"):
        docs = list(iter_documents([str(p) for p in paths], stats, DocumentLimits(max_images=4)))
    assert stats.as_dict() == EXPECTED
    assert set(stats.as_dict()) == set(SKIP_REASONS)
    assert stats.documents == len(goods) == len(docs)
    for got, want in zip(docs, goods, strict=True):
        assert got.key == want.key and got.source == want.source
        assert len(got.segments) == len(want.segments)
        for a, b in zip(got.segments, want.segments, strict=True):
            if isinstance(b, str):
                assert a == b
            else:
                assert a.mode == "RGB" and a.tobytes() == b.tobytes()
    # one log line per skipped sample, naming shard and key
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    assert len(lines) == sum(EXPECTED.values())
    assert any("mixed-00000" in m and "bad" in m for m in lines)


def test_unusual_image_modes_are_converted(tmp_path):
    base = np.zeros((16, 16, 3), dtype=np.uint8)
    base[:, :8] = (250, 20, 20)
    base[:, 8:] = (20, 20, 250)
    rgb = Image.fromarray(base)
    rgba = rgb.convert("RGBA")
    a = np.asarray(rgba).copy()
    a[:4, :, 3] = 0  # transparent rows -> white
    variants = {
        "p": _png(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)),
        "rgba": _png(Image.fromarray(a, "RGBA")),
        "l": _png(rgb.convert("L")),
        "la": _png(rgb.convert("LA")),
        "i16": _png(Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)),
        "cmyk": _png(rgb.convert("CMYK"), "JPEG"),
        "one": _png(rgb.convert("1")),
    }
    members = []
    for k, data in variants.items():
        ext = "jpg" if k == "cmyk" else "png"
        members += [(f"m{k}.json", _meta(f"m{k}", [{"image": f"m{k}.0.{ext}"}])), (f"m{k}.0.{ext}", data)]
    write_tar(tmp_path / "modes.tar", members)
    stats = SkipStats()
    docs = {d.key: d for d in iter_documents(str(tmp_path / "modes.tar"), stats)}
    assert sum(stats.as_dict().values()) == 0 and len(docs) == len(variants)
    for d in docs.values():
        assert d.images[0].mode == "RGB" and d.images[0].size == (16, 16)
    assert docs["mrgba"].images[0].getpixel((0, 0)) == (255, 255, 255)
    assert docs["mrgba"].images[0].getpixel((0, 10)) == (250, 20, 20)
    assert docs["mp"].images[0].getpixel((12, 12))[2] > 200
    i16 = docs["mi16"].images[0].getpixel((0, 0))
    assert i16 == docs["ml"].images[0].getpixel((0, 0))  # 16-bit scaled to 8, not clipped to white


def test_truncated_shard_keeps_samples_before_the_damage(tmp_path):
    goods = good_docs(6)
    path = tmp_path / "t.tar"
    write_tar(path, [m for d in goods for m in document_to_tar_members(d)])
    data = path.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    stats = SkipStats()
    docs = list(iter_documents([str(cut), str(path)], stats))
    n_before = len(docs) - len(goods)
    assert 1 <= n_before < len(goods)
    assert [d.key for d in docs[:n_before]] == [g.key for g in goods[:n_before]]
    assert sum(stats.as_dict().values()) >= 1
    assert stats.as_dict()["unreadable_shard"] + stats.as_dict()["missing_image"] + stats.as_dict()["bad_image"] >= 1
    assert [d.key for d in docs[n_before:]] == [g.key for g in goods]  # the next shard is read in full
