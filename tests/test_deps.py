"""tessera.deps: an unsupported megatron-core is refused in one line when first imported, commands that do
not need it keep working, megatron's import-time warnings stay quiet; `tessera --version`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tessera import __version__
from tessera.deps import MEGATRON_CORE, UnsupportedDependency, check_megatron_core, megatron_core_version

ROOT = Path(__file__).resolve().parents[1]


def _fake_megatron(root: Path, version: tuple[int, int, int], pre: str = "") -> Path:
    """A megatron/core package of ``version`` whose code must never run (it exits if imported)."""
    core = root / "megatron" / "core"
    core.mkdir(parents=True)
    (core / "package_info.py").write_text(
        f'MAJOR = {version[0]}\nMINOR = {version[1]}\nPATCH = {version[2]}\nPRE_RELEASE = "{pre}"\n'
        "VERSION = (MAJOR, MINOR, PATCH, PRE_RELEASE)\n")
    (core / "__init__.py").write_text("raise SystemExit('the unsupported megatron-core was imported')\n")
    return core


def _tessera(*args, pythonpath=(), env=None, python_flags=()):
    path = os.pathsep.join([*map(str, pythonpath), str(ROOT)])
    e = {k: v for k, v in os.environ.items() if k != "TESSERA_SKIP_VERSION_CHECK"}
    e.update(PYTHONPATH=path, **(env or {}))
    return subprocess.run([sys.executable, *python_flags, "-m", "tessera", *args], capture_output=True, text=True,
                          env=e, cwd=ROOT)


def test_version_is_read_from_package_info_without_running_it(tmp_path):
    core = _fake_megatron(tmp_path, (0, 17, 0), "rc2")
    assert megatron_core_version(core) == "0.17.0rc2"
    assert megatron_core_version(tmp_path) is None  # no package_info.py
    import importlib.metadata
    import importlib.util

    installed = importlib.util.find_spec("megatron.core")  # located, not imported
    assert megatron_core_version(Path(installed.origin).parent) == importlib.metadata.version("megatron-core")


@pytest.mark.parametrize("version", ["0.15.3", "0.16.0rc0", "0.18.0", "0.19.2", "1.0.0"])
def test_versions_outside_the_range_are_refused_with_both_versions_named(version, monkeypatch):
    monkeypatch.delenv("TESSERA_SKIP_VERSION_CHECK", raising=False)
    with pytest.raises(UnsupportedDependency) as exc:
        check_megatron_core(version)
    assert str(exc.value).startswith(f"megatron-core {version} is installed; Tessera supports megatron-core{MEGATRON_CORE}")
    monkeypatch.setenv("TESSERA_SKIP_VERSION_CHECK", "1")
    check_megatron_core(version)


@pytest.mark.parametrize("version", ["0.16.0", "0.16.1", "0.17.0", "0.17.1", None])
def test_supported_or_unknown_versions_pass(version):
    check_megatron_core(version)


def test_cli_refuses_an_unsupported_megatron_core_in_one_line_before_running_it(tmp_path):
    _fake_megatron(tmp_path, (0, 99, 1))
    proc = _tessera("model", "info", "tiny", pythonpath=[tmp_path])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"tessera: megatron-core 0.99.1 is installed; Tessera supports megatron-core{MEGATRON_CORE} "
        f"(pip install 'megatron-core{MEGATRON_CORE}', or TESSERA_SKIP_VERSION_CHECK=1 to try it anyway)"]
    # a command that does not import megatron is unaffected
    assert _tessera("--version", pythonpath=[tmp_path]).returncode == 0
    # the escape hatch lets it through (and the fake's code then runs)
    proc = _tessera("model", "info", "tiny", pythonpath=[tmp_path], env={"TESSERA_SKIP_VERSION_CHECK": "1"})
    assert "the unsupported megatron-core was imported" in proc.stderr


def test_version_and_missing_dependencies_without_site_packages():
    """-S: no site-packages at all (no torch, no yaml). --version still answers; a command that needs a
    missing dependency says which, in one line, with exit status 2."""
    version = _tessera("--version", python_flags=["-S"])
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith(f"tessera {__version__} (python ") and "torch not installed" in version.stdout
    proc = _tessera("model", "info", "tiny", python_flags=["-S"])
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["tessera: this command needs pyyaml, which is not installed (pip install 'pyyaml')"]


def test_version_names_what_tessera_runs_on():
    out = _tessera("--version").stdout
    import torch

    assert out.startswith(f"tessera {__version__} (python ") and f"torch {torch.__version__}" in out
    assert "megatron-core 0.16" in out and "transformer-engine" in out


def test_megatrons_import_warnings_are_quiet():
    code = "import tessera.model.chameleon, tessera.pretrain.trainer"
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    assert "Apex is not installed" not in proc.stderr and "Apex are not installed" not in proc.stderr
