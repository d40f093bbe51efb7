"""Training throughput of prunekit's loop (``prunekit.training.loop.fit``) vs a plain PyTorch loop.

Command::

    PYTHONPATH=src python benchmarks/loop_overhead.py     # → benchmarks/results/loop_overhead.json

Same model (same initial weights), same pre-collated batches, same optimizer (SGD momentum 0.9 for
LeNet-5, AdamW for MiniLM), CPU, 1 thread.  Two modes:

* ``dense`` — plain: forward, cross-entropy, zero_grad, backward, step; prunekit: ``fit`` with no hooks;
* ``hard_pruned`` (50 % unstructured on every target) — plain: the same plus the hand-written hard-prune
  (gradient ``mul_`` by the mask before the step, weight ``mul_`` after it); prunekit: ``fit(masks=...)``.

Workloads: LeNet-5 on MNIST (batch 64) and MiniLM-L6 (packaged ``minilm-l6``) on an SST-2 subset (batch
16, max_length 64).  Plain and prunekit runs are interleaved (plain, prunekit, prunekit, plain, ...) and
repeated; medians of examples/s and the ratio prunekit / plain are reported.  Targets: dense ≥ 0.97×,
hard-pruned ≥ 0.95×.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("PRUNEKIT_NO_PROGRESS", "1")
import torch  # noqa: E402

from prunekit.core.plan import compute_masks  # noqa: E402
from prunekit.pipelines.recipe import parse_recipe  # noqa: E402
from prunekit.pipelines.runner import (
    machine_info,
    prune_spec_from,  # noqa: E402
)
from prunekit.pipelines.workloads import build_workload  # noqa: E402
from prunekit.training.config import TrainConfig  # noqa: E402
from prunekit.training.loop import fit, make_optimizer  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "loop_overhead.json"
WORKLOADS = {
    "lenet5_mnist": {"name": "lenet5", "seed": 0, "model": {"name": "lenet5"},
                     "data": {"name": "mnist", "batch_size": 64, "limit": 64 * 40},
                     "prune": {"structure": "unstructured", "sparsity": 0.5},
                     "train": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "scheduler": "none"}},
    "minilm_sst2": {"name": "minilm", "seed": 0, "task": "glue", "model": {"name": "minilm-l6"},
                    "data": {"name": "sst2", "batch_size": 16, "limit": 16 * 12, "max_length": 64},
                    "prune": {"structure": "unstructured", "sparsity": 0.5},
                    "train": {"optimizer": "adamw", "lr": 2e-5, "scheduler": "none"}},
}


def _loss(task, model, batch):
    return task.step(model, batch)[0]


def plain_loop(model, task, batches, cfg, masks=None) -> float:
    """The hand-written loop; returns seconds."""
    opt = make_optimizer(model, cfg)
    pairs = [(p, masks[n].to(p.dtype)) for n, p in model.named_parameters() if masks is not None and n in masks]
    model.train()
    t0 = time.perf_counter()
    for batch in batches:
        loss = _loss(task, model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p, m in pairs:
            p.grad.mul_(m)
        opt.step()
        with torch.no_grad():
            for p, m in pairs:
                p.mul_(m)
    return time.perf_counter() - t0


def prunekit_loop(model, task, batches, cfg, masks=None) -> float:
    t0 = time.perf_counter()
    fit(model, task, batches, None, cfg, masks=masks.copy() if masks is not None else None, desc="bench")
    return time.perf_counter() - t0


def prepare(key: str):
    recipe = parse_recipe(copy.deepcopy(WORKLOADS[key]))
    torch.manual_seed(0)
    wl = build_workload(recipe)
    batches = list(wl.train_loader)
    masks = compute_masks(wl.model, prune_spec_from(recipe))
    n = sum(wl.task.batch_size(b) for b in batches)
    cfg = TrainConfig(**{**recipe.train.__dict__, "epochs": 1})
    return wl.model, wl.task, batches, masks, n, cfg


def measure(key: str, repeats: int, rows: dict) -> None:
    model0, task, batches, masks, n, cfg = prepare(key)
    init = copy.deepcopy(model0.state_dict())
    for rep in range(repeats + 1):                  # rep 0 = warm-up, discarded
        for mode in ("dense", "hard_pruned"):
            ms = masks if mode == "hard_pruned" else None
            order = [("plain", plain_loop), ("prunekit", prunekit_loop)]
            if rep % 2:
                order.reverse()
            for name, run in order:
                model0.load_state_dict(init)
                if ms is not None:
                    ms.apply(model0)
                secs = run(model0, task, batches, cfg, ms)
                if rep:
                    rows.setdefault(f"{key}/{mode}", {"plain": [], "prunekit": []})[name].append(n / secs)
        print(f"{key} rep {rep}: " + ", ".join(f"{k}: {v['plain'][-1]:.1f} vs {v['prunekit'][-1]:.1f} ex/s"
                                               for k, v in rows.items() if k.startswith(key) and rep), flush=True)


def summarise(rows: dict) -> list[dict]:
    out = []
    for key, v in rows.items():
        wl, mode = key.split("/")
        p, k = statistics.median(v["plain"]), statistics.median(v["prunekit"])
        paired = [b / a for a, b in zip(v["plain"], v["prunekit"])]
        target = 0.97 if mode == "dense" else 0.95
        out.append({"workload": wl, "mode": mode, "plain_examples_per_s": round(p, 2),
                    "prunekit_examples_per_s": round(k, 2), "ratio": round(k / p, 4),
                    "ratio_paired_median": round(statistics.median(paired), 4), "target": target,
                    "meets_target": statistics.median(paired) >= target,
                    "samples_plain": [round(x, 2) for x in v["plain"]],
                    "samples_prunekit": [round(x, 2) for x in v["prunekit"]]})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workloads", nargs="*", default=list(WORKLOADS))
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows: dict = {}
    for key in args.workloads:
        measure(key, args.repeats, rows)
    doc = {"command": "PYTHONPATH=src python benchmarks/loop_overhead.py " + " ".join(argv or sys.argv[1:]),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": machine_info(),
           "repeats": args.repeats, "unit": "training examples per second (median over repeats)",
           "ratio": "prunekit / plain (ratio_paired_median: median of the per-repeat ratios, same time window)",
           "results": summarise(rows)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    for r in doc["results"]:
        print(f"{r['workload']:14s} {r['mode']:12s} plain {r['plain_examples_per_s']:8.1f}  prunekit "
              f"{r['prunekit_examples_per_s']:8.1f}  ratio {r['ratio_paired_median']:.3f} (target {r['target']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
