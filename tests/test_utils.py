"""tessera.utils: the one atomic-write, device, dtype-name and rank/world helper."""

from __future__ import annotations

import json

import pytest
import torch

from tessera import utils


def test_atomic_write_replaces_or_leaves_the_old_file(tmp_path):
    path = tmp_path / "sub" / "a.json"
    utils.atomic_write_json(path, {"x": 1, "t": torch.tensor(2.5), "p": tmp_path})
    assert json.loads(path.read_text()) == {"x": 1, "t": 2.5, "p": str(tmp_path)}
    # a writer that fails half way never touches the existing file and leaves no temporary behind
    with pytest.raises(RuntimeError), utils.atomic_path(path) as tmp:
        tmp.write_text('{"x": ')
        raise RuntimeError("crash")
    assert json.loads(path.read_text())["x"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]
    utils.atomic_write_text(path, "new")
    assert path.read_text() == "new"
    utils.atomic_write_bytes(tmp_path / "b.bin", b"\0\1")
    assert (tmp_path / "b.bin").read_bytes() == b"\0\1"


def test_atomic_path_keeps_the_suffix_for_writers_that_read_it(tmp_path):
    from PIL import Image

    with utils.atomic_path(tmp_path / "img.png") as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path
        Image.new("RGB", (2, 2)).save(tmp)  # PIL picks the format from the suffix
    assert Image.open(tmp_path / "img.png").format == "PNG"


def test_atomic_dir_swaps_whole_directories(tmp_path):
    out = tmp_path / "out"
    with utils.atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(ValueError), utils.atomic_dir(out) as tmp:
        (tmp / "b").write_text("2")
        raise ValueError("crash")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and sorted(p.name for p in out.iterdir()) == ["a"]
    with utils.atomic_dir(out) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]  # replaced whole, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_prefix_publishes_what_the_writer_wrote_or_nothing(tmp_path):
    """sentencepiece / megatron's indexed dataset write PREFIX.<suffix> files: all renamed on success, in
    order; none published (and no temporary left) when the writer raises."""
    prefix = tmp_path / "sub" / "data"
    with pytest.raises(ValueError), utils.atomic_prefix(prefix, (".bin", ".idx")) as tmp:
        open(tmp + ".bin", "w").write("half")
        raise ValueError("crash")
    assert list((tmp_path / "sub").iterdir()) == []
    with utils.atomic_prefix(prefix, (".bin", ".idx", ".mask")) as tmp:
        open(tmp + ".bin", "w").write("b")
        open(tmp + ".idx", "w").write("i")  # no .mask written: none published
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["data.bin", "data.idx"]
    assert (tmp_path / "sub" / "data.idx").read_text() == "i"


def test_dtype_names_one_table():
    for spelling in ("fp32", "float32", "torch.float32", torch.float32):
        assert utils.dtype_name(spelling) == "float32" and utils.short_dtype_name(spelling) == "fp32"
    assert utils.torch_dtype("bf16") is torch.bfloat16 and utils.torch_dtype("bfloat16") is torch.bfloat16
    assert utils.short_dtype_name(torch.float16) == "fp16"
    with pytest.raises(ValueError, match="unknown dtype 'f8'.*fp32, bf16, fp16"):
        utils.dtype_name("f8")


def test_device_and_rank_defaults(monkeypatch):
    assert utils.default_device("cpu") == torch.device("cpu")
    assert utils.default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert (utils.rank(), utils.world_size()) == (0, 1)  # no process group here
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert utils.launch_env() == (3, 8, 1)
    assert (utils.rank(), utils.world_size()) == (0, 1)  # the process group's, not the launcher's
