"""What every ``tessera`` command shares: one spelling per flag, old spellings as deprecated aliases, and
expected errors as one line on stderr with exit status 2.

Flag spellings (docs/architecture.md, "Commands"): ``--seq-length``, ``--micro-batch``,
``--global-batch``, ``--dtype {fp32,bf16}``, ``--preset`` only for a model (or VQ) preset, ``--json``.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Iterable
from typing import Any

from tessera.config import ConfigError
from tessera.utils import DTYPE_NAMES, SHORT_DTYPE_NAMES

EXIT_USAGE = 2  # argparse's status for a bad command line; ours for every expected error


def warn(prog: str, msg: str) -> None:
    print(f"{prog}: warning: {msg}", file=sys.stderr, flush=True)


def fail(prog: str, msg: object) -> int:
    """Print ``prog: error: msg`` as one line on stderr; return the exit status 2."""
    text = " ".join(str(msg).split()) or type(msg).__name__
    print(f"{prog}: error: {text}", file=sys.stderr, flush=True)
    return EXIT_USAGE


class _DeprecatedAlias(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str, new: str, **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        warn(parser.prog, f"{option_string} is deprecated and will be removed: use {self.new}")
        setattr(namespace, self.dest, True if self.nargs == 0 else values)


def add_deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str, dest: str, **kwargs: Any) -> None:
    """``old`` stores into ``dest`` like ``new`` does, says it is deprecated, and is hidden from --help."""
    parser.add_argument(old, dest=dest, action=_DeprecatedAlias, new=new, help=argparse.SUPPRESS,
                        default=argparse.SUPPRESS, **kwargs)


def dtype_flag(choices: Iterable[str] = ("fp32", "bf16")) -> Callable[[str], str]:
    """An argparse ``type`` for ``--dtype``: the short names (``fp32``, ``bf16``); torch's names
    (``float32``, ``bfloat16``) still work, with a deprecation warning."""
    choices = tuple(choices)

    def parse(value: str) -> str:
        if value in choices:
            return value
        short = SHORT_DTYPE_NAMES.get(DTYPE_NAMES.get(value, ""), "")
        if short in choices:
            warn("tessera", f"--dtype {value} is deprecated and will be removed: use --dtype {short}")
            return short
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {', '.join(choices)})")

    parse.__name__ = "dtype"  # argparse names the type in its own messages
    return parse


def add_dtype(parser: argparse.ArgumentParser, choices: Iterable[str] = ("fp32", "bf16"), **kwargs: Any) -> None:
    choices = tuple(choices)
    kwargs.setdefault("metavar", "{" + ",".join(choices) + "}")
    parser.add_argument("--dtype", type=dtype_flag(choices), **kwargs)


def expected_errors(prog: str, *errors: type[BaseException]) -> Callable:
    """Decorate a command: ``errors`` (and every command's: a bad config or override, a path that cannot be
    read or written) become ``prog: error: ...`` on one line and exit status 2. Anything else is a bug
    and keeps its traceback."""
    caught = (ConfigError, OSError, *errors)

    def wrap(func: Callable[[argparse.Namespace], int | None]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(func)
        def run(args: argparse.Namespace) -> int:
            try:
                return int(func(args) or 0)
            except caught as exc:
                return fail(prog, exc)

        return run

    return wrap


def named_dirs(items: Iterable[str]) -> dict[str, str]:
    """``NAME=DIR`` or ``DIR`` arguments as ``{name: dir}`` (a bare DIR is named after its last component)."""
    out = {}
    for it in items:
        name, sep, path = it.partition("=")
        if not sep:
            name, path = it.rstrip("/").split("/")[-1], it
        out[name] = path
    return out
