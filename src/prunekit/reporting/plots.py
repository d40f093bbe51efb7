"""PNG plots of run folders (matplotlib, Agg backend — no display needed).

Every function takes :class:`prunekit.reporting.runs.RunRecord` objects (``prunekit.reporting.runs.load_runs``) and a
path, draws one figure of a fixed pixel size (``size`` in pixels, default :data:`DEFAULT_SIZE`; saved
without tight cropping so the size is exact) and returns the path.

* :func:`accuracy_vs_sparsity` — score against measured sparsity, one line per ``method/structure``,
  one panel per task, the dense score as a dotted line;
* :func:`layer_sparsity_heatmap` — layers × runs, colour = sparsity of that layer in that run;
* :func:`latency_vs_sparsity` — latency against sparsity (runs with a latency, and shared-weight levels);
* :func:`sensitivity_curves` — metric drop against sparsity, one line per layer (``prunekit sensitivity``).
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from prunekit.core.errors import RecipeError
from prunekit.reporting.tables import display_score

__all__ = ["DEFAULT_SIZE", "DPI", "accuracy_vs_sparsity", "layer_sparsity_heatmap", "latency_vs_sparsity",
           "sensitivity_curves"]

DPI = 100
DEFAULT_SIZE = (900, 600)   # pixels (width, height)


def _figure(size, ncols: int = 1):
    w, h = size
    fig, axes = plt.subplots(1, ncols, figsize=(w / DPI, h / DPI), dpi=DPI, squeeze=False)
    return fig, list(axes[0])


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")   # no bbox_inches="tight": keep the exact pixel size
    plt.close(fig)
    return path


def accuracy_vs_sparsity(runs, path, *, size=DEFAULT_SIZE) -> Path:
    """Score vs measured sparsity (%), one line per method/structure, one panel per task."""

    by_task: dict[tuple[str, str], list] = defaultdict(list)
    for r in runs:
        by_task[(r.task, r.metric)].append(r)
    fig, axes = _figure(size, ncols=len(by_task))
    for ax, ((task, metric), rs) in zip(axes, by_task.items()):
        lines: dict[str, list] = defaultdict(list)
        for r in rs:
            if r.levels:     # shared-weight run: one curve over its levels
                for lv in r.levels:
                    sp, sc = lv.get("sparsity", lv.get("target_sparsity")), lv.get("score", lv.get(metric))
                    if isinstance(sp, (int, float)) and isinstance(sc, (int, float)):
                        lines[f"{r.name} (levels)"].append((100 * sp, float(display_score(sc, r.kind))))
                continue
            lines[r.label].append((100 * r.sparsity, float(display_score(r.score, r.kind))))
        for label, pts in sorted(lines.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        dense = [float(display_score(r.dense_score, r.kind)) for r in rs if r.dense_score is not None]
        if dense:
            ax.axhline(float(np.mean(dense)), color="grey", linestyle=":", label="dense")
        ax.set_xlabel("sparsity of targeted weights (%)")
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("score vs sparsity")
    fig.tight_layout()
    return _save(fig, path)


def layer_sparsity_heatmap(runs, path, *, size=DEFAULT_SIZE) -> Path:
    """Heatmap of per-layer sparsity: rows = layers (union, model order of first appearance), columns = runs.
    A layer a run does not prune is drawn blank (NaN)."""
    layers: list[str] = []
    for r in runs:
        for row in r.layers:
            if row["name"] not in layers:
                layers.append(row["name"])
    if not layers:
        raise RecipeError("no per-layer rows in any results.json (key 'layers'); nothing to draw")
    grid = np.full((len(layers), len(runs)), np.nan)
    for j, r in enumerate(runs):
        for row in r.layers:
            grid[layers.index(row["name"]), j] = 100 * float(row["sparsity"])
    fig, (ax,) = _figure(size)
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", vmin=0, vmax=100,
                   interpolation="nearest")
    ax.set_yticks(range(len(layers)))
    fs = 8 if len(layers) <= 40 else max(3, int(320 / len(layers)))
    ax.set_yticklabels([n.removesuffix(".weight") for n in layers], fontsize=fs)
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels([r.name for r in runs], rotation=30, ha="right", fontsize=8)
    if len(layers) * len(runs) <= 120:
        for i in range(len(layers)):
            for j in range(len(runs)):
                if not math.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if grid[i, j] < 60 else "black")
    fig.colorbar(im, ax=ax, label="sparsity (%)")
    ax.set_title("per-layer sparsity")
    fig.tight_layout()
    return _save(fig, path)


def latency_vs_sparsity(runs, path, *, size=DEFAULT_SIZE) -> Path:
    """Latency (ms) against sparsity: one line per method/structure over runs that carry a latency, and one
    line per shared-weight run over its levels."""
    fig, (ax,) = _figure(size)
    lines: dict[str, list] = defaultdict(list)
    n = 0
    for r in runs:
        if r.latency_ms is not None:
            lines[r.label].append((100 * r.sparsity, r.latency_ms))
        pts = []
        for lv in r.levels:
            sp, lat = lv.get("sparsity", lv.get("target_sparsity")), lv.get("latency_ms")
            if lat is None and isinstance(lv.get("bench"), dict):
                lat = lv["bench"].get("latency_ms")
            if isinstance(sp, (int, float)) and isinstance(lat, (int, float)):
                pts.append((100 * sp, float(lat)))
        if pts:
            lines[f"{r.name} (levels)"] += pts
    for label, pts in sorted(lines.items()):
        pts.sort()
        n += len(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    if not n:
        plt.close(fig)
        raise RecipeError("no run has a latency (results.json latency_ms / bench / speed, or levels[].latency_ms)")
    ax.set_xlabel("sparsity of targeted weights (%)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("latency vs sparsity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def sensitivity_curves(curves: dict[str, list[tuple[float, float]]], path, *, metric: str = "metric",
                       size=DEFAULT_SIZE) -> Path:
    """``curves``: layer → [(sparsity, drop), ...]; one line per layer (drop = dense − pruned score)."""
    if not curves:
        raise RecipeError("no sensitivity curves to draw")
    fig, (ax,) = _figure(size)
    for name, pts in curves.items():
        pts = sorted(pts)
        ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], marker="o", label=name.removesuffix(".weight"))
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("sparsity of the layer (%)  — every other layer dense")
    ax.set_ylabel(f"{metric} drop (dense − pruned)")
    ax.set_title("per-layer pruning sensitivity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7 if len(curves) <= 12 else 5, ncol=1 if len(curves) <= 12 else 2)
    fig.tight_layout()
    return _save(fig, path)
