"""Typed configs: YAML + dotted overrides, type conversion, and errors that name the source and field."""

from dataclasses import dataclass, field

import pytest

from tessera.config import ConfigError, load_config, save_config, to_dict


@dataclass
class Inner:
    hidden_size: int = 64
    dropout: float = 0.0
    swin_norm: bool = False
    mults: tuple[int, ...] = (1, 2)
    name: str | None = None


@dataclass
class Outer:
    model: Inner = field(default_factory=Inner)
    steps: int = 10
    paths: list[str] = field(default_factory=list)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  hidden_size: 128\n  mults: [1, 1, 2]\nsteps: 5\n")
    cfg = load_config(Outer, path, ["--model.dropout", "0.1", "--model.swin_norm=true", "--steps", "7",
                                    "--paths", "a,b", "--model.name", "none"])
    assert cfg.model.hidden_size == 128
    assert cfg.model.mults == (1, 1, 2)
    assert cfg.model.dropout == pytest.approx(0.1)
    assert cfg.model.swin_norm is True
    assert cfg.steps == 7
    assert cfg.paths == ["a", "b"]
    assert cfg.model.name is None


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(Outer, None, ["--model.hidden_size", "32"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(Outer, tmp_path / "resolved.yaml")
    assert again == cfg
    assert to_dict(again)["model"]["hidden_size"] == 32


def test_unknown_key_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hiden_size: 128\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*hiden_size"):
        load_config(Outer, path)


def test_bad_override_value_and_path():
    with pytest.raises(ConfigError, match="hidden_size"):
        load_config(Outer, None, ["--model.hidden_size", "big"])
    with pytest.raises(ConfigError, match="nosuch"):
        load_config(Outer, None, ["--model.nosuch", "1"])
    with pytest.raises(ConfigError, match="missing value"):
        load_config(Outer, None, ["--steps"])


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "nope.yaml")
