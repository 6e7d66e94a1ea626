"""The code's shape, checked: imports run one way (no cycle, lower layers never import higher ones), and no
function grows past a screen or two (80 lines in rlhf/ and the trainers, 120 anywhere in toolkit/)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from support.cli import ROOT

PACKAGES = ("toolkit", "rlhf")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every project module `name` imports, at the top or inside a function (both count)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(name, path, known) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
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

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    graph = import_graph()
    # a package's __init__ importing its own sub-modules is how packages work, not a cycle between layers
    graph = {m: {t for t in targets if not (t.startswith(m + ".") and modules()[m].name == "__init__.py")}
             for m, targets in graph.items()}
    assert cycles(graph) == []


LOWER = ("toolkit.errors", "toolkit.io", "toolkit.rows", "toolkit.models", "toolkit.chat_format")
HIGHER = ("toolkit.training", "toolkit.sft", "toolkit.reward", "toolkit.dpo", "rlhf", "toolkit.commands",
          "toolkit.cli", "toolkit.demo")


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_imports_run_one_way():
    graph = import_graph()
    wrong = []
    for module, targets in graph.items():
        for target in targets:
            if _under(module, LOWER) and _under(target, HIGHER):
                wrong.append(f"{module} -> {target}")
            if _under(module, ("toolkit.training",)) and _under(target, HIGHER[1:]):
                wrong.append(f"{module} -> {target}")
            command_layer = ("toolkit.commands", "toolkit.cli", "toolkit.config")
            if not _under(module, command_layer) and _under(target, ("toolkit.commands",)):
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def long_functions(paths: list[Path], limit: int) -> list[str]:
    """`path:line name (N lines)` of each function over `limit`."""
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    return found


TRAINERS = ("toolkit/sft.py", "toolkit/reward/train.py", "toolkit/dpo.py")


@pytest.mark.parametrize(("paths", "limit"), [
    (sorted((ROOT / "rlhf").rglob("*.py")) + sorted((ROOT / "toolkit" / "training").rglob("*.py"))
     + [ROOT / t for t in TRAINERS], 80),
    (sorted((ROOT / "toolkit").rglob("*.py")), 120),
], ids=["rlhf-and-trainers-80", "toolkit-120"])
def test_no_function_is_too_long(paths, limit):
    assert long_functions(paths, limit) == []
