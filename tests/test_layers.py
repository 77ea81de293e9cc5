"""The layers point one way: a short walk over the source's imports fails on any import from a
higher layer and on any import cycle, except the lazy imports listed in ALLOWED (each with why)."""
from __future__ import annotations

import ast
from pathlib import Path

import actscope

SRC = Path(actscope.__file__).parent

# Lowest first; a module may import its own layer and the layers below it. The package root
# (``actscope``, the public names) sits with the CLI, at the top.
LAYERS = (
    ("errors", "results", "native", "drawing"),
    ("data",),
    ("models",),
    ("sites", "store", "run"),
    ("hooks", "trace", "stats", "interventions"),
    ("feeding", "distributed"),
    ("metrics", "explain", "sparse", "train", "zoo", "sae"),
    ("measure", "profiling", "harvesting"),
    ("report",),
    ("cli", "", "__main__"),
)

# Lazy (function-level) imports allowed to point upwards; every cycle must contain one of them.
ALLOWED = {
    # Model.sites(): the wrapper's convenience for listing its sites with shapes, which needs one
    # observed forward pass (trace); the catalog it lists lives with the model.
    ("actscope.models.model", "actscope.trace"),
}


def module_name(path: Path) -> str:
    parts = ("actscope", *path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in SRC.rglob("*.py")}


def imported(name: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The actscope modules an import statement reaches (``from pkg import module`` is the module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.startswith("actscope")]
    if node.level:
        package = name.split(".") if MODULES[name].name == "__init__.py" else name.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if not base.startswith("actscope"):
        return []
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]


def edges() -> dict[tuple[str, str], bool]:
    """``{(importer, imported): lazy}`` over every import of every module."""
    found: dict[tuple[str, str], bool] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in imported(name, node):
                    if target in MODULES and target != name:
                        key = (name, target)
                        found[key] = found.get(key, True) and id(node) not in top
    return found


def layer(name: str) -> int:
    first = name.split(".")[1] if "." in name else ""
    return next(i for i, names in enumerate(LAYERS) if first in names)


def test_every_module_has_a_layer():
    missing = sorted(name for name in MODULES if not any((name.split(".") + [""])[1] in names for names in LAYERS))
    assert missing == [], "add these packages to LAYERS"


def test_no_module_imports_from_a_higher_layer():
    upward = sorted(f"{a} -> {b}" for (a, b), lazy in edges().items()
                    if layer(b) > layer(a) and (a, b) not in ALLOWED)
    assert upward == []


def test_every_allowed_exception_is_lazy_and_still_needed():
    found = edges()
    assert {pair: found.get(pair) for pair in ALLOWED} == {pair: True for pair in ALLOWED}


def test_no_import_cycle_without_an_allowed_lazy_edge():
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for a, b in edges():
        if (a, b) not in ALLOWED:
            graph[a].add(b)
    assert cycles(graph) == []


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found
