"""Which megatron-core Tessera runs with, checked when Tessera first imports it; quiet imports.

megatron-core's API moves between minor releases, so Tessera supports the range its tests ran
against (``MEGATRON_CORE``; pyproject.toml declares the same) and refuses any other with one line,
before any of megatron's modules run. The check is an import hook installed by ``import tessera``:
commands that never import megatron (``tessera --version``, ``--help``, the data and tokenizer
commands, ``tessera bench gpu-check`` before its model parts) never pay for it and keep working where
the dependencies are only partly installed. ``TESSERA_SKIP_VERSION_CHECK=1`` lets an untested
megatron-core through (for trying a new release).

The same hook silences the import-time warnings megatron-core prints on every command when apex or
Transformer Engine is absent (Tessera reports the implementations it picked itself).
"""

from __future__ import annotations

import importlib.machinery
import os
import re
import sys
import warnings
from pathlib import Path

# megatron-core releases Tessera is tested with (docs/training.md, "Installing on a GPU cluster").
MEGATRON_CORE = ">=0.16.0,<0.18"

# The distributions behind the top-level modules Tessera imports, for a one-line "not installed" error.
DISTRIBUTIONS = {
    "torch": "torch",
    "megatron": "megatron-core",
    "triton": "triton",
    "einops": "einops",
    "webdataset": "webdataset",
    "sentencepiece": "sentencepiece",
    "vector_quantize_pytorch": "vector-quantize-pytorch",
    "tensorboard": "tensorboard",
    "PIL": "pillow",
    "numpy": "numpy",
    "yaml": "pyyaml",
    "safetensors": "safetensors",
    "psutil": "psutil",
    "pyarrow": "pyarrow",
    "transformers": "transformers",
}

# Import-time warnings megatron-core repeats on every command (one per module that looks for apex/TE),
# and the deprecation its own TransformerConfig default triggers.
_QUIET = (
    r"(Transformer Engine and )?Apex (is|are) not installed",
    r"full scope is deprecated",
)


class UnsupportedDependency(ImportError):
    """An installed dependency Tessera does not support (the message is the one line to show)."""


def _in_range(version: str, spec: str) -> bool:
    from packaging.specifiers import SpecifierSet  # megatron-core depends on packaging

    return SpecifierSet(spec).contains(version, prereleases=True)


def megatron_core_version(package_dir: str | os.PathLike) -> str | None:
    """The version of the megatron/core package in ``package_dir``, read from its package_info.py
    without running it (so a source checkout on PYTHONPATH is checked too); None when absent."""
    info = Path(package_dir) / "package_info.py"
    try:
        text = info.read_text()
    except OSError:
        return None
    parts = {k: re.search(rf"^{k}\s*=\s*(.+?)\s*$", text, re.M) for k in ("MAJOR", "MINOR", "PATCH", "PRE_RELEASE")}
    if not all(parts[k] for k in ("MAJOR", "MINOR", "PATCH")):
        return None
    pre = parts["PRE_RELEASE"].group(1).strip("'\"") if parts["PRE_RELEASE"] else ""
    return ".".join(parts[k].group(1) for k in ("MAJOR", "MINOR", "PATCH")) + pre


def check_megatron_core(version: str | None) -> None:
    """Raise UnsupportedDependency unless ``version`` is in MEGATRON_CORE (None: version unknown, allowed)."""
    if version is None or os.environ.get("TESSERA_SKIP_VERSION_CHECK", "") == "1":
        return
    if not _in_range(version, MEGATRON_CORE):
        raise UnsupportedDependency(
            f"megatron-core {version} is installed; Tessera supports megatron-core{MEGATRON_CORE} "
            f"(pip install 'megatron-core{MEGATRON_CORE}', or TESSERA_SKIP_VERSION_CHECK=1 to try it anyway)"
        )


def quiet_megatron_warnings() -> None:
    for pattern in _QUIET:
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)


class _MegatronCoreGuard:  # a sys.meta_path finder (PEP 451)
    """Checks megatron-core's version the first time ``megatron.core`` is imported, then steps aside.

    It only looks: the import itself is left to the finders behind it. While the version is
    unsupported it stays, so every later attempt raises the same error instead of importing."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "megatron.core":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not spec.submodule_search_locations:
            return None  # not installed: the usual ModuleNotFoundError follows
        check_megatron_core(megatron_core_version(next(iter(spec.submodule_search_locations))))
        quiet_megatron_warnings()
        uninstall_import_guard()
        return None


_GUARD = _MegatronCoreGuard()


def install_import_guard() -> None:
    """Check megatron-core when it is first imported (now, if it already is). Idempotent."""
    if "megatron.core" in sys.modules:
        core = sys.modules["megatron.core"]
        check_megatron_core(megatron_core_version(Path(core.__file__).parent) if core.__file__ else None)
        quiet_megatron_warnings()
        return
    if _GUARD not in sys.meta_path:
        sys.meta_path.insert(0, _GUARD)


def uninstall_import_guard() -> None:
    if _GUARD in sys.meta_path:
        sys.meta_path.remove(_GUARD)


def installed_versions(names: tuple[str, ...] = ("torch", "megatron-core", "triton", "transformer-engine")) -> dict:
    """Installed versions by distribution name (None when absent), read from package metadata
    without importing anything (``tessera --version``)."""
    import importlib.metadata  # not at module level: it costs more than the rest of `import tessera`

    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions
