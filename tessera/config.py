"""Typed dataclass configs: loaded from YAML, overridden from the command line, saved beside outputs.

A config is a (possibly nested) dataclass. ``load_config(Cls, "run.yaml", ["--model.hidden_size", "512"])``
reads the YAML, applies dotted overrides, converts every value to the field's declared type and
rejects unknown keys with a message naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tessera.utils import atomic_write_text

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is malformed; the message names the source and the field."""


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except (ConfigError, ValueError, TypeError) as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: cannot read {value!r} as {tp}: {'; '.join(errors)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return _from_dict(tp, value, where)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_convert(v, args[0], where) for v in value)
            if args and len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, where) for v, a in zip(value, args or [Any] * len(value), strict=True))
        item = args[0] if args else Any
        return [_convert(v, item, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_convert(k, kt, where): _convert(v, vt, where) for k, v in value.items()}
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return tp(value)


def _from_dict(cls: type[T], data: dict, where: str) -> T:
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    kwargs = {k: _convert(v, hints[k], f"{where}: {k}") for k, v in data.items()}
    return cls(**kwargs)


def from_dict(cls: type[T], data: dict, source: str = "<dict>") -> T:
    return _from_dict(cls, data, source)


def to_dict(cfg: Any) -> dict:
    """Plain dict (tuples as lists) for YAML/JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def parse_overrides(argv: list[str]) -> dict[str, str]:
    """``["--model.hidden_size", "512", "--train.lr=3e-4"]`` -> ``{"model.hidden_size": "512", "train.lr": "3e-4"}``."""
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"override {arg!r}: expected --section.key value")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"override --{key}: missing value")
            value = argv[i + 1]
            i += 2
        out[key.replace("-", "_")] = value
    return out


def apply_overrides(data: dict, cls: type, overrides: dict[str, str], source: str = "command line") -> dict:
    """Set dotted keys in the raw dict, checking that every path names a real field."""
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node, node_cls = data, cls
        for depth, part in enumerate(parts):
            fields = {f.name: f for f in dataclasses.fields(node_cls)}
            if part not in fields:
                raise ConfigError(
                    f"{source}: --{dotted}: {part!r} is not a field of {node_cls.__name__}; known: {sorted(fields)}"
                )
            tp = _field_types(node_cls)[part]
            if depth == len(parts) - 1:
                node[part] = value
            else:
                if not dataclasses.is_dataclass(tp):
                    raise ConfigError(f"{source}: --{dotted}: {part!r} is not a section")
                node = node.setdefault(part, {})
                node_cls = tp
    return data


def yaml_error_line(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: the problem and where (line, column counted from 1)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(exc).split())


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML file whose top level is a mapping (empty file: ``{}``); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {yaml_error_line(exc)}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
    return loaded


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | dict | None = None) -> T:
    """Build ``cls`` from an optional YAML file plus command-line overrides."""
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        data = read_yaml_mapping(path)
    if overrides:
        ov = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides)
        data = apply_overrides(data, cls, ov)
    return _from_dict(cls, data, source)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config (every default filled in) so a run can be reproduced."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
