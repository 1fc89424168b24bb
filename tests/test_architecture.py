"""The layers of ``bench/`` (docs/architecture.md): imports flow one way, and no import cycle.

Every import statement of every module counts, function-local and ``TYPE_CHECKING`` ones
included: a local import hides a cycle from Python, not from the design.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import bench

ROOT = Path(bench.__file__).parent

# Bottom to top. A module may import its own layer and the layers below it, never one above.
LAYERS = ("core", "registry", "config", "data", "results", "training", "models", "certifiers", "attacks",
          "defenses", "harness", "api", "cli")
CORE = {"bench", "bench.__main__", "bench.errors", "bench.paths", "bench.tasks", "bench.progress", "bench.device",
        "bench.params", "bench.capabilities"}
# `python -m bench` runs the CLI, and the package re-exports `bench.evaluate` (lazily, on first use):
# the modules allowed to reach the top
ENTRY_POINTS = {"bench.__main__", "bench"}
ALLOWED_CYCLES = {frozenset({"bench.cli.app", "bench.cli.commands"})}  # Typer's register-by-import idiom


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    if module in CORE:
        return "core"
    return module.split(".")[1]


def imports() -> dict[str, set[str]]:
    """bench module -> the bench modules it imports (any import statement anywhere in it)."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                submodules = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
                targets = submodules or [node.module]  # `from pkg import mod` imports mod
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def test_every_module_has_a_known_layer():
    unknown = sorted(m for m in imports() if layer(m) not in LAYERS)
    assert not unknown, f"modules outside the declared layers: {unknown}; add them to LAYERS/CORE and the docs"


def test_imports_never_go_up_a_layer():
    upward = sorted(f"{a} -> {b}" for a, targets in imports().items() for b in targets
                    if a not in ENTRY_POINTS and LAYERS.index(layer(b)) > LAYERS.index(layer(a)))
    assert not upward, "upward imports:\n" + "\n".join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(component)

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_except_typers_app_and_commands():
    graph = imports()
    lazy = graph.pop("bench", set())  # the package imports bench.api only inside __getattr__ (bench.evaluate)
    assert lazy <= {"bench.api"}, f"the package imports {sorted(lazy)}: keep `import bench` cheap"
    cycles = [sorted(c) for c in _cycles(graph) if frozenset(c) not in ALLOWED_CYCLES]
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_an_upward_import_and_a_cycle():
    graph = {"bench.models.x": {"bench.harness.y"}, "bench.harness.y": {"bench.models.x"}}
    assert _cycles(graph) == [{"bench.models.x", "bench.harness.y"}]
    assert LAYERS.index(layer("bench.harness.y")) > LAYERS.index(layer("bench.models.x"))
