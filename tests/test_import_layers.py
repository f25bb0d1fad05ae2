"""The package's layers, and the import graph checked against them: no module imports from a layer above
its own, and no two modules import each other (directly or round a longer cycle).

Every ``import`` counts, module-level and inside functions alike (a lazy import is still a dependency);
only imports under ``if TYPE_CHECKING:`` are left out (annotations, never executed). Read from the source
with ``ast``, so nothing is imported to check it. docs/architecture.md draws the same map.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module may import from its own layer and the layers below. The longest matching
# prefix names a module's layer; every ``<package>.cli`` and ``__main__`` is a command (the top layer).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("tessera", "tessera.utils", "tessera.config", "tessera.progress")),
    ("kernels and tokenizers", ("tessera.kernels", "tessera.tokenizers")),
    ("model", ("tessera.model",)),
    ("checkpoint and tokenizer interop", ("tessera.convert",)),
    # tokenizer training reads raw corpora through tessera.data.raw: it sits with the data pipeline
    ("data", ("tessera.data", "tessera.tokenizers.text_train", "tessera.tokenizers.image_train")),
    ("generation", ("tessera.generate",)),
    ("training", ("tessera.pretrain",)),
    ("fixtures", ("tessera.testing",)),
    ("demo and benchmarks", ("tessera.demo", "tessera.bench")),
    ("commands", ("tessera.cli", "tessera.cli_common", "tessera.generate.example")),
]
COMMANDS = len(LAYERS) - 1

# Deliberate lazy upward imports: (importer, imported, why). Keep it short.
ALLOWED: list[tuple[str, str, str]] = []



def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted((ROOT / "tessera").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        # type-only imports, and a module's `if __name__ == "__main__":` block (a command entry point, the
        # commands' layer by definition)
        if isinstance(node, ast.If) and ("TYPE_CHECKING" in ast.unparse(node.test)
                                         or ast.unparse(node.test).replace("'", '"') == '__name__ == "__main__"'):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


def _resolve(name: str) -> str | None:
    """The module ``name`` refers to: itself, or (``from pkg import attr``) the longest module prefix."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> list[tuple[str, int]]:
    """(imported tessera module, line) for every import in ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    skip = _type_checking_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            names = [f"{base}.{a.name}" for a in node.names]
        for name in names:
            target = _resolve(name) if name.startswith("tessera") else None
            if target and target != module:
                found.append((target, node.lineno))
    return found


def layer_of(module: str) -> int:
    last = module.rpartition(".")[2]
    if last in ("cli", "__main__"):
        return COMMANDS
    best, layer = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, layer = len(p), i
    assert layer is not None, f"{module}: in no layer; add its package to LAYERS"
    return layer


def _graph() -> dict[str, set[str]]:
    return {m: {t for t, _ in imports_of(m)} for m in MODULES}


def test_every_module_has_a_layer():
    for m in MODULES:
        layer_of(m)


def test_no_module_imports_from_a_layer_above_its_own():
    exempt = {(a, b) for a, b, _ in ALLOWED}
    upward, used = [], set()
    for m in MODULES:
        for target, line in imports_of(m):
            if layer_of(target) > layer_of(m):
                if (m, target) in exempt:
                    used.add((m, target))
                else:
                    upward.append(f"{MODULES[m].relative_to(ROOT)}:{line}: {m} ({LAYERS[layer_of(m)][0]}) imports "
                                  f"{target} ({LAYERS[layer_of(target)][0]})")
    assert not upward, "upward imports:\n" + "\n".join(upward)
    stale = {(a, b) for a, b, _ in ALLOWED} - used
    assert not stale, f"ALLOWED entries no longer needed: {sorted(stale)}"


def test_no_import_cycles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_lazy_upward_imports_and_cycles(tmp_path, monkeypatch):
    """The checks can fail: a lazy upward import and a two-module cycle are both reported."""
    pkg = tmp_path / "tessera"
    (pkg / "model").mkdir(parents=True)
    (pkg / "bench").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "model" / "__init__.py").write_text("")
    (pkg / "bench" / "__init__.py").write_text("")
    (pkg / "model" / "a.py").write_text("def f():\n    from tessera.bench import b\n")
    (pkg / "bench" / "b.py").write_text("from tessera.model import a\n")
    (pkg / "model" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tessera.bench import b\n")
    mod = sys.modules[__name__]
    monkeypatch.setattr(mod, "ROOT", tmp_path)
    monkeypatch.setattr(mod, "MODULES", _modules())
    assert imports_of("tessera.model.a") == [("tessera.bench.b", 2)]
    assert imports_of("tessera.model.c") == []  # annotations only
    try:
        test_no_module_imports_from_a_layer_above_its_own()
    except AssertionError as exc:
        assert "tessera.model.a (model) imports tessera.bench.b (demo and benchmarks)" in str(exc)
    else:
        raise AssertionError("the upward import was not reported")
    try:
        test_no_import_cycles()
    except AssertionError as exc:
        assert "['tessera.bench.b', 'tessera.model.a']" in str(exc)
    else:
        raise AssertionError("the cycle was not reported")
