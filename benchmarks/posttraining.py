"""Post-training pruning benchmark: magnitude vs Wanda vs SparseGPT (and OBS-structured heads/neurons),
no retraining, from calibration samples of the training set.

    python benchmarks/posttraining.py --part lenet            # LeNet-5 / MNIST at 50, 80, 90 % unstructured
    python benchmarks/posttraining.py --part minilm --tasks sst2
    python benchmarks/posttraining.py --part decoder          # small GPT-2 LM on SST-2 sentences, perplexity
    python benchmarks/posttraining.py --part minilm_retrain --tasks sst2 --retrain-limit 2000
                                                              # + 1 epoch of hard-pruned retraining
    python benchmarks/posttraining.py --part resnet           # ResNet-18 on the 200-image CIFAR-10 sample

Dense models are trained once through ``run_pipeline`` (the dense phase of a recipe, ``retrain.epochs=0``)
and cached outside git under ``--cache`` (default ``$PRUNEKIT_PTQ_CACHE`` or ``~/.cache/prunekit_ptq``);
MiniLM uses ``recipes/glue_<task>_bench.yaml`` (SST-2: 8000-sentence subset, 2 epochs; the same dense budget as
``benchmarks/glue_minilm.py``).  Every row prunes a fresh copy of the dense model, at 1 thread:
``seconds`` = mask computation incl. calibration forwards (retraining rows: + the retraining epoch);
``peak_mb`` = the process's peak resident memory so far (``ru_maxrss``; an upper bound for the row).  Rows are
merged into ``--out`` by ``(model, task, method, structure, sparsity, retrain_epochs, tool)``.  Calibration:
``--samples`` training examples (seed 0), the recipe section :class:`~prunekit.algorithms.calibration.CalibrationConfig`.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from prunekit.algorithms.base import get_algorithm_class
from prunekit.algorithms.calibration import CalibrationConfig
from prunekit.core.plan import PruneSpec, compute_masks
from prunekit.core.targets import TargetSpec
from prunekit.graph.families import head_neuron_masks
from prunekit.io.checkpoint import atomic_write_json, load_checkpoint
from prunekit.pipelines.recipe import from_dict, load_recipe, parse_recipe
from prunekit.pipelines.runner import build_workload, machine_info, run_pipeline
from prunekit.training.loop import fit

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "posttraining.json"


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def dense_recipe(recipe, cache: Path, label: str):
    """The recipe's dense model, trained once into ``cache/label`` (then loaded by ``model.checkpoint``)."""
    d = cache / label
    if not (d / "dense" / "manifest.json").is_file():
        run_pipeline(copy.deepcopy(recipe), d, log=print)     # recipes here have retrain.epochs=0
    recipe.model.checkpoint = str(d / "dense")
    return recipe


def workload(recipe):
    torch.manual_seed(recipe.seed)
    wl = build_workload(recipe)
    load_checkpoint(recipe.model.checkpoint, wl.model)
    return wl


def prune_copy(wl, method: str, spec: PruneSpec, calib: CalibrationConfig, params: dict | None = None):
    """``(model, masks, seconds)``: a pruned copy of the workload's model."""
    model = copy.deepcopy(wl.model)
    t0 = time.perf_counter()
    if method == "magnitude":
        masks = compute_masks(model, spec)
    elif method == "magnitude_heads_neurons":
        masks = head_neuron_masks(model, spec.sparsity, spec.sparsity, "l2")
    else:
        cls = get_algorithm_class(method)
        algo = cls(from_dict(cls.Params, params or {}, "algorithm.params"), spec)
        algo.calibration_loader = wl.train_loader
        algo.calibration = calib
        masks = algo.final_masks(model)
    masks.apply(model)
    return model, masks, time.perf_counter() - t0


def row(model_name, task, method, structure, sparsity, score, dense, seconds, retrain_epochs=0, **extra) -> dict:
    return {"model": model_name, "task": task, "method": method, "structure": structure, "sparsity": sparsity,
            "retrain_epochs": retrain_epochs, "score": score, "dense_score": dense, "seconds": round(seconds, 2),
            "peak_mb": round(peak_mb(), 1), "tool": "prunekit", **extra}


def _key(r: dict) -> tuple:
    return (r["model"], r["task"], r["method"], r["structure"], r["sparsity"], float(r["retrain_epochs"]), r["tool"])


def save(out: Path, rows: list[dict], meta: dict) -> None:
    data = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    new = {_key(r) for r in rows}
    data["rows"] = [r for r in data.get("rows", []) if _key(r) not in new] + rows
    data.setdefault("commands", [])
    if meta["command"] not in data["commands"]:
        data["commands"].append(meta["command"])
    data.update(meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, data)


def run_grid(wl, model_name, task, grid, metric, flush, calib, retrain=None) -> list[dict]:
    """One row per ``(method, structure, sparsity, targets)``; ``retrain = (train_loader, TrainConfig)`` adds
    hard-pruned retraining (the score after the last epoch; no best-epoch selection)."""
    dense = wl.task.evaluate(wl.model, wl.eval_loader)[metric]
    print(f"{model_name} {task} dense {metric} = {dense:.4f}", flush=True)
    rows = []
    for method, structure, sparsity, targets in grid:
        if METHODS and method not in METHODS:
            continue
        spec = PruneSpec("unstructured" if structure == "heads+neurons" else structure, sparsity, targets=targets)
        model, masks, secs = prune_copy(wl, method, spec, calib)
        extra = {}
        if retrain is not None:
            extra["score_before_retrain"] = wl.task.evaluate(model, wl.eval_loader)[metric]
            t0 = time.perf_counter()
            fit(model, wl.task, retrain[0], None, retrain[1], masks=masks, desc="retrain")
            extra["retrain_seconds"] = round(time.perf_counter() - t0, 2)
        score = wl.task.evaluate(model, wl.eval_loader)[metric]
        rows.append(row(model_name, task, method, structure, sparsity, score, dense, secs,
                        retrain_epochs=retrain[1].epochs if retrain else 0,
                        measured_sparsity=round(masks.sparsity(), 4), calibration_samples=calib.samples,
                        **extra))
        print(json.dumps(rows[-1]), flush=True)
        flush(rows)
    return rows


def part_lenet(a, flush) -> list[dict]:
    r = parse_recipe({"name": "lenet5-ptq-dense", "seed": 0, "model": {"name": "lenet5"},
                      "data": {"name": "mnist", "batch_size": 128, "eval_batch_size": 1000},
                      "prune": {"structure": "unstructured", "sparsity": 0.0}, "algorithm": {"name": "oneshot"},
                      "train": {"optimizer": "adam", "lr": 1e-3, "epochs": 1, "scheduler": "cosine"},
                      "dense": {"epochs": 2}, "retrain": {"epochs": 0}})
    wl = workload(dense_recipe(r, a.cache, "lenet5_mnist"))
    t = TargetSpec()
    grid = [(m, "unstructured", s, t) for s in (0.5, 0.8, 0.9) for m in ("magnitude", "wanda", "sparsegpt")]
    return run_grid(wl, "lenet5", "mnist", grid, "accuracy", flush, CalibrationConfig(a.samples, 64, None))


def minilm_dense_recipe(a, task: str):
    """The task's bench recipe as a dense-only run (``--dense-epochs`` overrides its dense budget)."""
    over = ["prune.sparsity=0.0", "retrain.epochs=0"]
    if a.dense_epochs is not None:
        over.append(f"dense.epochs={a.dense_epochs}")
    r = load_recipe(ROOT / "recipes" / f"glue_{task}_bench.yaml", over)
    return r, f"minilm_{task}" + (f"_e{a.dense_epochs}" if a.dense_epochs is not None else "")


def part_minilm(a, flush) -> list[dict]:
    rows = []
    for task in a.tasks:
        r, label = minilm_dense_recipe(a, task)
        wl = workload(dense_recipe(r, a.cache, label))
        t = TargetSpec(list(r.prune.targets.include), [], ["Linear"])
        grid = [(m, st, 0.5, t) for st in ("unstructured", "nm:2:4") for m in ("magnitude", "wanda", "sparsegpt")]
        grid += [("magnitude_heads_neurons", "heads+neurons", 0.3, t), ("obs_structured", "heads+neurons", 0.3, t)]
        calib = CalibrationConfig(a.samples, 16, r.data.max_length)
        rows += run_grid(wl, "minilm-l6", task, grid, wl.task.metric, lambda rs: flush(rows + rs), calib)
    return rows


def part_minilm_retrain(a, flush) -> list[dict]:
    """magnitude / wanda / sparsegpt at 50 % and 2:4, then 1 epoch of hard-pruned retraining (the recipe's
    ``retrain`` phase) on a ``--retrain-limit`` random subset of the task's training set."""
    rows = []
    for task in a.tasks:
        r, label = minilm_dense_recipe(a, task)
        wl = workload(dense_recipe(r, a.cache, label))
        sub = build_workload(load_recipe(ROOT / "recipes" / f"glue_{task}_bench.yaml",
                                         [f"data.limit={a.retrain_limit}"])).train_loader
        cfg = load_recipe(ROOT / "recipes" / f"glue_{task}_bench.yaml", ["retrain.epochs=1"]).phase("retrain")
        t = TargetSpec(list(r.prune.targets.include), [], ["Linear"])
        grid = [(m, st, 0.5, t) for st in ("unstructured", "nm:2:4") for m in ("magnitude", "wanda", "sparsegpt")]
        calib = CalibrationConfig(a.samples, 16, r.data.max_length)
        rows += run_grid(wl, "minilm-l6", task, grid, wl.task.metric, lambda rs: flush(rows + rs), calib,
                         retrain=(sub, cfg))
    return rows


def part_resnet(a, flush) -> list[dict]:
    """ResNet-18 (CIFAR variant) on the 200-image CIFAR-10 sample (160 train / 40 test): dense trained briefly."""
    r = parse_recipe({"name": "resnet18-ptq-dense", "seed": 0, "model": {"name": "resnet18_cifar"},
                      "data": {"name": "cifar10", "batch_size": 32, "eval_batch_size": 100},
                      "prune": {"structure": "unstructured", "sparsity": 0.0,
                                "targets": {"include": ["*"], "exclude": ["conv1", "fc"], "types": ["Linear", "Conv2d"]}},
                      "algorithm": {"name": "oneshot"},
                      "train": {"optimizer": "adam", "lr": 1e-3, "epochs": 1, "scheduler": "cosine"},
                      "dense": {"epochs": a.resnet_epochs}, "retrain": {"epochs": 0}})
    wl = workload(dense_recipe(r, a.cache, f"resnet18_cifar200_e{a.resnet_epochs}"))
    t = TargetSpec(["*"], ["conv1", "fc"], ["Linear", "Conv2d"])
    grid = [(m, "unstructured", 0.5, t) for m in ("magnitude", "wanda", "sparsegpt")]
    return run_grid(wl, "resnet18_cifar", "cifar10-sample200", grid, "accuracy", flush,
                    CalibrationConfig(min(a.samples, 160), 32, None))


def part_decoder(a, flush) -> list[dict]:
    from decoder_lm import decoder_workload
    wl = decoder_workload(a.cache, epochs=1)
    t = TargetSpec(["transformer.h.*"], [], ["HFConv1D"])
    grid = [(m, st, 0.5, t) for st in ("unstructured", "nm:2:4") for m in ("magnitude", "wanda", "sparsegpt")]
    return run_grid(wl, "gpt2-tiny", "sst2-lm", grid, "perplexity", flush, CalibrationConfig(a.samples, 16, 64))


GLUE = {"sst2", "mrpc", "stsb", "rte", "cola", "qnli", "qqp", "mnli"}


def percent_glue(r: dict) -> dict:
    """A GLUE row written as a fraction (before the metrics became percentages) in points (x100)."""
    if r["task"] in GLUE and r.get("dense_score") is not None and r["dense_score"] <= 1.0:
        r = dict(r)
        for k in ("score", "dense_score", "score_before_retrain"):
            if r.get(k) is not None:
                r[k] = round(r[k] * 100, 2)
        r["converted_from_fraction"] = True
    return r


def merge(out: Path, files: list[Path]) -> None:
    """Rows of other result files into ``out`` (GLUE fractions converted to points); their commands are kept."""
    data = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    meta = {k: v for k, v in data.items() if k != "rows"}
    rows = [percent_glue(r) for r in data.get("rows", [])]
    for f in files:
        other = json.loads(Path(f).read_text())
        rows += [{**percent_glue(r), "command": r.get("command", other.get("command"))} for r in other["rows"]]
        for c in other.get("commands", [other.get("command")]):
            if c and c not in meta.setdefault("commands", []):
                meta["commands"].append(c)
    meta["command"] = " ".join(["python", *map(shlex.quote, sys.argv)])
    latest = {}
    for r in rows:                           # a later row with the same key replaces an earlier one
        r["retrain_epochs"] = int(r["retrain_epochs"]) if float(r["retrain_epochs"]).is_integer() else r["retrain_epochs"]
        latest[_key(r)] = r
    atomic_write_json(out, {**meta, "rows": list(latest.values())})


def table(path: Path) -> str:
    """The rows as a markdown table (score = the task's metric; GLUE in points)."""
    order = {m: i for i, m in enumerate(("magnitude", "magnitude_heads_neurons", "wanda", "sparsegpt", "obs_structured"))}
    rows = sorted(json.loads(path.read_text())["rows"],
                  key=lambda r: (r["model"], r["task"], float(r["retrain_epochs"]), r["structure"], r["sparsity"],
                                 order.get(r["method"], 9), r["tool"]))
    head = "| model | task | method | structure | sparsity | retrain epochs | score | dense | Δ | seconds | peak MB |"
    out = [head, "|" + "---|" * 11]
    for r in rows:
        d = r["score"] - r["dense_score"]
        out.append(f"| {r['model']} | {r['task']} | {r['method']}{'' if r['tool'] == 'prunekit' else ' (' + r['tool'] + ')'}"
                   f" | {r['structure']} | {r['sparsity']:.0%} | {r['retrain_epochs']} | {r['score']:.2f} | "
                   f"{r['dense_score']:.2f} | {d:+.2f} | {r['seconds']} | {r['peak_mb']:.0f} |")
    return "\n".join(out)


METHODS: list[str] = []      # --methods: run only these rows' methods

PARTS = {"lenet": part_lenet, "minilm": part_minilm, "minilm_retrain": part_minilm_retrain, "resnet": part_resnet,
         "decoder": part_decoder}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=sorted(PARTS))
    ap.add_argument("--merge", nargs="+", type=Path, help="merge the rows of these result files into --out")
    ap.add_argument("--table", action="store_true", help="print --out as a markdown table")
    ap.add_argument("--tasks", nargs="+", default=["sst2"])
    ap.add_argument("--samples", type=int, default=128, help="calibration samples")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("PRUNEKIT_PTQ_CACHE",
                                                                      Path.home() / ".cache" / "prunekit_ptq")))
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--methods", nargs="+", default=[], help="only rows of these methods")
    ap.add_argument("--retrain-limit", type=int, default=2000, help="minilm_retrain: train examples for the epoch")
    ap.add_argument("--dense-epochs", type=float, default=None, help="minilm: dense epochs (default: the recipe's)")
    ap.add_argument("--resnet-epochs", type=int, default=15, help="resnet: dense epochs on the 160 train images")
    a = ap.parse_args(argv)
    if a.merge:
        merge(a.out, a.merge)
        return 0
    if a.table:
        print(table(a.out))
        return 0
    if a.part is None:
        ap.error("--part is required (or --merge / --table)")
    METHODS[:] = a.methods
    torch.set_num_threads(1)
    os.environ.setdefault("PRUNEKIT_NO_PROGRESS", "1")
    meta = {"command": " ".join(["python", *map(shlex.quote, sys.argv)]), "machine": machine_info(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "notes": "score: accuracy/F1/... in points (percent) for LeNet, ResNet and GLUE, perplexity for the decoder; "
                     "seconds = pruning incl. calibration forwards at 1 thread (retraining: retrain_seconds); "
                     "peak_mb = process peak RSS so far"}
    PARTS[a.part](a, lambda rows: save(a.out, rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
