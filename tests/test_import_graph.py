"""The import graph of ctrl_offline, data_tools and recipes: no circle and no arrow back up a layer, counting
imports inside functions.

An import hidden in a function still ties two modules together: a circle through one means neither
can be understood, tested or moved without the other. The layers of ctrl_offline are its folders,
bottom to top as :data:`LAYERS` lists them (docs/architecture.md); ``data_tools`` (the CLI) and
``recipes`` sit above them all.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ctrl_offline", "data_tools", "recipes")
#: ctrl_offline's layers, bottom to top: a module may import its own layer and those below, never one above.
LAYERS = ("maths", "rows", "io", "models", "training", "reports", "testbeds", "stages", "pipeline")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """module → the package modules it imports anywhere in its body (``from x import y`` counts x.y when y is a module)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node, name, path.name == "__init__.py")
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            else:
                continue
            for target in targets:
                # The deepest package module named by the import (a.b.c → a.b when c is a name in a.b).
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_find_cycles_finds_one():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    # stages/evaluate.py imports the reporting module inside evaluate_policy only
    assert "ctrl_offline.reports.reporting" in graph["ctrl_offline.stages.evaluate"]


def test_no_import_circles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import circles (imports inside functions count):\n" + "\n".join(" ↔ ".join(c) for c in cycles)


def layer_of(module: str) -> int:
    """The rank of ``module``'s layer: ctrl_offline's private roots lowest, its folders by :data:`LAYERS`,
    the package's own ``__init__`` (the public names) and the CLI and recipes above them all."""
    parts = module.split(".")
    if parts[0] != "ctrl_offline":
        return len(LAYERS) + 1
    if len(parts) == 1:
        return len(LAYERS)
    if parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return -1  # ctrl_offline._version


def test_every_module_of_ctrl_offline_sits_in_a_layer_folder():
    loose = [m for m in import_graph() if m.count(".") == 1 and m.startswith("ctrl_offline.")
             and m.split(".")[1] not in (*LAYERS, "_version")]
    assert not loose, f"modules outside the layer folders: {loose}"


def test_no_arrow_runs_back_up_a_layer():
    upward = [f"{a} → {b}" for a, targets in import_graph().items() for b in targets if layer_of(b) > layer_of(a)]
    assert not upward, "imports from a higher layer (docs/architecture.md):\n" + "\n".join(sorted(upward))
