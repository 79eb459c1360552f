"""The package's layers import only downward, and no modules import each other in a cycle.

Layers, bottom to top (packages in one layer are independent of each other)::

    core -> model -> quantize -> evaluate -> formats -> {kernels, engines} -> runtime -> {cli, testing}

Every import counts, also one inside a function: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "sqdeploy"
LAYERS: list[set[str]] = [
    {"core"},
    {"model"},
    {"quantize"},
    {"evaluate"},
    {"formats"},
    {"kernels", "engines"},
    {"runtime"},
    {"cli", "testing"},
]
# module names in strings that are not imports: (module, string) -> why
NOT_IMPORTS = {
    ("sqdeploy.runtime.bench.overhead", "sqdeploy.cli.serve"): "starts the server in its own process, as a user would",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.split(".")[0] == "sqdeploy")
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                if base.split(".")[0] != "sqdeploy":
                    continue
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    deps.add(full if full in mods else base)
        graph[name] = {d for d in deps if d != name}
    return graph


def _layer(module: str) -> tuple[int, str] | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the top-level package (its version) belongs to no layer
    for i, layer in enumerate(LAYERS):
        if parts[1] in layer:
            return i, parts[1]
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS")


def test_every_package_has_a_layer():
    for module in _modules():
        _layer(module)


def test_imports_go_only_downward():
    bad = []
    for module, deps in import_graph().items():
        here = _layer(module)
        for dep in deps:
            there = _layer(dep)
            if here is None or there is None:
                continue
            if there[0] > here[0] or (there[0] == here[0] and there[1] != here[1]):
                bad.append(f"{module} -> {dep}")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in import_graph().items()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_a_violation():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    with pytest.raises(AssertionError):
        _layer("sqdeploy.nowhere.x")


def _string_module_names(path: Path, modules: set[str]) -> list[str]:
    """String constants (not docstrings) that name an sq-deploy module: an import by name."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            text = node.value.split(":")[0]
            if text in modules:
                found.append(node.value)
        elif isinstance(node, ast.JoinedStr) and any(
            isinstance(v, ast.FormattedValue) and isinstance(v.value, ast.Name) and v.value.id == "__name__" for v in node.values
        ):
            found.append("f-string built from __name__")
    return found


def test_no_strings_name_modules_to_import():
    """A module named in a string (``__import__``, ``import_module``, a registry of names) hides a
    dependency from the checks above; the triton python models are loaded by Triton, not imported."""
    modules = set(_modules())
    bad = [f"{m}: {s}" for m, p in _modules().items() for s in _string_module_names(p, modules) if (m, s) not in NOT_IMPORTS]
    assert not bad, "\n".join(bad)


def test_the_string_check_sees_a_module_name(tmp_path):
    f = tmp_path / "m.py"
    f.write_text('"""sqdeploy.core.errors in a docstring is fine."""\nX = ["sqdeploy.core.errors"]\n')
    assert _string_module_names(f, {"sqdeploy.core.errors"}) == ["sqdeploy.core.errors"]


def test_tests_mirror_the_packages():
    """Each folder of tests/ is named after the package (or format) its tests cover."""
    tests = Path(__file__).resolve().parent
    packages = {p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*") if p.is_dir() and (p / "__init__.py").exists()}
    folders = {p.relative_to(tests).as_posix() for p in tests.rglob("*") if p.is_dir() and (p / "__init__.py").exists()}
    assert folders and folders <= packages, f"test folders without a package: {sorted(folders - packages)}"
