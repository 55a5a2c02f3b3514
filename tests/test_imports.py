"""The import graph of the kdtune package: no cycle, and every import points down a floor.

Every ``import`` and ``from ... import`` of a kdtune module is read from the source (also the
ones inside functions: a lazy import that closes a cycle is a cycle all the same), resolved to
the module it loads, and checked against the floors of STYLE.md.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_PACKAGE = {"tests", "benchmarks", "scripts", "build", "docs"}

FLOORS: list[tuple[str, ...]] = [
    ("kdtune", "kdtune.configs", "kdtune.assets", "kdtune.models"),
    ("kdtune.losses", "kdtune.quantization"),
    ("kdtune.training.config",),
    ("kdtune.training", "kdtune.teacher_cache", "kdtune.pruning"),
    ("kdtune.recipes",),
    ("kdtune.smollm2", "kdtune.demo"),
    ("kdtune.cli",),
]
"""Bottom to top. A module may import its own floor's modules and any floor below; a module
is on the floor of the longest prefix naming it (``kdtune.training.config.rules`` is on the
config floor, ``kdtune.training.steps`` on the training floor); ``kdtune`` names only the
package's own ``__init__``, so a new package must be given a floor here."""


def package_modules() -> dict[str, Path]:
    """``kdtune.x.y`` -> its file, for every module of the installed package."""
    modules = {}
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT)
        if relative.parts[0] in NOT_PACKAGE or relative.parts[0].startswith("."):
            continue
        parts = list(relative.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(["kdtune", *parts])] = path
    return modules


def imported_modules(path: Path, modules: dict[str, Path]) -> set[str]:
    """The kdtune modules ``path`` imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from kdtune.training import steps` loads the module kdtune.training.steps;
            # `from kdtune.losses import KDOutput` a name of the package kdtune.losses
            names = [
                f"{node.module}.{alias.name}"
                if f"{node.module}.{alias.name}" in modules
                else node.module
                for alias in node.names
            ]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


@functools.cache
def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported_modules(path, modules) - {name} for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def floor(module: str) -> int:
    best, level = -1, -1
    for number, prefixes in enumerate(FLOORS):
        for prefix in prefixes:
            inside = module.startswith(prefix + ".") and prefix != "kdtune"
            if (module == prefix or inside) and len(prefix) > best:
                best, level = len(prefix), number
    return level


def test_the_graph_is_read():
    graph = import_graph()
    assert "kdtune.recipes.knowledge_distillation" in graph
    assert "kdtune.training.steps" in graph["kdtune.recipes.knowledge_distillation"]
    # a lazy import inside a function counts
    assert any("kdtune.recipes.knowledge_distillation" in edges for edges in graph.values())


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, f"import cycles: {found}"


def test_cycle_finder_finds_a_lazy_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("module", sorted(import_graph()))
def test_imports_point_down(module):
    assert floor(module) >= 0, f"{module} is on no floor: add it to FLOORS"
    upward = sorted(m for m in import_graph()[module] if floor(m) > floor(module))
    assert not upward, f"{module} (floor {floor(module)}) imports a higher floor: {upward}"


def test_the_loss_floor_imports_only_itself():
    graph = import_graph()
    for module, edges in graph.items():
        if module.startswith("kdtune.losses"):
            assert all(e == "kdtune" or e.startswith("kdtune.losses") for e in edges), module
