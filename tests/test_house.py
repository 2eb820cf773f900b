"""The house's rules, checked on the source: stages import one way only, no import circles, no reaching into
another package's private names, and no module or function much past the sizes a reader takes in at once."""

from __future__ import annotations

import ast
import pathlib
from collections import defaultdict

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "simpsons_ray"

# Each package and the packages it may import: down the stages a frame passes through.
ALLOWED = {
    "core": set(),
    "media": {"core"},
    "model": {"core", "media"},
    "labels": {"core", "media"},
    "train": {"core", "media", "model"},
    "label": {"core", "media", "model", "labels"},
    "query": {"core", "media", "labels"},
    "report": {"core", "media", "labels", "query"},
    "review": {"core", "media", "model", "labels", "train", "query"},
    "demo": {"core", "media", "model", "labels", "train", "label", "query", "report"},
    "cli": {"core", "media", "model", "labels", "train", "label", "query", "report", "review", "demo"},
}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# What a docstring says when a module or function reads better whole (the rule allows it, if said).
WHOLE = "reads better whole"


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: pathlib.Path, modules: dict[str, pathlib.Path]) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import of the package in a file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("simpsons_ray"):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if submodule in modules:
                    found.append((submodule, [], node.lineno))
                else:
                    found.append((node.module, [alias.name], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("simpsons_ray")]
    return found


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_module_belongs_to_a_package_that_says_what_it_owns_and_may_import():
    modules = _modules()
    top = sorted(name for name in modules if name.count(".") == 1 and modules[name].name != "__init__.py")
    assert top == [], f"modules outside the stage packages: {top}"
    for package in ALLOWED:
        doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text())) or ""
        assert "Owns:" in doc and "May import:" in doc, f"simpsons_ray/{package}/__init__.py must say what it owns and may import"


def test_packages_import_only_the_stages_below_them_and_no_private_names():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        package = _package(name)
        if package is None:
            continue
        for target, names, line in _imports(path, modules):
            other = _package(target)
            if other is None or other == package:
                continue
            if other not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target} ({package} may import {sorted(ALLOWED[package])})")
            wrong += [f"{path.relative_to(ROOT.parent)}:{line} takes the private {target}.{n}" for n in names if n.startswith("_")]
    assert wrong == []


def test_no_import_circles_between_modules():
    modules = _modules()
    graph = defaultdict(set)
    for name, path in modules.items():
        for target, _, _ in _imports(path, modules):
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            # A package's __init__ re-exports its modules: importing a module does not import its package's siblings.
            if target != name and not name.startswith(target + ".") and target in modules:
                graph[name].add(target)
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for module in sorted(modules):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_modules_and_functions_stay_small_or_say_why_they_read_better_whole():
    too_long = []
    for path in sorted(ROOT.rglob("*.py")):
        text = path.read_text()
        tree = ast.parse(text)
        where = path.relative_to(ROOT.parent)
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES and WHOLE not in (ast.get_docstring(tree) or ""):
            too_long.append(f"{where}: {lines} lines")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and WHOLE not in (ast.get_docstring(node) or ""):
                    too_long.append(f"{where}:{node.lineno} {node.name}(): {length} lines")
    assert too_long == []


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_alone(package):
    """Importing a package on its own works: no hidden order between packages."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", f"import simpsons_ray.{package}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
