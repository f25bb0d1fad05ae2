"""One CLI style: every command group turns bad input into one line on stderr and exit status 2, and old flag
spellings keep working for a release with a deprecation warning."""

from __future__ import annotations

import pytest

from tessera.cli import main

BAD_YAML = "model: [1\n"  # PyYAML's message for this spans several lines


@pytest.fixture
def files(tmp_path):
    (tmp_path / "bad.yaml").write_text(BAD_YAML)
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "bad.json").write_text('{"images": ')
    (tmp_path / "ok.yaml").write_text("model:\n  preset: tiny\n")
    return tmp_path


def _one_line_error(capsys, argv: list[str], prog: str, *needles: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0].startswith(f"{prog}: error: "), err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


CASES = {
    "model": [
        (["model", "info", "nope"], "tessera model info", ("unknown model preset 'nope'",)),
    ],
    "tokenizer": [
        (["tokenizer", "train-image", "--config", "{d}/bad.yaml", "--data", "{d}"], "tessera tokenizer",
         ("bad.yaml: invalid YAML", "line 2")),
        (["tokenizer", "decode", "--tokenizer", "{d}/missing", "{d}/bad.json", "--out", "{d}/r.png"],
         "tessera tokenizer", ("missing: not an image tokenizer",)),
    ],
    "data": [
        (["data", "synth", "--out", "{d}/a_file/sub", "--docs", "2"], "tessera data", ("a_file",)),
        (["data", "report", "--config", "{d}/bad.yaml"], "tessera data", ("bad.yaml: invalid YAML",)),
        (["data", "curate", "--input", "{d}/missing.tar", "--out", "{d}/c"], "tessera data", ("missing.tar",)),
    ],
    "generate": [
        (["generate", "--checkpoint", "{d}/missing", "--prompt", "hi", "--out", "{d}/g"], "tessera generate",
         ("missing: no such checkpoint",)),
        (["generate", "--config", "{d}/bad.yaml", "--checkpoint", "{d}/missing", "--prompt", "hi", "--out", "{d}/g"],
         "tessera generate", ("bad.yaml: invalid YAML",)),
        (["generate", "--checkpoint", "{d}/missing", "--prompt", "hi", "--out", "{d}/g", "--text.nonsense", "1"],
         "tessera generate", ("--text.nonsense",)),
    ],
    "convert": [
        (["convert", "from-hf", "{d}/missing", "{d}/out"], "tessera convert", ("missing: not a directory",)),
        (["convert", "to-hf", "{d}/missing", "{d}/out"], "tessera convert", ("missing: no such checkpoint",)),
    ],
    "train": [
        (["train", "--config", "{d}/missing.yaml"], "tessera train", ("missing.yaml: config file not found",)),
        (["train", "--config", "{d}/bad.yaml"], "tessera train", ("bad.yaml: invalid YAML",)),
        (["train", "--config", "{d}/ok.yaml", "--model.preset", "nope"],
         "tessera train", ("unknown model preset 'nope'",)),
        (["train", "--config", "{d}/ok.yaml", "--train.nonsense", "1"], "tessera train", ("--train.nonsense",)),
    ],
    "demo": [
        (["demo", "--size", "fast", "--out", "{d}/o", "--stop-after", "nope"], "tessera demo", ("--stop-after 'nope'",)),
        (["demo", "--size", "fast", "--out", "{d}/o", "--train_docs", "x"], "tessera demo", ("train_docs",)),
        (["demo", "--size", "fast", "--out", "{d}/a_file/sub", "--stop-after", "synth"], "tessera demo", ("a_file",)),
    ],
    "bench": [
        (["bench", "plan", "--preset", "nope"], "tessera bench", ("unknown model preset 'nope'",)),
        (["bench", "kernels", "--batches", "1,x"], "tessera bench", ("--batches",)),
        (["bench", "data", "{d}/missing"], "tessera bench", ("missing: not a directory",)),
        (["bench", "plan", "--config", "{d}/bad.yaml"], "tessera bench", ("bad.yaml: invalid YAML",)),
    ],
}


@pytest.mark.parametrize("group", sorted(CASES))
def test_expected_errors_are_one_line_and_exit_2(group, files, capsys):
    for argv, prog, needles in CASES[group]:
        _one_line_error(capsys, [a.format(d=files) for a in argv], prog, *needles)


def test_old_dtype_spellings_still_work_with_a_warning(files, capsys):
    """--dtype float32 (convert, generate) is now fp32; the old spelling parses, says it is deprecated, and
    the command goes on to its own (here: path) error."""
    for argv, prog in (
        (["convert", "to-hf", f"{files}/missing", f"{files}/out", "--dtype", "float32"], "tessera convert"),
        (["generate", "--checkpoint", f"{files}/missing", "--prompt", "hi", "--out", f"{files}/g", "--dtype",
          "bfloat16"], "tessera generate"),
    ):
        line = _one_line_error(capsys, argv, prog)
        assert "no such checkpoint" in line
    with pytest.raises(SystemExit) as exc:  # not a dtype at all: argparse's usage error, status 2
        main(["convert", "to-hf", "a", "b", "--dtype", "fp64"])
    assert exc.value.code == 2 and "invalid choice: 'fp64' (choose from auto, fp32, bf16)" in capsys.readouterr().err


def test_deprecated_flag_alias_warns_and_stores(capsys):
    import argparse

    from tessera.cli_common import add_deprecated_alias, add_dtype

    p = argparse.ArgumentParser(prog="tessera x")
    p.add_argument("--seq-length", type=int, default=7)
    add_deprecated_alias(p, "--seq", "--seq-length", dest="seq_length", type=int)
    add_dtype(p, default="fp32")
    assert p.parse_args([]).seq_length == 7 and "deprecated" not in capsys.readouterr().err
    args = p.parse_args(["--seq", "9", "--dtype", "bfloat16"])
    assert (args.seq_length, args.dtype) == (9, "bf16")
    err = capsys.readouterr().err
    assert "tessera x: warning: --seq is deprecated and will be removed: use --seq-length" in err
    assert "--dtype bfloat16 is deprecated and will be removed: use --dtype bf16" in err
    assert "--seq" not in p.format_help().replace("--seq-length", "")  # hidden from --help


def test_train_help_shows_overrides_and_every_section(capsys):
    import dataclasses

    from tessera.pretrain.cli import SECTIONS
    from tessera.pretrain.config import TrainConfig

    assert list(SECTIONS) == [f.name for f in dataclasses.fields(TrainConfig)]
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "--section.key value" in out
    for name in SECTIONS:
        assert f"\n  {name} " in out, name


def test_demo_preset_is_a_deprecated_alias_of_size(capsys):
    """--preset names model presets everywhere; the demo's size switch is --size (old spelling: a warning)."""
    import argparse

    from tessera.demo.cli import register

    p = argparse.ArgumentParser(prog="tessera demo")
    register(p)
    assert p.parse_args([]).size == "full" and p.parse_args(["--size", "fast"]).size == "fast"
    assert "deprecated" not in capsys.readouterr().err
    assert p.parse_args(["--preset", "fast"]).size == "fast"
    assert "--preset is deprecated and will be removed: use --size" in capsys.readouterr().err
    assert "--preset" not in p.format_help()
