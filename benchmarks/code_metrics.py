"""Code-shape figures of a prunekit source tree (the before/after of the architecture issue).

    python benchmarks/code_metrics.py [SRC]        # SRC default: src/prunekit

Prints: strongly connected groups of modules that import each other (lazy imports included), the number of
function-level imports of prunekit modules, the longest functions and the modules over 500 lines.  For the tree
before the restructuring: ``git worktree add /tmp/before 32df38e && python benchmarks/code_metrics.py
/tmp/before/src/prunekit``.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path


def modules(src: Path) -> dict[str, Path]:
    out = {}
    for p in src.rglob("*.py"):
        parts = p.relative_to(src.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _resolve(node: ast.ImportFrom, module: str, is_pkg: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(mods: dict[str, Path]) -> tuple[dict[str, set[str]], int]:
    graph: dict[str, set[str]] = {}
    lazy = 0
    for m, p in mods.items():
        tree = ast.parse(p.read_text())
        top = {id(n) for n in tree.body}
        edges: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = _resolve(node, m, p.name == "__init__.py")
                for a in node.names:
                    t = f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod
                    if t in mods and t != m and not (t + ".").startswith(m + "."):
                        edges.add(t)
                lazy += int(id(node) not in top and mod.startswith("prunekit"))
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in mods}
        graph[m] = edges
    return graph, lazy


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def main(src: Path) -> None:
    if not (src / "__init__.py").is_file():
        sys.exit(f"code_metrics: {src} is not a package folder (no __init__.py)")
    mods = modules(src)
    graph, lazy = import_graph(mods)
    funcs, big = [], []
    for p in src.rglob("*.py"):
        text = p.read_text()
        if len(text.splitlines()) > 500:
            big.append((len(text.splitlines()), str(p.relative_to(src))))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                funcs.append((node.end_lineno - node.lineno + 1, f"{p.relative_to(src)}:{node.name}"))
    funcs.sort(reverse=True)
    print(f"modules: {len(mods)}")
    print(f"import cycles (groups of modules): {[len(c) for c in cycles(graph)]}")
    print(f"function-level imports of prunekit modules: {lazy}")
    print(f"longest functions: {funcs[:3]}; over 80 lines: {sum(n > 80 for n, _ in funcs)}")
    print(f"modules over 500 lines: {sorted(big, reverse=True)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("src/prunekit"))
