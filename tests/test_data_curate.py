"""Curation: each filter drops exactly the documents built to fail it (exact counts in stats.json),
deduplication spans shards and keeps the first occurrence, kept documents keep their source bytes, the
output does not depend on the worker count, scorers (Python and TorchScript) and the language filter apply."""

from __future__ import annotations

import io
import json
import random
import tarfile
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_standins import ByteTokenizer, PatchColourTokenizer

from tessera.data.curate import (
    FILTERS,
    CurateConfig,
    CurateError,
    NearDuplicateIndex,
    curate,
    grey_entropy,
    phash,
    repeat_ratio,
)
from tessera.data.document import write_tar
from tessera.data.formats import ReaderOptions
from tessera.data.pretokenize import pretokenize


def smooth(seed: int, size: int = 64) -> Image.Image:
    """A smooth random picture (a 4 x 4 colour grid upsampled): perceptual hashes are meaningful on it."""
    grid = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC)


def jpeg(img: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


CFG = CurateConfig(min_side=16, max_aspect=3.0, min_colours=2, min_entropy=0.5, min_text_chars=5,
                   max_repeat_ratio=0.5, max_nonprintable_ratio=0.2)


def write_corpus(root: Path) -> dict[str, list[str]]:
    """Two img2dataset shards: 6 good pairs, and one pair built to fail each filter. Returns the keys
    that must survive (in order) and the image bytes of the survivors."""
    root.mkdir(parents=True, exist_ok=True)
    blank = Image.new("RGB", (32, 32), (10, 200, 10))
    speck = Image.new("RGB", (32, 32), (0, 0, 0))
    speck.putpixel((3, 3), (255, 255, 255))  # 2 colours, entropy ~0.01 bits
    near = smooth(0).resize((60, 60), Image.Resampling.LANCZOS)
    shard0 = [
        ("k00", png(smooth(0)), "a smooth picture number zero"),
        ("k01", png(smooth(1)), "a smooth picture number one"),
        ("k02", png(blank), "a blank green square"),  # image_few_colours
        ("k03", png(speck), "one white speck on black"),  # image_low_entropy
        ("k04", png(smooth(4, 10)), "a tiny picture"),  # image_too_small
        ("k05", png(smooth(5).resize((100, 20))), "a very wide banner"),  # image_aspect
        ("k06", png(smooth(6)), "hi"),  # text_too_short
        ("k07", png(smooth(7)), "wow!!!!!!!!!!!!!!!!"),  # text_repetitive
        ("k08", png(smooth(8)), "\x00\x01\x02\x03abc"),  # text_nonprintable
        ("k09", b"\x89PNG\r\n\x1a\nbroken", "a broken file"),  # read: bad_image
    ]
    shard1 = [
        ("k10", png(smooth(1)), "the same pixels as k01"),  # duplicate_image
        ("k11", jpeg(near, 90), "k00 resized and recompressed"),  # near_duplicate_image
        ("k12", png(smooth(12)), "a smooth picture number zero"),  # duplicate_text (k00's caption)
        ("k13", jpeg(smooth(13)), "a smooth picture number thirteen"),
        ("k14", png(smooth(14)), "a smooth picture number fourteen"),
        ("k15", png(smooth(15)), "a smooth picture number fifteen"),
        ("k16", png(smooth(16)), "a smooth picture number sixteen"),
    ]
    for i, rows in enumerate((shard0, shard1)):
        members = []
        for key, data, cap in rows:
            ext = "jpg" if data[:2] == b"\xff\xd8" else "png"
            members += [(f"{key}.{ext}", data), (f"{key}.txt", cap.encode())]
        write_tar(root / f"{i:05d}.tar", members)
    keep = ["k00", "k01", "k13", "k14", "k15", "k16"]
    by_key = {k: d for k, d, _ in shard0 + shard1}
    return {"keep": keep, "bytes": [by_key[k] for k in keep]}


EXPECTED_FILTERED = {"image_too_small": 1, "image_aspect": 1, "image_few_colours": 1, "image_low_entropy": 1,
                     "text_too_short": 1, "text_repetitive": 1, "text_nonprintable": 1, "duplicate_text": 1,
                     "duplicate_image": 1, "near_duplicate_image": 1}


def _curated(out: Path) -> list[tuple[str, list[bytes]]]:
    """(origin key, image bytes) of every curated document, in order."""
    docs = []
    for shard in sorted(out.glob("curated-*.tar")):
        with tarfile.open(shard) as tf:
            files = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
        for name in sorted(n for n in files if n.endswith(".json")):
            meta = json.loads(files[name])
            origin = meta["origin"].rsplit(":", 1)[1]
            docs.append((origin, [files[s["image"]] for s in meta["segments"] if "image" in s]))
    return docs


def test_every_filter_counts_exactly_and_survivors_keep_their_bytes(tmp_path):
    want = write_corpus(tmp_path / "raw")
    st = curate(str(tmp_path / "raw"), tmp_path / "out", replace(CFG, shard_size=4), ReaderOptions(caption_first=1.0),
                progress=False)
    assert st["documents_read"] == 17 and st["documents"] == 6
    assert {k: v for k, v in st["skipped"].items() if v} == {"bad_image": 1}
    assert {k: v for k, v in st["filtered"].items() if v} == EXPECTED_FILTERED
    assert list(st["filtered"]) == list(FILTERS)
    assert st["shards"] == ["curated-000000.tar", "curated-000001.tar"]  # 4 + 2 documents
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == st
    assert "6 of 17 documents kept" in (tmp_path / "out" / "report.md").read_text()
    got = _curated(tmp_path / "out")
    assert [k for k, _ in got] == want["keep"]
    assert [b[0] for _, b in got] == want["bytes"]  # the source's PNG / JPEG bytes, not re-encoded
    # the curated shards are ordinary input: pretokenize reads the directory
    ps = pretokenize(str(tmp_path / "out"), tmp_path / "tok", ByteTokenizer(), PatchColourTokenizer(), progress=False)
    assert ps["documents"] == 6 and ps["images"] == 6


def test_worker_count_does_not_change_the_output(tmp_path):
    write_corpus(tmp_path / "raw")
    a = curate(str(tmp_path / "raw"), tmp_path / "a", CFG, progress=False)
    b = curate(str(tmp_path / "raw"), tmp_path / "b", CFG, workers=2, progress=False)
    for name in a["shards"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    for st in (a, b):
        for k in ("seconds", "documents_per_s_per_core", "documents_per_cpu_s", "workers"):
            st.pop(k)
    assert a == b


def test_dedup_switches_and_empty_result(tmp_path):
    write_corpus(tmp_path / "raw")
    st = curate(str(tmp_path / "raw"), tmp_path / "o", CurateConfig(dedup_text=False, dedup_images=False,
                                                                   near_dup_hamming=-1), progress=False)
    assert st["documents"] == 16 and sum(st["filtered"].values()) == 0
    with pytest.raises(CurateError, match="no documents left after curation"):
        curate(str(tmp_path / "raw"), tmp_path / "none", CurateConfig(min_side=1000), progress=False)
    assert not (tmp_path / "none").exists()


def test_python_and_torchscript_alignment_scorers(tmp_path, monkeypatch):
    root = tmp_path / "raw"
    root.mkdir()
    red, blue = Image.new("RGB", (32, 32), (220, 20, 20)), Image.new("RGB", (32, 32), (20, 20, 220))
    red.putpixel((0, 0), (0, 0, 0))
    blue.putpixel((0, 0), (0, 0, 0))
    rows = [("a", red, "a red square"), ("b", blue, "a red square too"), ("c", blue, "a blue square"),
            ("d", red, "a blue square, wrongly")]
    write_tar(root / "s.tar", [m for k, im, cap in rows for m in ((f"{k}.png", png(im)), (f"{k}.txt", cap.encode()))])
    (tmp_path / "myscorer.py").write_text(textwrap.dedent('''
        import numpy as np

        def score(images, texts):
            out = []
            for im, t in zip(images, texts):
                r, _, b = np.asarray(im, dtype=float).mean((0, 1))
                out.append(1.0 if ("red" in t.split()[1]) == (r > b) else 0.0)
            return out
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = CurateConfig(scorer="myscorer:score", min_score=0.5, dedup_text=False, dedup_images=False,
                       near_dup_hamming=-1)
    st = curate(str(root), tmp_path / "py", cfg, progress=False)
    assert st["filtered"]["alignment"] == 2 and st["scored"] == 4
    assert [k for k, _ in _curated(tmp_path / "py")] == ["a", "c"]

    class RedScorer(torch.nn.Module):  # "red" captions score the red share of the pixels, others the blue share
        def forward(self, pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
            red = pixels[:, 0].mean((1, 2))
            blue = pixels[:, 2].mean((1, 2))
            wants_red = torch.tensor([1.0 if t.split()[1] == "red" else 0.0 for t in texts])
            return wants_red * red + (1 - wants_red) * blue

    torch.jit.script(RedScorer()).save(str(tmp_path / "scorer.pt"))
    cfg = CurateConfig(scorer=str(tmp_path / "scorer.pt"), min_score=0.5, scorer_image_size=16, dedup_text=False,
                       dedup_images=False, near_dup_hamming=-1)
    st = curate(str(root), tmp_path / "ts", cfg, progress=False)
    assert st["filtered"]["alignment"] == 2 and [k for k, _ in _curated(tmp_path / "ts")] == ["a", "c"]
    with pytest.raises(CurateError, match="cannot import"):
        curate(str(root), tmp_path / "x", CurateConfig(scorer="nomodule_here:f", min_score=0.1), progress=False)


def test_language_filter(tmp_path, monkeypatch):
    import tessera.data.curate as cur

    root = tmp_path / "raw"
    root.mkdir()
    caps = ["the cat sits on the mat", "le chat est assis sur le tapis", "the dog runs in the park"]
    write_tar(root / "s.tar", [m for i, c in enumerate(caps)
                               for m in ((f"k{i}.png", png(smooth(40 + i))), (f"k{i}.txt", c.encode()))])
    monkeypatch.setattr(cur, "load_language_identifier",
                        lambda: lambda t: ("en", 0.9) if " the " in f" {t} " else ("fr", 0.8))
    st = curate(str(root), tmp_path / "o", CurateConfig(languages=("en",)), progress=False)
    assert st["filtered"]["language"] == 1 and [k for k, _ in _curated(tmp_path / "o")] == ["k0", "k2"]
    with pytest.raises(CurateError, match="no documents left.*\"language\": 3"):
        curate(str(root), tmp_path / "o2", CurateConfig(languages=("en",), min_language_score=0.95), progress=False)


def test_language_identifier_when_installed():
    pytest.importorskip("py3langid")
    from tessera.data.curate import load_language_identifier

    ident = load_language_identifier()
    assert ident("the quick brown fox jumps over the lazy dog")[0] == "en"
    assert ident("le renard brun saute par-dessus le chien paresseux")[0] == "fr"


def test_near_duplicate_index_equals_brute_force():
    rng = random.Random(0)
    for t in (0, 1, 4, 9):
        stored = [rng.getrandbits(64) for _ in range(300)]
        queries = [rng.getrandbits(64) for _ in range(200)]
        for h in rng.sample(stored, 100):  # planted neighbours at distance <= t + 1
            bits = rng.sample(range(64), rng.randint(0, t + 1))
            queries.append(h ^ sum(1 << b for b in bits))
        idx = NearDuplicateIndex(t)
        for h in stored:
            idx.add(h)
        for q in queries:
            assert idx.near(q) == any((q ^ h).bit_count() <= t for h in stored)


def test_measures():
    a = smooth(0)
    assert (phash(a) ^ phash(Image.open(io.BytesIO(jpeg(a.resize((60, 60)), 90))))).bit_count() <= 4
    assert min((phash(smooth(i)) ^ phash(smooth(j))).bit_count() for i in range(8) for j in range(i)) > 8
    assert grey_entropy(Image.new("RGB", (8, 8), (5, 5, 5))) == 0.0
    assert abs(grey_entropy(Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16))) - 8.0) < 1e-9
    assert repeat_ratio("aaab") == 0.75 and repeat_ratio("hello") == 0.0 and repeat_ratio("!!!!") == 1.0


def test_curate_cli(tmp_path, capsys):
    from tessera.cli import main

    write_corpus(tmp_path / "raw")
    assert main(["data", "curate", "--input", str(tmp_path / "raw"), "--out", str(tmp_path / "out"), "--min-side", "16",
                 "--max-aspect", "3", "--min-colours", "2", "--min-entropy", "0.5", "--min-text-chars", "5",
                 "--max-repeat-ratio", "0.5", "--max-nonprintable-ratio", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "6 of 17 documents kept" in out and "| near_duplicate_image | 1 |" in out
    assert main(["data", "curate", "--input", str(tmp_path / "raw"), "--out", str(tmp_path / "out")]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main(["data", "curate", "--input", str(tmp_path / "raw"), "--out", str(tmp_path / "o2"),
                 "--min-score", "0.5"]) == 2
    assert "--min-score needs --scorer" in capsys.readouterr().err
