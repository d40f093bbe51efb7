"""How much padding the calibration statistics used to count, and that they no longer do.

    PYTHONPATH=src python benchmarks/calibration_padding.py [--tasks sst2 mrpc] [--samples 128] [--batch-size 8]

For each GLUE task: the recipe's MiniLM-L6 workload (real tokenizer, real training sentences), the calibration
batches the post-training algorithms draw (``--samples`` sentences, batches of ``--batch-size``, dynamic
padding, ``max_length`` 128).  Measured:

* ``padded_fraction``: padded positions / all positions of those batches (rows the old driver counted);
* ``old_vs_real_rel_diff``: per encoder matrix, ``‖H_all − H_real‖_F / ‖H_real‖_F`` where ``H_all`` counts every
  position (the old statistics) and ``H_real`` only real tokens (now) — median and max over the 36 matrices;
* ``batched_vs_single_rel_diff``: the same norm between the driver's statistics from the padded batches and from
  the same sentences one by one (``batch_size`` 1, no padding) — max over the matrices (≈ float rounding);
* ``wanda`` / ``sparsegpt``: whether the 50 % masks from the padded batches equal those from the single
  sentences, how many mask entries differ per encoder layer (layer 0 sees identical inputs; later layers see the
  outputs of the pruned earlier layers, so float rounding in an update can flip near-ties), and the seconds of
  the padded run (calibration included) at the machine's thread count.
Writes ``benchmarks/results/calibration_padding.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from prunekit.algorithms.base import get_algorithm_class
from prunekit.algorithms.calibration import CalibrationConfig, LayerStats, collect_batches, collect_stats, run_blockwise
from prunekit.core.plan import PruneSpec
from prunekit.core.targets import find_targets
from prunekit.io.checkpoint import atomic_write_json
from prunekit.pipelines.recipe import load_recipe
from prunekit.pipelines.runner import build_workload, machine_info

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "calibration_padding.json"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _all_rows_stats(model, batches, targets) -> dict[str, LayerStats]:
    """The old statistics: every position of every batch is a row (the model still masks its attention)."""
    stats = {n: LayerStats(m.weight.shape[1]) for n, m in targets.items()}
    hs = [m.register_forward_hook(lambda mod, a, o, st=stats[n]: st.add(a[0].reshape(-1, a[0].shape[-1])))
          for n, m in targets.items()]
    try:
        with torch.no_grad():
            for b in batches:
                model(**{k: v for k, v in b.items() if k != "labels"})
    finally:
        for h in hs:
            h.remove()
    return stats


def _blockwise(model, batches, targets) -> dict[str, LayerStats]:
    seen: dict[str, LayerStats] = {}
    run_blockwise(model, batches, targets, lambda mods, st: seen.update(st))
    return seen


def _prune(wl, method: str, batch_size: int, samples: int) -> tuple[dict, float]:
    model = copy.deepcopy(wl.model)
    cls = get_algorithm_class(method)
    algo = cls(cls.Params(), PruneSpec("unstructured", 0.5))
    algo.calibration_loader, algo.calibration = wl.train_loader, CalibrationConfig(samples, batch_size, 128, 0)
    t0 = time.perf_counter()
    masks = algo.final_masks(model)
    return {n: m.clone() for n, m in masks.items()}, time.perf_counter() - t0


def measure(task: str, samples: int, batch_size: int) -> dict:
    recipe = load_recipe(ROOT / "recipes" / f"glue_{task}_bench.yaml")
    recipe.data.limit = max(samples * 4, 512)
    torch.manual_seed(0)
    wl = build_workload(recipe)
    model = wl.model.eval()
    targets = find_targets(model, recipe.prune.targets)
    batches = collect_batches(wl.train_loader, samples, batch_size, 128, 0)
    singles = collect_batches(wl.train_loader, samples, 1, 128, 0)
    masks = torch.cat([b["attention_mask"].reshape(-1) for b in batches])
    old = _all_rows_stats(model, batches, targets)
    real = collect_stats(model, batches, targets)
    diffs = sorted(_rel(old[n].H, real[n].H) for n in targets)
    blk_b, blk_s = _blockwise(model, batches, targets), _blockwise(model, singles, targets)
    res = {}
    for method in ("wanda", "sparsegpt"):
        m_b, secs = _prune(wl, method, batch_size, samples)
        m_s, _ = _prune(wl, method, 1, samples)
        per_layer: dict[str, int] = {}
        for n in m_b:
            layer = re.search(r"layer\.(\d+)\.", n)
            key = layer.group(1) if layer else "other"
            per_layer[key] = per_layer.get(key, 0) + int((m_b[n] != m_s[n]).sum())
        res[method] = {"masks_equal": all(torch.equal(m_b[n], m_s[n]) for n in m_b),
                       "mask_entries": sum(m.numel() for m in m_b.values()),
                       "mask_entries_differing_by_layer": per_layer, "seconds": round(secs, 2)}
    return {"task": task, "model": recipe.model.name, "samples": samples, "batch_size": batch_size,
            "targets": len(targets), "positions": int(masks.numel()), "real_tokens": int(masks.sum()),
            "padded_fraction": round(1 - float(masks.float().mean()), 4),
            "old_vs_real_rel_diff": {"median": round(diffs[len(diffs) // 2], 4), "max": round(diffs[-1], 4)},
            "batched_vs_single_rel_diff": max(_rel(blk_b[n].H, blk_s[n].H) for n in targets),
            "rows_equal": all(blk_b[n].n == blk_s[n].n for n in targets),
            **res}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["sst2", "mrpc"])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(argv)
    rows = [measure(t, args.samples, args.batch_size) for t in args.tasks]
    for r in rows:
        print(json.dumps(r))
    atomic_write_json(OUT, {"rows": rows, "command": shlex.join(["python", *sys.argv]), "machine": machine_info(),
                            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
