"""LeNet-5 (ADMM-paper variant, 431k params) on MNIST: every pruning algorithm × structure.

Commands (the ones behind ``benchmarks/results/lenet5_mnist.json``; 1 thread, run one after another;
the JSON's ``commands`` lists every invocation in order)::

    # unstructured, full MNIST (60k train / 10k test), per-layer ADMM-paper budget, 1 + 1 epochs;
    # one invocation per (method, rate) — the ladder is climbed (or descended after a first failure)
    # one rung at a time, e.g.
    python benchmarks/lenet5_mnist.py --part unstructured --methods admm --ladder 70
    python benchmarks/lenet5_mnist.py --part unstructured --methods admm_progressive --ladder 150
    python benchmarks/lenet5_mnist.py --part unstructured --methods oneshot gradual --ladder 20 50 100
    # structured grid, modest budget (5k train / 2k test images, 0.5 + 0.5 epochs):
    python benchmarks/lenet5_mnist.py --part structured --train-limit 5000 --eval-limit 2000 \
        --search-epochs 0.5 --retrain-epochs 0.5

    python benchmarks/lenet5_mnist.py --quick          # smoke test: 6k / 2k images, short phases

Every phase runs through prunekit's own ``run_pipeline`` on a recipe built by :func:`recipe` (each run's
resolved ``recipe.yaml`` and ``results.json`` land in ``$TMPDIR/prunekit_lenet5_runs/<name>/``), so
each row is reproducible with ``prunekit run``.  Budget (defaults):

* dense: trained ONCE on full MNIST, SGD momentum 0.9, lr 0.05 cosine, weight decay 5e-4,
  ``--dense-epochs`` 3, batch 128; cached in ``benchmarks/results/cache/`` and loaded by every run
  (``model.checkpoint``);
* search (ADMM, progressive ADMM, SLR, gradual, group lasso): Adam lr 1e-3, constant, ``--search-epochs``
  (progressive ADMM: ×1.5, split into equal stages); retrain: Adam lr 1e-3 cosine, ``--retrain-epochs``;
* ADMM family: 16 Z/U (multiplier) updates per epoch (progressive: 16 per stage), ρ = 1e-3 × 1.6 per
  update up to 1;
* unstructured part: per-layer budget (``prune.overrides``, layer scope) — see :func:`layer_budget`;
  the ladder (``--ladder``, targeted compression rates) is climbed per method until accuracy falls more
  than ``--tolerance`` (0.2) points below dense;
* structured part: row, column, block:4x4, pattern, nm:2:4 at 2×, 4×, 10× (nm:2:4: 2× only) for each
  method, layer scope, classifier ``fc2`` excluded (row-pruning it would delete classes).

Writes ``benchmarks/results/lenet5_mnist.json`` (``--out``) after **every** run.  Rows: ``method,
structure, sparsity`` (targeted layers), ``layer_density`` (kept fraction per layer), ``compression_rate`` (whole model: all weights / nonzero),
``targeted_compression_rate`` (pruned layers only — the number the ADMM papers quote), ``accuracy``
(after retraining), ``accuracy_after_hard_prune`` (before retraining), ``seconds``, plus the row's
budget.  Rows of earlier invocations are kept when they used the same dense model.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from prunekit.io.checkpoint import atomic_write_json  # noqa: E402
from prunekit.pipelines.recipe import parse_recipe  # noqa: E402
from prunekit.pipelines.runner import run_pipeline  # noqa: E402

UNSTRUCTURED_METHODS = ["oneshot", "gradual", "admm", "admm_progressive", "slr"]
STRUCTURED_METHODS = ["oneshot", "gradual", "admm", "admm_progressive", "slr", "group_lasso"]
STRUCTURES = ["row", "column", "block:4x4", "pattern", "nm:2:4"]
LAYER_SIZES = {"conv1": 500, "conv2": 25_000, "fc1": 400_000, "fc2": 5_000}   # LeNet-5 weights (targets)
UPDATES_PER_EPOCH = 16


def layer_budget(rate: float) -> dict[str, float]:
    """Per-layer sparsities for a targeted compression ``rate`` (all four weight tensors together keep
    430,500 / rate weights), in the spirit of the ADMM papers' LeNet-5 tables: the small, sensitive
    layers keep more — conv1 keeps min(60 %, 30/rate), conv2 min(50 %, 4/rate), fc2 min(60 %, 8/rate)
    — and fc1 (93 % of the weights) takes the rest.  E.g. 150×: conv1 20 %, conv2 2.7 %, fc2 5.3 %,
    fc1 0.46 % kept."""
    total = sum(LAYER_SIZES.values())
    keep = {"conv1": min(0.6, 30 / rate), "conv2": min(0.5, 4 / rate), "fc2": min(0.6, 8 / rate)}
    rest = total / rate - sum(keep[k] * LAYER_SIZES[k] for k in keep)
    if rest <= 0:
        raise ValueError(f"compression rate {rate} too high for the per-layer budget")
    keep["fc1"] = rest / LAYER_SIZES["fc1"]
    return {k: round(1 - v, 6) for k, v in keep.items()}


def algorithm(method: str, sparsity: float, steps_per_epoch: int, search_epochs: float,
              n_stages: int = 1) -> dict:
    """Algorithm section of the recipe (hyper-parameters fixed across structures/rates)."""
    every = max(1, steps_per_epoch // UPDATES_PER_EPOCH)
    rho = {"rho": 1e-3, "rho_growth": 1.6, "rho_max": 1.0}
    if method in ("oneshot", "gradual"):
        return {"name": method}
    if method == "admm":
        return {"name": "admm", "params": {**rho, "update_every": every}}
    if method == "admm_progressive":
        kept, ts = 1 - sparsity, []
        k = min(0.25, kept * 8)          # stages: keep 8×, 3× (roughly) the final count, then the target
        for f in (8.0, 3.0):
            k = min(0.25, kept * f)
            if 1 - k < sparsity:
                ts.append(round(1 - k, 6))
        ts = sorted(set(ts)) + [sparsity]
        stage_steps = steps_per_epoch * search_epochs / len(ts)
        return {"name": "admm_progressive",
                "params": {"targets": ts, **rho, "update_every": max(1, int(stage_steps // UPDATES_PER_EPOCH))}}
    if method == "slr":
        return {"name": "slr", "params": {**rho, "M": 300, "r": 0.1, "update_every": every}}
    if method == "group_lasso":
        return {"name": "group_lasso", "params": {"lam": 1e-5, "eps": 1e-3, "reweight_every": every}}
    raise ValueError(method)


def recipe(a, method, structure, rate, checkpoint, exclude=(), per_layer=False) -> dict:
    steps = -(-min(a.train_limit or 60000, 60000) // a.batch_size)
    search_epochs = a.search_epochs * (1.5 if method == "admm_progressive" else 1.0)
    sparsity = round(1 - 1 / rate, 6)
    overrides = {}
    if per_layer:
        b = layer_budget(rate)
        sparsity = b.pop("fc1")          # prune.sparsity = fc1's; the other layers via overrides
        overrides = b
    return {
        "name": f"lenet5-{method}-{structure.replace(':', '')}-{rate:g}x", "seed": 0,
        "model": {"name": "lenet5", "checkpoint": checkpoint},
        "data": {"name": "mnist", "limit": a.train_limit, "eval_limit": a.eval_limit,
                 "batch_size": a.batch_size, "eval_batch_size": 1000},
        "prune": {"structure": structure, "sparsity": sparsity, "scope": "layer", "overrides": overrides,
                  "targets": {"include": ["*"], "exclude": list(exclude), "types": ["Linear", "Conv2d"]}},
        "algorithm": algorithm(method, sparsity, steps, search_epochs),
        "train": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "scheduler": "cosine", "epochs": 1},
        "dense": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "epochs": a.dense_epochs},
        "search": {"epochs": search_epochs, "scheduler": "none"},
        "retrain": {"epochs": a.retrain_epochs},
    }


def dense_accuracy_on(a, dense_dir) -> float:
    """Accuracy of the cached dense model on this invocation's eval set (``--eval-limit`` images):
    the reference for ``accuracy_drop`` when the eval set is not the full 10k test set."""
    from prunekit.io.checkpoint import load_checkpoint  # noqa: PLC0415
    from prunekit.pipelines.workloads import build_workload  # noqa: PLC0415
    wl = build_workload(parse_recipe(recipe(a, "oneshot", "unstructured", 2, None)))
    load_checkpoint(dense_dir, wl.model)
    return wl.task.evaluate(wl.model, wl.eval_loader)[wl.task.metric]


def machine() -> dict:
    return {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke-test budget (a few minutes)")
    ap.add_argument("--part", choices=["all", "unstructured", "structured"], default="all")
    ap.add_argument("--methods", nargs="*", help="restrict methods")
    ap.add_argument("--structures", nargs="*", help="restrict structured part")
    ap.add_argument("--train-limit", type=int, help="train images for the pruning phases (default: all 60k)")
    ap.add_argument("--eval-limit", type=int, help="test images (default: all 10k)")
    ap.add_argument("--dense-epochs", type=float)
    ap.add_argument("--search-epochs", type=float)
    ap.add_argument("--retrain-epochs", type=float)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--ladder", type=float, nargs="*", help="targeted compression rates to climb (unstructured)")
    ap.add_argument("--rates", type=float, nargs="*", default=[2, 4, 10], help="structured compression rates")
    ap.add_argument("--global-scope", action="store_true", help="unstructured: one global ranking instead of "
                                                                 "the per-layer budget")
    ap.add_argument("--tolerance", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/lenet5_mnist.json"))
    a = ap.parse_args(argv)
    q = a.quick
    defaults = dict(train_limit=6000 if q else None, eval_limit=2000 if q else None, dense_epochs=2 if q else 3,
                    search_epochs=0.5 if q else 1, retrain_epochs=0.5 if q else 1,
                    ladder=[10, 50] if q else [70, 150, 250])
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    torch.set_num_threads(a.threads)
    os.environ.setdefault("PRUNEKIT_NO_PROGRESS", "1")

    dense_key = f"lenet5_sgd_t{a.train_limit if q else 'all'}_d{a.dense_epochs}"
    work = ROOT / "benchmarks/results/cache" / dense_key
    out_path = Path(a.out)
    cmd = "python " + " ".join(shlex.quote(x) for x in ["benchmarks/lenet5_mnist.py", *(argv or sys.argv[1:])])
    res = {"command": cmd, "commands": [cmd], "machine": machine(),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "dense_key": dense_key,
           "budget_note": ("per row: train_images (None = all 60k), eval_images (None = all 10k), search/retrain "
                           "epochs; dense: full MNIST, SGD m0.9 lr 0.05 cosine wd 5e-4; search Adam 1e-3 constant "
                           "(progressive ADMM 1.5× search epochs); retrain Adam 1e-3 cosine; batch 128; 1 thread; "
                           "ADMM/SLR 16 updates per epoch (progressive: per stage), rho 1e-3 ×1.6 per update, max 1"),
           "rows": [], "best_within_tolerance": {}}
    if out_path.exists():  # keep rows of earlier invocations on the same dense model
        try:
            old = json.loads(out_path.read_text())
            if old.get("dense_key") == dense_key:
                res["rows"] = old.get("rows", [])
                res["best_within_tolerance"] = old.get("best_within_tolerance", {})
                res["commands"] = old.get("commands", []) + [cmd]
        except (ValueError, OSError):
            pass

    def log(msg):
        print(msg, flush=True)

    # dense once ---------------------------------------------------------------------------------
    dense_dir = work / "dense"
    if not (dense_dir / "results.json").exists():
        d = recipe(a, "oneshot", "unstructured", 2, None) | {"retrain": {"epochs": 0}}
        d["data"] = d["data"] | ({"limit": None, "eval_limit": None} if not q else {})
        t0 = time.perf_counter()
        out = run_pipeline(parse_recipe(d), work / "dense_run", log=lambda *_: None)
        shutil.copytree(work / "dense_run" / "dense", dense_dir, dirs_exist_ok=True)
        atomic_write_json(dense_dir / "results.json", {"accuracy": out["dense_score"],
                                                       "seconds": time.perf_counter() - t0,
                                                       "history": out["history"].get("dense")})
    dense = json.loads((dense_dir / "results.json").read_text())
    res["dense_accuracy"] = dense["accuracy"]
    res["dense_seconds"] = round(dense["seconds"], 1)
    res["dense_budget"] = {"train_images": a.train_limit if q else None, "epochs": a.dense_epochs,
                           "optimizer": "sgd m0.9 lr0.05 cosine wd5e-4", "batch_size": a.batch_size, "threads": a.threads}
    log(f"dense accuracy {dense['accuracy']:.2f}  ({dense['seconds']:.0f}s)")

    ref = dense["accuracy"] if a.eval_limit is None else dense_accuracy_on(a, dense_dir)
    res.setdefault("dense_accuracy_by_eval_images", {})[str(a.eval_limit or "all")] = ref

    def run(method, structure, rate, part, exclude=(), per_layer=False):
        rd = recipe(a, method, structure, rate, str(dense_dir), exclude, per_layer)
        t0 = time.perf_counter()
        run_dir = Path(tempfile.gettempdir()) / "prunekit_lenet5_runs" / rd["name"]   # checkpoints stay out of the repo
        shutil.rmtree(run_dir, ignore_errors=True)
        out = run_pipeline(parse_recipe(rd), run_dir, log=lambda *_: None)
        layers = {l["name"]: round(l["nonzeros"] / l["numel"], 5) for l in out.get("layers", [])}
        row = {"part": part, "method": method, "structure": structure, "rate": rate,
               "scope": "layer+overrides" if per_layer else "layer",
               "sparsity": round(out["sparsity"], 6), "compression_rate": round(out["compression_rate"], 3),
               "targeted_compression_rate": round(out["targeted_compression_rate"], 3),
               "accuracy": out["score"], "accuracy_after_hard_prune": out["score_after_hard_prune"],
               "dense_accuracy_same_eval": ref, "accuracy_drop": round(ref - out["score"], 3),
               "seconds": round(time.perf_counter() - t0, 1),
               "train_images": a.train_limit, "eval_images": a.eval_limit,
               "search_epochs": a.search_epochs * (1.5 if method == "admm_progressive" else 1) if method != "oneshot" else 0,
               "retrain_epochs": a.retrain_epochs, "layer_density": layers,
               "algorithm_params": rd["algorithm"].get("params", {})}
        key = ("part", "method", "structure", "rate", "train_images", "search_epochs", "retrain_epochs")
        res["rows"] = [r for r in res["rows"] if any(r.get(k) != row[k] for k in key)] + [row]
        atomic_write_json(out_path, res)
        log(json.dumps({k: v for k, v in row.items() if k not in ("layer_density", "algorithm_params")}))
        return row

    methods = a.methods
    if a.part in ("all", "unstructured"):
        for m in [x for x in UNSTRUCTURED_METHODS if not methods or x in methods]:
            best = None
            for rate in a.ladder:
                row = run(m, "unstructured", rate, "unstructured", per_layer=not a.global_scope)
                if row["accuracy_drop"] <= a.tolerance:
                    best = row
                else:
                    break
            prev = res["best_within_tolerance"].get(m)
            if best is not None and (prev is None or best["rate"] >= prev.get("rate", 0)):
                res["best_within_tolerance"][m] = {k: best[k] for k in (
                    "rate", "targeted_compression_rate", "compression_rate", "accuracy", "accuracy_after_hard_prune",
                    "search_epochs", "retrain_epochs")}
            elif best is None and prev is None:
                res["best_within_tolerance"][m] = None
            atomic_write_json(out_path, res)
    if a.part in ("all", "structured"):
        for st in [s for s in STRUCTURES if not a.structures or s in a.structures]:
            for rate in a.rates:
                if st.startswith("nm:") and rate != 2:
                    continue
                for m in [x for x in STRUCTURED_METHODS if not methods or x in methods]:
                    run(m, st, rate, "structured", exclude=["fc2"])
    res["seconds_total"] = round(sum(r["seconds"] for r in res["rows"]), 1)
    atomic_write_json(out_path, res)
    return res


if __name__ == "__main__":
    main()
