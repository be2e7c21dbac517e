"""Read dpo_lean's imports and definitions (ast): import cycles, long modules, long functions.

    python tools/structure.py          # prints what is over the limits; exit 1 if anything is

Imports inside functions count: a deferred import is still a dependency, so it can still close a cycle.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dpo_lean"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


@dataclass(frozen=True)
class Module:
    name: str  # dotted, e.g. dpo_lean.data.tokenize
    path: Path
    tree: ast.Module
    lines: int


def modules(package: Path = PACKAGE) -> dict[str, Module]:
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        text = path.read_text(encoding="utf-8")
        out[name] = Module(name, path, ast.parse(text), len(text.splitlines()))
    return out


def _resolve(module: Module, node: ast.ImportFrom | ast.Import, known: set[str]) -> set[str]:
    """The package modules an import statement names (``from . import x`` names module x if it is one)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in known}
    base = module.name.split(".")
    if module.path.name != "__init__.py":
        base = base[:-1]
    if node.level:
        base = base[:len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    found = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known}
    return found | ({target} if target in known else set())


def import_graph(mods: dict[str, Module]) -> dict[str, set[str]]:
    known = set(mods)
    graph = {}
    for name, module in mods.items():
        edges = set()
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                edges |= _resolve(module, node, known)
        # a package's own submodules importing the package's __init__ is not a cycle worth reporting
        graph[name] = {e for e in edges if e != name and not name.startswith(e + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def long_functions(mods: dict[str, Module], limit: int = MAX_FUNCTION_LINES) -> dict[str, int]:
    """``module:qualname`` -> lines, for every function or method longer than ``limit`` (decorators excluded)."""
    out = {}

    def walk(node, where: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                qual = f"{where}{child.name}"
                if not isinstance(child, ast.ClassDef) and child.end_lineno - child.lineno + 1 > limit:
                    out[qual] = child.end_lineno - child.lineno + 1
                walk(child, qual + ".")

    for name, module in mods.items():
        walk(module.tree, f"{name}:")
    return out


def long_modules(mods: dict[str, Module], limit: int = MAX_MODULE_LINES) -> dict[str, int]:
    return {name: m.lines for name, m in mods.items() if m.lines > limit}


def main() -> int:
    mods = modules()
    problems = [f"import cycle: {' <-> '.join(c)}" for c in cycles(import_graph(mods))]
    problems += [f"module {n}: {k} lines (limit {MAX_MODULE_LINES})" for n, k in long_modules(mods).items()]
    problems += [f"function {n}: {k} lines (limit {MAX_FUNCTION_LINES})" for n, k in long_functions(mods).items()]
    print("\n".join(problems) or "no import cycle, no module or function over the limits")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
