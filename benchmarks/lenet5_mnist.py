"""LeNet-5 (ADMM-paper variant, 431k params) on MNIST: every pruning algorithm × structure.

Commands::

    python benchmarks/lenet5_mnist.py --quick            # a few minutes: 6k train / 2k test images, short phases
    python benchmarks/lenet5_mnist.py                    # full: 60k / 10k, dense 4 ep, search 2 ep, retrain 2 ep
    python benchmarks/lenet5_mnist.py --part unstructured --train-limit 20000 --dense-epochs 3 \\
        --search-epochs 1 --retrain-epochs 1              # any budget in between (all flags recorded)

Writes ``benchmarks/results/lenet5_mnist.json`` (``--out`` to change) after **every** run, so a run
stopped early leaves valid partial results.  Rows: ``method, structure, sparsity, compression_rate``
(whole model: all params / nonzero params), ``targeted_compression_rate`` (pruned layers only — the
number the ADMM papers quote), ``accuracy`` (after retraining), ``accuracy_after_hard_prune`` (before
retraining), ``seconds``; top level: ``dense_accuracy`` and the budget used.

* The dense model is trained ONCE (cached under ``benchmarks/results/cache/``, keyed by the budget) and
  every method starts from that checkpoint (``model.checkpoint``).
* Unstructured part: for each of oneshot, gradual, admm, admm_progressive, slr the targeted
  compression ladder (``--ladder``) is climbed until accuracy falls more than ``--tolerance`` (0.2)
  points below dense; ``best_within_tolerance`` reports the highest rate that stayed within it.
  Unstructured runs use the global scope (one magnitude ranking over all layers).
* Structured part: row, column, block:4x4, pattern, nm:2:4 at 2×, 4×, 10× (where the structure allows:
  nm:2:4 is exactly 2×) for each method, layer scope; the classifier ``fc2`` (10 output rows; excluded by module name) is not
  pruned there (row pruning it would delete classes).
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import tempfile
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from prunekit.checkpoint import atomic_write_json  # noqa: E402
from prunekit.config import parse_recipe  # noqa: E402
from prunekit.runner import run_pipeline  # noqa: E402

UNSTRUCTURED_METHODS = ["oneshot", "gradual", "admm", "admm_progressive", "slr"]
STRUCTURED_METHODS = ["oneshot", "gradual", "admm", "admm_progressive", "slr", "group_lasso"]
STRUCTURES = ["row", "column", "block:4x4", "pattern", "nm:2:4"]


def algorithm(method: str, sparsity: float, steps_per_epoch: int, search_epochs: float) -> dict:
    """Algorithm section of the recipe (hyper-parameters fixed across structures/rates)."""
    every = max(1, steps_per_epoch // 8)          # Z/U, multiplier and reweighting updates: 8 per epoch
    if method in ("oneshot", "gradual"):
        return {"name": method}
    if method == "admm":
        return {"name": "admm", "params": {"rho": 5e-3, "rho_growth": 1.8, "rho_max": 0.5, "update_every": every}}
    if method == "admm_progressive":
        # stages: halve the kept fraction towards the target (e.g. 0.9 → 0.95 → 0.98 …), at most 3 stages
        kept, ts = 1 - sparsity, []
        k = min(0.25, kept * 4)
        while k > kept * 1.01 and len(ts) < 2:
            ts.append(round(1 - k, 6))
            k /= 2
        ts = sorted(set(t for t in ts if t < sparsity)) + [sparsity]
        return {"name": "admm_progressive", "params": {"targets": ts, "rho": 5e-3, "rho_growth": 1.8,
                                                        "rho_max": 0.5, "update_every": every}}
    if method == "slr":
        return {"name": "slr", "params": {"rho": 1e-2, "rho_growth": 1.5, "rho_max": 0.5, "M": 300, "r": 0.1,
                                          "update_every": every}}
    if method == "group_lasso":
        return {"name": "group_lasso", "params": {"lam": 1e-5, "eps": 1e-3, "reweight_every": every}}
    raise ValueError(method)


def recipe(a, method, structure, sparsity, checkpoint, scope="layer", exclude=()) -> dict:
    steps = -(-min(a.train_limit or 60000, 60000) // a.batch_size)
    search_epochs = a.search_epochs * (1.5 if method == "admm_progressive" else 1.0)
    return {
        "name": f"lenet5-{method}-{structure}-{sparsity:.4f}", "seed": 0,
        "model": {"name": "lenet5", "checkpoint": checkpoint},
        "data": {"name": "mnist", "limit": a.train_limit, "eval_limit": a.eval_limit,
                 "batch_size": a.batch_size, "eval_batch_size": 1000},
        "prune": {"structure": structure, "sparsity": sparsity, "scope": scope,
                  "targets": {"include": ["*"], "exclude": list(exclude), "types": ["Linear", "Conv2d"]}},
        "algorithm": algorithm(method, sparsity, steps, search_epochs),
        "train": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "scheduler": "cosine", "epochs": a.dense_epochs},
        "search": {"epochs": search_epochs, "scheduler": "none" if method == "admm_progressive" else "cosine"},
        "retrain": {"epochs": a.retrain_epochs},
    }


def machine() -> dict:
    return {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small budget (a few minutes)")
    ap.add_argument("--part", choices=["all", "unstructured", "structured"], default="all")
    ap.add_argument("--methods", nargs="*", help="restrict methods")
    ap.add_argument("--structures", nargs="*", help="restrict structured part")
    ap.add_argument("--train-limit", type=int)
    ap.add_argument("--eval-limit", type=int)
    ap.add_argument("--dense-epochs", type=float)
    ap.add_argument("--search-epochs", type=float)
    ap.add_argument("--retrain-epochs", type=float)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--ladder", type=float, nargs="*", help="targeted compression rates to climb (unstructured)")
    ap.add_argument("--rates", type=float, nargs="*", default=[2, 4, 10], help="structured compression rates")
    ap.add_argument("--tolerance", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/lenet5_mnist.json"))
    a = ap.parse_args(argv)
    q = a.quick
    defaults = dict(train_limit=6000 if q else None, eval_limit=2000 if q else None, dense_epochs=2 if q else 4,
                    search_epochs=0.5 if q else 2, retrain_epochs=0.5 if q else 2,
                    ladder=[10, 50] if q else [10, 20, 50, 70, 100, 150, 200])
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    torch.set_num_threads(a.threads)
    import os
    os.environ.setdefault("PRUNEKIT_NO_PROGRESS", "1")

    work = ROOT / "benchmarks/results/cache" / f"lenet5_t{a.train_limit}_e{a.eval_limit}_d{a.dense_epochs}"
    out_path = Path(a.out)
    budget = {k: getattr(a, k) for k in ("train_limit", "eval_limit", "dense_epochs", "search_epochs",
                                         "retrain_epochs", "batch_size", "tolerance")}
    budget["note"] = ("train_limit/eval_limit None = full MNIST (60k/10k); admm_progressive searches 1.5× "
                      "search_epochs; optimizer Adam lr 1e-3 cosine in every phase")
    res = {"command": "python " + " ".join(shlex.quote(x) for x in [sys.argv[0], *(argv or sys.argv[1:])]),
           "machine": machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "budget": budget, "rows": [], "best_within_tolerance": {}}
    if out_path.exists():  # keep rows of other parts measured with the same budget
        try:
            old = json.loads(out_path.read_text())
            if old.get("budget") == budget:
                res["rows"] = old.get("rows", [])   # same budget: earlier parts/rates are kept
                res["best_within_tolerance"] = old.get("best_within_tolerance", {})
                res["commands"] = old.get("commands", [old.get("command")]) + [res["command"]]
        except (ValueError, OSError):
            pass

    def log(msg):
        print(msg, flush=True)

    # dense once ---------------------------------------------------------------------------------
    dense_dir = work / "dense"
    if not (dense_dir / "results.json").exists():
        r = parse_recipe(recipe(a, "oneshot", "unstructured", 0.5, None) | {"retrain": {"epochs": 0}})
        r.model.checkpoint = None
        t0 = time.perf_counter()
        out = run_pipeline(r, work / "dense_run", log=lambda *_: None)
        import shutil
        shutil.copytree(work / "dense_run" / "dense", dense_dir, dirs_exist_ok=True)
        atomic_write_json(dense_dir / "results.json", {"accuracy": out["dense_score"], "seconds": time.perf_counter() - t0})
    dense = json.loads((dense_dir / "results.json").read_text())
    res["dense_accuracy"] = dense["accuracy"]
    res["dense_seconds"] = dense["seconds"]
    log(f"dense accuracy {dense['accuracy']:.2f}  ({dense['seconds']:.0f}s)")

    def run(method, structure, sparsity, part, scope="layer", exclude=()):
        rd = recipe(a, method, structure, sparsity, str(dense_dir), scope, exclude)
        t0 = time.perf_counter()
        run_dir = Path(tempfile.gettempdir()) / "prunekit_lenet5_runs" / rd["name"]   # checkpoints stay out of the repo
        out = run_pipeline(parse_recipe(rd), run_dir, log=lambda *_: None)
        row = {"part": part, "method": method, "structure": structure, "scope": scope,
               "sparsity": round(out["sparsity"], 6), "target_sparsity": sparsity,
               "compression_rate": round(out["compression_rate"], 3),
               "targeted_compression_rate": round(out["targeted_compression_rate"], 3),
               "accuracy": out["score"], "accuracy_after_hard_prune": out["score_after_hard_prune"],
               "accuracy_drop": round(dense["accuracy"] - out["score"], 3),
               "seconds": round(time.perf_counter() - t0, 2)}
        key = ("part", "method", "structure", "target_sparsity")
        res["rows"] = [r for r in res["rows"] if any(r.get(k) != row[k] for k in key)] + [row]
        atomic_write_json(out_path, res)
        log(json.dumps(row))
        return row

    methods = a.methods
    if a.part in ("all", "unstructured"):
        for m in [x for x in UNSTRUCTURED_METHODS if not methods or x in methods]:
            best = None
            for rate in a.ladder:
                row = run(m, "unstructured", round(1 - 1 / rate, 6), "unstructured", scope="global")
                if row["accuracy_drop"] <= a.tolerance:
                    best = row
                else:
                    break
            res["best_within_tolerance"][m] = (
                {k: best[k] for k in ("targeted_compression_rate", "compression_rate", "accuracy", "accuracy_after_hard_prune")}
                if best else None)
            atomic_write_json(out_path, res)
    if a.part in ("all", "structured"):
        for st in [s for s in STRUCTURES if not a.structures or s in a.structures]:
            for rate in a.rates:
                if st.startswith("nm:") and rate != 2:
                    continue
                for m in [x for x in STRUCTURED_METHODS if not methods or x in methods]:
                    run(m, st, round(1 - 1 / rate, 6), "structured", exclude=["fc2"])
    res["seconds_total"] = sum(r["seconds"] for r in res["rows"])
    atomic_write_json(out_path, res)
    return res


if __name__ == "__main__":
    main()
