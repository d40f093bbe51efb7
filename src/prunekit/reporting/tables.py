"""Plain-text tables."""
from __future__ import annotations

import math


def format_table(layers: list[dict], title: str | None = None) -> str:
    """Markdown table of per-layer rows (dicts with name, shape, structure, sparsity, nonzeros)."""
    lines = []
    if title:
        lines.append(f"### {title}\n")
    lines.append("| layer | shape | structure | sparsity | nonzeros |")
    lines.append("|---|---|---|---:|---:|")
    for r in layers:
        shape = "×".join(str(s) for s in r["shape"])
        nz = r.get("nonzeros", "")
        lines.append(f"| {r['name']} | {shape} | {r.get('structure', '')} | {100 * r['sparsity']:.2f}% | {nz} |")
    return "\n".join(lines)


def display_score(value: float | None, kind: str) -> str:
    """A score as the papers print it: every metric is a percentage (GLUE too), 2 decimals."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.2f}"
