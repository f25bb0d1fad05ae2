"""Tessera installs beside the PyTorch a machine already has (docs/training.md, "Installing on a GPU cluster").

Default run: the declared ranges and the CI pins agree, pip's resolver would leave this environment's
torch alone, and every module compiles on Python 3.10 and 3.12. Slow (`make test-install`): a fresh
venv with a preinstalled torch, `pip install -e .`, and the commands working; a Python 3.12 install;
the resolver on Python 3.12 / 3.10 with a cluster's torch fixed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from tessera.deps import MEGATRON_CORE, megatron_core_version

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (the suite runs on 3.11)

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def _requirements(extras: tuple[str, ...] = ()) -> list[Requirement]:
    reqs = [Requirement(r) for r in PROJECT["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in PROJECT["optional-dependencies"][extra]]
    return reqs


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[canonicalize_name(name)] = version
    return pins


def _pip(python: str | Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "pip", *args], capture_output=True, text=True, timeout=timeout)


def _check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{proc.args}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


# --- default run ---------------------------------------------------------------------------------------------


def test_dependencies_are_ranges_for_python_3_10_to_3_12():
    assert PROJECT["requires-python"] == ">=3.10,<3.13"
    for req in _requirements(tuple(PROJECT["optional-dependencies"])):
        assert not any(s.operator in ("==", "===") for s in req.specifier), f"pyproject.toml pins {req}: use a range"
    torch = next(r for r in _requirements() if r.name == "torch")
    assert torch.specifier.contains("2.6.0") and torch.specifier.contains("2.11.0")


def test_constraints_pin_every_dependency_inside_its_range():
    pins = _constraints()
    env = {"python_version": "3.11", "platform_system": "Linux", "sys_platform": "linux"}
    for req in _requirements(("dev",)):
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt has no pin for {req.name} (CI would install whatever is newest)"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject.toml's {req}"
        )


def test_megatron_range_is_the_one_checked_at_run_time():
    megatron = next(r for r in _requirements() if r.name == "megatron-core")
    assert megatron.specifier == SpecifierSet(MEGATRON_CORE)
    assert megatron.specifier.contains(_constraints()["megatron-core"])


def test_make_installs_the_pinned_torch_first_and_everything_through_the_constraints():
    makefile = (ROOT / "Makefile").read_text()
    installs = [line for line in makefile.splitlines() if "$(PIP)" in line and not line.lstrip().startswith("#")]
    assert "-c constraints.txt" in re.search(r"^PIP :=(.*)$", makefile, re.M).group(1)
    assert installs[0].split()[-1] == f"torch=={_constraints()['torch']}", installs
    assert "-e '.[dev]'" in installs[1]
    # CI runs the README's test command and nothing else
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == "make test"


@pytest.mark.parametrize("constrained", [False, True], ids=["as-users-install", "with-constraints"])
def test_pip_install_would_leave_this_torch_alone(tmp_path, constrained):
    """pip's resolver, offline, against this environment: `pip install -e .` installs tessera and nothing
    else (every dependency already satisfies its range; torch is neither upgraded nor reinstalled)."""
    report = tmp_path / "report.json"
    args = ["install", "--dry-run", "--no-build-isolation", "--no-index", "--quiet", "--report", str(report)]
    if constrained:
        args += ["-c", str(ROOT / "constraints.txt")]
    _check(_pip(sys.executable, *args, "-e", str(ROOT), timeout=300))
    installs = {i["metadata"]["name"]: i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert installs == {"tessera": PROJECT.get("version") or _version()}, installs


def _version() -> str:
    from tessera import __version__

    return __version__


def _interpreter(version: str) -> str | None:
    """A working ``python{version}``: on PATH, or one of pyenv's installed versions (its shim on PATH
    fails unless that version is selected)."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates = [shutil.which(f"python{version}"), *sorted(map(str, pyenv.glob(f"{version}.*/bin/python{version}")))]
    for exe in filter(None, candidates):
        probe = subprocess.run([exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == version:
            return exe
    return None


@pytest.mark.parametrize("version", ["3.10", "3.12"])
def test_every_module_compiles_on(version):
    """Syntax of every module and test under the other supported Pythons, warnings (invalid escapes) as
    errors; compiled in memory, nothing is written to the tree. Standard-library APIs newer than 3.10 are
    a separate audit (docs/training.md)."""
    python = _interpreter(version)
    if python is None:
        pytest.skip(f"no python{version} on PATH")
    code = (
        "import pathlib, sys\n"
        "bad = []\n"
        "root = pathlib.Path(sys.argv[1])\n"
        "for p in sorted([*root.glob('tessera/**/*.py'), *root.glob('tests/**/*.py')]):\n"
        "    try:\n"
        "        compile(p.read_bytes(), str(p), 'exec', dont_inherit=True)\n"
        "    except SyntaxError as e:\n"
        "        bad.append(f'{p}: {e}')\n"
        "print(sys.version_info[:2], len(bad))\n"
        "sys.exit('\\n'.join(bad) if bad else 0)\n"
    )
    proc = _check(subprocess.run([python, "-W", "error", "-c", code, str(ROOT)], capture_output=True, text=True))
    assert proc.stdout.startswith(f"({version.replace('.', ', ')}) 0")


# --- slow: real installs ------------------------------------------------------------------------------------


def _record_digest(python: Path, dist: str) -> tuple[str, str]:
    """(version, sha256 of the RECORD file) of an installed distribution: any reinstall rewrites RECORD."""
    code = (
        "import hashlib, importlib.metadata as m, sys\n"
        "d = m.distribution(sys.argv[1])\n"
        "print(d.version, hashlib.sha256(d.read_text('RECORD').encode()).hexdigest())\n"
    )
    out = _check(subprocess.run([str(python), "-c", code, dist], capture_output=True, text=True)).stdout.split()
    return out[0], out[1]


def _fresh_venv(path: Path, base: str) -> Path:
    _check(subprocess.run([base, "-m", "venv", str(path)], capture_output=True, text=True))
    return path / "bin" / "python"


def _base_python() -> str:
    """This interpreter outside its venv (a venv made from inside another one would still be fresh,
    but say so explicitly)."""
    exe = Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    return str(exe if exe.exists() else sys.executable)


@pytest.mark.slow
def test_fresh_venv_with_preinstalled_torch_keeps_it_and_tessera_works(tmp_path):
    """(a) A venv that already holds torch (the constraints' build; the CPU one on these machines) gets
    `pip install -e .` with every other pin but torch's: torch keeps its version and files, and the
    commands work, one training step included."""
    python = _fresh_venv(tmp_path / "venv", _base_python())
    pins = _constraints()
    _check(_pip(python, "install", "-q", f"torch=={pins['torch']}"))
    before = _record_digest(python, "torch")

    no_torch = tmp_path / "constraints-without-torch.txt"
    no_torch.write_text("".join(f"{n}=={v}\n" for n, v in pins.items() if n != "torch"))
    _check(_pip(python, "install", "-q", "-c", str(no_torch), "-e", str(ROOT)))
    assert _record_digest(python, "torch") == before

    tessera = tmp_path / "venv" / "bin" / "tessera"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only what the venv installed
    run = lambda *a: _check(subprocess.run([str(tessera), *a], capture_output=True, text=True, env=env, cwd=ROOT))  # noqa: E731
    assert "COMMAND" in run("--help").stdout
    assert f"torch {before[0]}" in run("--version").stdout
    assert "7,013,666,816" in run("model", "info", "chameleon-7b").stdout
    run_dir = tmp_path / "run"
    proc = run("train", "--config", "configs/demo.yaml", "--model.preset", "tiny", "--train.steps", "1",
               "--optim.warmup", "0", "--data.seq_length", "32", "--train.eval_interval", "0",
               "--train.run_dir", str(run_dir))
    assert "Apex is not installed" not in proc.stderr  # megatron's import-time warnings stay quiet
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and rows[0]["loss"] == rows[0]["loss"] and rows[0]["loss"] > 0


def _download(what: str, dest: Path, *extra: str) -> Path:
    _check(_pip(sys.executable, "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dest), *extra, what))
    prefix = canonicalize_name(what.split("=")[0]).replace("-", "_") + "-"
    return next(w for w in dest.glob("*.whl") if w.name.lower().startswith(prefix))


@pytest.mark.slow
def test_python_3_12_installs_tessera_and_megatron_core_wheel_without_torch(tmp_path):
    """(b) No torch for Python 3.12 lies on this disk: tessera and megatron-core's cp312 wheel install
    (--no-deps) into a 3.12 venv; `tessera --version` works, a command that needs a dependency names the
    missing one in one line; the megatron-core found passes the version check."""
    base = _interpreter("3.12")
    if base is None:
        pytest.skip("no python3.12 on PATH")
    python = _fresh_venv(tmp_path / "venv", base)
    wheels = tmp_path / "wheels"
    mcore = _download("megatron-core==0.16.1", wheels, "--python-version", "3.12", *_MANYLINUX)
    _check(_pip(python, "install", "-q", "--no-deps", str(ROOT), str(mcore)))
    tessera = tmp_path / "venv" / "bin" / "tessera"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    version = _check(subprocess.run([str(tessera), "--version"], capture_output=True, text=True, env=env))
    assert "python 3.12" in version.stdout and "torch not installed" in version.stdout
    assert "megatron-core 0.16.1" in version.stdout
    info = subprocess.run([str(tessera), "model", "info", "tiny"], capture_output=True, text=True, env=env)
    missing = re.fullmatch(r"tessera: this command needs (\S+), which is not installed \(pip install '(\S+)'\)\n",
                           info.stderr)
    assert info.returncode == 2 and missing and missing[1] == missing[2], info.stderr
    assert missing[1] in {canonicalize_name(r.name) for r in _requirements()}
    platlib = _check(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['platlib'])"],
                                    capture_output=True, text=True)).stdout.strip()
    assert megatron_core_version(Path(platlib) / "megatron" / "core") == "0.16.1"


# pip takes --platform literally: a glibc 2.28 x86_64 machine accepts every older manylinux tag too
# (torch 2.6's wheels are manylinux1, safetensors' manylinux2014, ...)
_MANYLINUX = [arg for tag in [*(f"manylinux_2_{m}" for m in range(28, 4, -1)), "manylinux2014", "manylinux2010",
                              "manylinux1"] for arg in ("--platform", f"{tag}_x86_64")]


def _resolve(tmp_path: Path, python_version: str, torch_version: str) -> dict[str, dict]:
    """pip's resolver for another Python on manylinux x86_64, with torch fixed at ``torch_version`` (as a
    cluster's preinstalled CUDA build): wheels only, nothing installed (metadata is all it fetches)."""
    wheel_dir = tmp_path / "wheel"
    _check(_pip(sys.executable, "wheel", "-q", "--no-deps", "-w", str(wheel_dir), str(ROOT)))
    wheel = next(wheel_dir.glob("tessera-*.whl"))
    fixed = tmp_path / "cluster.txt"
    fixed.write_text(f"torch=={torch_version}\n")
    report = tmp_path / "report.json"
    _check(_pip(sys.executable, "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
                "--python-version", python_version, *_MANYLINUX, "--only-binary=:all:", "-c", str(fixed), str(wheel)))
    return {canonicalize_name(i["metadata"]["name"]): i["metadata"] for i in json.loads(report.read_text())["install"]}


@pytest.mark.slow
@pytest.mark.parametrize(("python_version", "torch_version"), [("3.12", "2.11.0"), ("3.10", "2.6.0")])
def test_resolver_keeps_a_clusters_torch(tmp_path, python_version, torch_version):
    """(b) With a cluster's torch fixed (3.12 + torch 2.11, the GPU machines'; 3.10 + torch 2.6, the floor),
    every other dependency resolves: torch stays that version, triton is the one that torch pins, and
    megatron-core lands inside the supported range."""
    chosen = _resolve(tmp_path, python_version, torch_version)
    assert chosen["torch"]["version"] == torch_version
    env = {"python_version": python_version, "platform_system": "Linux", "sys_platform": "linux",
           "platform_machine": "x86_64", "extra": ""}
    torch_triton = [Requirement(r) for r in chosen["torch"].get("requires_dist", []) if r.startswith("triton")]
    torch_triton = [r for r in torch_triton if r.marker is None or r.marker.evaluate(env)]
    assert torch_triton and torch_triton[0].specifier.contains(chosen["triton"]["version"])
    assert SpecifierSet(MEGATRON_CORE).contains(chosen["megatron-core"]["version"])
    for req in _requirements():
        if req.marker is None or req.marker.evaluate(env):
            assert canonicalize_name(req.name) in chosen, f"{req.name} was not resolved"
            assert req.specifier.contains(chosen[canonicalize_name(req.name)]["version"], prereleases=True)
