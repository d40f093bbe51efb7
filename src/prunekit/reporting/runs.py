"""Readable reports over many run folders: paper-style markdown tables.

A run folder written by ``prunekit run`` holds everything a report needs: ``results.json`` (scores,
sparsity, compression rate, per-layer table, optional latency and shared-weight ``levels``) and the
resolved ``recipe.yaml`` (task/data name, algorithm, structure).  :func:`load_run` reads both into a
:class:`RunRecord`; the table builders are pure functions of records.

Tables
------
* :func:`methods_tasks_table` — methods × tasks in the layout of the GLUE tables of the BERT-pruning
  papers: one column per task headed ``TASK (metric)``, one row per (method, structure, target
  sparsity) — the method tagged ``(global)`` / ``(per-layer)`` for global scope / per-layer overrides — a ``compression rate`` column (dense count / nonzero count, whole model) and, when every
  task of a row is present, the average.  The first row is the dense model (compression 1.00×).
  GLUE metrics are percentages in ``results.json`` (as the papers print them), like accuracy of image
  classification is already a percentage.
* :func:`levels_table` — a shared-weight run (``results.json`` with a ``levels`` list, see
  :mod:`prunekit.deploy.shared_weights`): one row per level with sparsity, score and latency.
* :func:`layers_markdown` — the per-layer table of one run (:func:`prunekit.reporting.tables.format_table`).
* :func:`summary_table` — one row per run: name, method, structure, task, sparsity, compression, score.

:func:`build_report` writes ``report.md`` and the PNG plots of :mod:`prunekit.reporting.plots` into a folder.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prunekit.core.errors import RecipeError
from prunekit.io.checkpoint import atomic_write_text
from prunekit.reporting import plots
from prunekit.reporting.tables import display_score, format_table

__all__ = ["LOWER_IS_BETTER", "RunRecord", "load_run", "load_runs", "methods_tasks_table", "levels_table", "layers_markdown",
           "summary_table", "build_report", "render_report", "display_score"]


@dataclass
class RunRecord:
    """The facts of one run folder that reports use (``results`` and ``recipe`` hold the raw dicts)."""

    path: Path
    name: str              # the run folder's name: how several runs of one recipe are told apart
    method: str            # algorithm name (oneshot, gradual, admm, ...)
    structure: str         # structure string of the recipe (unstructured, row, block:4x4, nm:2:4, ...)
    task: str              # data/task name (mnist, sst2, ...)
    kind: str              # recipe task kind: classification | glue
    metric: str
    score: float
    dense_score: float | None
    sparsity: float        # measured fraction of zeros over the targeted weights
    target_sparsity: float | None
    compression_rate: float | None
    latency_ms: float | None
    layers: list[dict] = field(default_factory=list)
    levels: list[dict] = field(default_factory=list)
    variant: str = ""      # "global" scope and/or "per-layer" overrides: keeps such runs on their own row
    results: dict = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)
    recipe_name: str = ""

    @property
    def method_label(self) -> str:
        return f"{self.method} ({self.variant})" if self.variant else self.method

    @property
    def label(self) -> str:
        """``method/structure`` — how a run is named in legends and table rows."""
        return f"{self.method_label}/{self.structure}"


def _need(res: dict, key: str, path: Path):
    if key not in res:
        raise RecipeError(f"{path}: results.json has no {key!r} (keys: {sorted(res)[:20]}); "
                         "is it a `prunekit run` output?")
    return res[key]


def find_latency(res: dict) -> float | None:
    """Latency in ms of a results dict: ``latency_ms`` at top level, or in a ``bench``/``speed`` section
    (a dict with ``latency_ms``, or a list of rows with ``latency_ms`` — the first one counts)."""
    v = res.get("latency_ms")
    if isinstance(v, (int, float)):
        return float(v)
    for key in ("bench", "speed"):
        sec = res.get(key)
        if isinstance(sec, dict) and isinstance(sec.get("latency_ms"), (int, float)):
            return float(sec["latency_ms"])
        if isinstance(sec, list):
            for row in sec:
                if isinstance(row, dict) and isinstance(row.get("latency_ms"), (int, float)):
                    return float(row["latency_ms"])
    return None


def load_run(run_dir: str | Path) -> RunRecord:
    """Read ``results.json`` and ``recipe.yaml`` of a run folder (clear errors when either is missing)."""
    d = Path(run_dir)
    rpath, cpath = d / "results.json", d / "recipe.yaml"
    if not d.is_dir():
        raise FileNotFoundError(f"run folder {d} does not exist")
    if not rpath.is_file():
        raise FileNotFoundError(f"{rpath} does not exist (is {d} a `prunekit run` output folder?)")
    if not cpath.is_file():
        raise FileNotFoundError(f"{cpath} does not exist: a run folder must hold the resolved recipe to be redrawn")
    try:
        res = json.loads(rpath.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RecipeError(f"{rpath} is not valid JSON: {e}") from None
    try:
        recipe = yaml.safe_load(cpath.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{cpath} is not valid YAML: {e}") from None
    if not isinstance(res, dict) or not isinstance(recipe, dict):
        raise RecipeError(f"{d}: results.json and recipe.yaml must both be mappings")
    levels = [lv for lv in (res.get("levels") or []) if isinstance(lv, dict)]
    if "score" not in res and levels:
        # a shared-weight run (prunekit.pipelines.shared.run_shared): headline = its sparsest level
        top = max(levels, key=lambda lv: float(lv.get("sparsity", lv.get("target_sparsity", 0.0)) or 0.0))
        res = {**res, "score": top.get("score"), "sparsity": top.get("sparsity", top.get("target_sparsity")),
               "target_sparsity": top.get("target_sparsity")}
    prune = recipe.get("prune") or {}
    algo = recipe.get("algorithm") or {}
    data = recipe.get("data") or {}
    return RunRecord(
        path=d,
        name=d.resolve().name,
        recipe_name=str(res.get("name") or recipe.get("name") or ""),
        method=str(res.get("algorithm") or algo.get("name") or "?"),
        structure=str(res.get("structure") or prune.get("structure") or "?"),
        task=str(data.get("name") or "?"),
        kind=str(recipe.get("task") or "classification"),
        metric=str(res.get("metric", "metric")),
        score=float(_need(res, "score", rpath)),
        dense_score=float(res["dense_score"]) if res.get("dense_score") is not None else None,
        sparsity=float(_need(res, "sparsity", rpath)),
        target_sparsity=(float(res["target_sparsity"]) if res.get("target_sparsity") is not None
                         else (float(prune["sparsity"]) if "sparsity" in prune else None)),
        compression_rate=float(res["compression_rate"]) if res.get("compression_rate") is not None else None,
        latency_ms=find_latency(res),
        layers=list(res.get("layers") or []),
        levels=list(res.get("levels") or []),
        variant=", ".join(v for v, on in (("global", prune.get("scope") == "global"),
                                          ("per-layer", bool(prune.get("overrides")))) if on),
        results=res,
        recipe=recipe,
    )


def load_runs(run_dirs) -> list[RunRecord]:
    runs = [load_run(d) for d in run_dirs]
    if not runs:
        raise RecipeError("no run folders given")
    return runs




def _fmt_cr(values: list[float | None]) -> str:
    vals = sorted({round(v, 2) for v in values if v is not None})
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.2f}×"
    return f"{vals[0]:.2f}–{vals[-1]:.2f}×"


_TASK_NAMES = {"sst2": "SST-2", "mrpc": "MRPC", "cola": "CoLA", "stsb": "STS-B", "qqp": "QQP", "mnli": "MNLI",
               "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI", "mnist": "MNIST", "cifar10": "CIFAR-10"}
_METRIC_NAMES = {"accuracy": "acc", "f1": "F1", "matthews_correlation": "MCC", "combined": "Pearson/Spearman",
                 "pearson": "Pearson", "spearmanr": "Spearman", "perplexity": "perplexity ↓"}
LOWER_IS_BETTER = ("perplexity",)   # metrics where less is better (causal LMs); every other one: more is better


def task_header(task: str, metric: str) -> str:
    key = task.lower().replace("-", "").replace("_", "")
    return f"{_TASK_NAMES.get(key, task)} ({_METRIC_NAMES.get(metric, metric)})"


def methods_tasks_table(runs: list[RunRecord], *, dense_row: bool = True, average: bool = True) -> str:
    """Markdown: rows = (method, structure, target sparsity), columns = tasks (``TASK (metric)``),
    plus ``sparsity`` and ``compression rate`` columns and an ``avg`` column.

    Two runs for the same row and task: the later one in ``runs`` wins (its cell is what is printed)."""
    tasks: dict[tuple[str, str], str] = {}
    for r in runs:
        tasks.setdefault((r.task, r.metric), r.kind)
    cols = list(tasks)
    rows: dict[tuple, dict] = {}
    for r in runs:
        ts = r.target_sparsity if r.target_sparsity is not None else round(r.sparsity, 3)
        key = (r.method_label, r.structure, ts)
        row = rows.setdefault(key, {"cells": {}, "cr": [], "sp": []})
        row["cells"][(r.task, r.metric)] = r.score
        row["cr"].append(r.compression_rate)
        row["sp"].append(r.sparsity)
    header = ["method", "structure", "sparsity", "compression rate"] + [task_header(t, m) for t, m in cols]
    show_avg = average and len(cols) > 1
    if show_avg:
        header.append("avg")
    lines = ["| " + " | ".join(header) + " |",
             "|" + "---|" * 2 + "---:|" * (len(header) - 2)]

    def add(cells: list[str], scores: dict):
        if show_avg:
            vals = [scores[c] for c in cols if c in scores]
            if len(vals) == len(cols) and all(not math.isnan(v) for v in vals):
                kinds = {tasks[c] for c in cols}
                # mixing percentage and fraction tasks: average the displayed numbers
                disp = [float(display_score(scores[c], tasks[c])) for c in cols]
                cells.append(f"{sum(disp) / len(disp):.2f}" if len(kinds) > 1 else
                             display_score(sum(vals) / len(vals), kinds.pop()))
            else:
                cells.append("–")
        lines.append("| " + " | ".join(cells) + " |")

    if dense_row:
        dense: dict = {}
        for r in runs:
            if r.dense_score is not None:
                dense.setdefault((r.task, r.metric), r.dense_score)
        if dense:
            add(["dense", "–", "0.00%", "1.00×"] + [display_score(dense.get(c), tasks[c]) for c in cols], dense)
    for (method, structure, _ts), row in rows.items():
        sp = sum(row["sp"]) / len(row["sp"])
        add([method, structure, f"{100 * sp:.2f}%", _fmt_cr(row["cr"])]
            + [display_score(row["cells"].get(c), tasks[c]) for c in cols], row["cells"])
    return "\n".join(lines)


def _level_value(level: dict, *keys):
    for k in keys:
        v = level.get(k)
        if isinstance(v, (int, float)):
            return float(v)
    return None


def levels_table(run: RunRecord) -> str:
    """Markdown: one row per shared-weight level — ``level | sparsity | <metric> | latency (ms)``.

    Each entry of ``results["levels"]`` is a mapping with ``sparsity`` (or ``target_sparsity``), the score
    (``score`` or the metric's own key) and optionally ``latency_ms`` and ``name``."""
    if not run.levels:
        raise RecipeError(f"{run.path}: results.json has no 'levels' list (not a shared-weight run)")
    lines = [f"| level | sparsity | {run.metric} | compression rate | latency (ms) |", "|---|---:|---:|---:|---:|"]
    for i, lv in enumerate(run.levels):
        if not isinstance(lv, dict):
            raise RecipeError(f"{run.path}: levels[{i}] is not a mapping: {lv!r}")
        sp = _level_value(lv, "sparsity", "target_sparsity")
        score = _level_value(lv, "score", run.metric)
        cr = _level_value(lv, "compression_rate")
        lat = _level_value(lv, "latency_ms")
        if lat is None and isinstance(lv.get("bench"), dict):
            lat = _level_value(lv["bench"], "latency_ms")
        lines.append(f"| {lv.get('name', lv.get('level', i))} | {'–' if sp is None else f'{100 * sp:.2f}%'} | "
                     f"{display_score(score, run.kind)} | {'–' if cr is None else f'{cr:.2f}×'} | "
                     f"{'–' if lat is None else f'{lat:.3f}'} |")
    return "\n".join(lines)


def layers_markdown(run: RunRecord) -> str:
    return format_table(run.layers, title=f"{run.name}: per-layer sparsity")


def summary_table(runs: list[RunRecord]) -> str:
    lines = ["| run | method | structure | task | sparsity | compression rate | score | dense | latency (ms) |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r.name} | {r.method_label} | {r.structure} | {r.task} | {100 * r.sparsity:.2f}% | "
                     f"{_fmt_cr([r.compression_rate])} | {display_score(r.score, r.kind)} | "
                     f"{display_score(r.dense_score, r.kind)} | "
                     f"{'–' if r.latency_ms is None else f'{r.latency_ms:.3f}'} |")
    return "\n".join(lines)


def render_report(runs: list[RunRecord], images: dict[str, str] | None = None) -> str:
    """The markdown of ``report.md`` (``images``: title → relative PNG path)."""
    parts = ["# prunekit report", "", f"{len(runs)} runs: " + ", ".join(f"`{r.path}`" for r in runs), "",
             "## Methods × tasks", "", methods_tasks_table(runs), "",
             "Scores: percentages (GLUE metrics and image classification accuracy), except perplexity per token "
             "(language models; lower is better). Compression rate = dense "
             "parameter count / nonzero parameter count (whole model).", "",
             "## Runs", "", summary_table(runs), ""]
    for r in runs:
        if r.levels:
            parts += [f"## Shared-weight levels: {r.name}", "", levels_table(r), ""]
    if images:
        parts += ["## Plots", ""]
        for title, rel in images.items():
            parts += [f"![{title}]({rel})", ""]
    return "\n".join(parts)


def build_report(run_dirs, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Load the runs, draw the plots and write ``report.md`` into ``out_dir`` (default: the first run's
    parent ``/report``).  Returns ``{"out": path, "markdown": text, "files": [paths]}``."""

    runs = load_runs(run_dirs)
    out = Path(out_dir) if out_dir is not None else runs[0].path.resolve().parent / "report"
    out.mkdir(parents=True, exist_ok=True)
    images: dict[str, str] = {}
    files: list[str] = []
    p = plots.accuracy_vs_sparsity(runs, out / "accuracy_vs_sparsity.png")
    images["score vs sparsity"] = p.name
    files.append(str(p))
    if any(r.layers for r in runs):
        p2 = plots.layer_sparsity_heatmap(runs, out / "layer_sparsity.png")
        images["per-layer sparsity"] = p2.name
        files.append(str(p2))
    if any(r.latency_ms is not None for r in runs) or any(
            _level_value(lv, "latency_ms") is not None for r in runs for lv in r.levels):
        p3 = plots.latency_vs_sparsity(runs, out / "latency_vs_sparsity.png")
        images["latency vs sparsity"] = p3.name
        files.append(str(p3))
    md = render_report(runs, images)
    atomic_write_text(out / "report.md", md + "\n")
    files.insert(0, str(out / "report.md"))
    return {"out": str(out), "markdown": md, "files": files}


def quant_markdown(q: dict) -> str:
    """The quantized artefact of a run (``results.json`` → ``quant``): the two compression figures, the byte
    breakdown and bits per weight per layer (docs/quantization.md)."""
    b = q.get("bytes", {})
    lines = [f"### quantized artefact ({q.get('artefact', 'model.pkq')}: {q['file_bytes']:,} bytes; "
             f"{q.get('scheme')}, {q.get('method')})", "",
             f"- weight data compression {q['weight_data_compression']:.1f}× (dense fp32 weight bytes "
             f"{q['dense_fp32_weight_bytes']:,} / codes + scales + positions); without positions "
             f"{q.get('weight_values_compression', float('nan')):.1f}×",
             f"- whole artefact compression {q['whole_artefact_compression']:.1f}× (fp32 state dict "
             f"{q['dense_fp32_bytes']:,} bytes / every byte of the file)",
             "- bytes: " + ", ".join(f"{k} {v:,}" for k, v in b.items()), "",
             "| layer | quantizer | kept / numel | positions | codes B | scales B | positions B | bits/weight | "
             "bits/kept weight | Shannon bound of codes B |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for layer in q.get("layers", []):
        lines.append(f"| {layer['name']} | {layer['quantizer']} | {layer['kept']:,} / {layer['numel']:,} | "
                     f"{layer['positions']} | {layer.get('codes_bytes', 0):,} | {layer.get('scales_bytes', 0):,} | "
                     f"{layer.get('positions_bytes', 0):,} | {layer['bits_per_weight']:.4f} | "
                     f"{layer['bits_per_kept_weight']:.2f} | {layer['shannon_code_bytes']:.1f} |")
    return "\n".join(lines) + "\n"
