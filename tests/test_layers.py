"""graft's imports go one way: each layer imports only the layers below it, and nothing cycles.

The order (docs/architecture.md): errors <- io <- nn, data, metrics, tokenizer <- kernels, models
<- tasks <- generation <- strategies <- loading <- train <- interpret <- compress <- cli. The test
reads every module's source (ast), so an import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import graft

PACKAGE = Path(graft.__file__).parent

# lowest first; a module may import its own layer's modules and any layer below
LAYERS: list[set[str]] = [
    {"graft.errors"},
    {"graft.io"},
    {"graft.nn", "graft.data", "graft.metrics", "graft.tokenizer", "graft.vision", "graft.speech"},
    {"graft.kernels", "graft.models"},
    {"graft.tasks"},
    {"graft.generation"},
    {"graft.strategies"},
    {"graft.loading"},
    {"graft.rag"},
    {"graft.export"},
    {"graft.train"},
    {"graft.pretrain", "graft.fewshot"},
    {"graft.interpret"},
    {"graft.compress"},
    {"graft.serve"},
    {"graft.cli", "graft.__main__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    """The layer unit a module belongs to: graft.X for graft/X.py or graft/X/..."""
    return ".".join(module.split(".")[:2])


def imports() -> dict[str, set[tuple[str, int]]]:
    """module -> {(imported graft module, line)} over every import statement, at any depth."""
    found: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").startswith("graft")
            ):
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("graft")]
            else:
                continue
            found[name].update((t, node.lineno) for t in targets)
    return found


def test_every_unit_has_a_layer():
    units = {unit(module_name(p)) for p in PACKAGE.rglob("*.py")} - {"graft"}
    assert sorted(units - RANK.keys()) == [], (
        "add the new module or package to LAYERS (and to architecture.md)"
    )


def test_imports_go_down_the_layers():
    wrong = [
        f"{module}:{line} imports {target} ({unit(module)} is below {unit(target)})"
        for module, targets in imports().items()
        for target, line in targets
        if unit(target) in RANK and unit(module) in RANK and RANK[unit(target)] > RANK[unit(module)]
    ]
    assert wrong == []


def test_no_import_cycles():
    graph = {m: {t for t, _ in targets} for m, targets in imports().items()}
    # a package's __init__ importing its own submodules is how packages export: not a cycle
    edges = {m: {t for t in ts if t != m and not t.startswith(m + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []
