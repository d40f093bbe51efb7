"""Accuracy at real speed (issue 20, item 4): GLUE MiniLM-L6 heads+neurons pruning, compacted and timed.

    python benchmarks/glue_speed.py --recipe recipes/glue_sst2_speed.yaml [--set KEY=VALUE ...] --run DIR
        [--dense-protocol 86.01] [--out benchmarks/results/glue_speed.json]

Runs the recipe into ``--run`` (skipped when ``DIR/results.json`` exists: the finished run is measured as is),
then compacts the run's model with the verified, graph-driven compaction of ``prunekit compact``
(:func:`prunekit.deploy.surgery.compact`; outputs compared with the masked model) and times the masked (dense
kernels) and the compacted model on batch 32 x sequence 128 (random token ids, full attention mask), 1 thread,
interleaved repeats (:func:`prunekit.deploy.timing.interleaved_ms`).  The speed-up is dense ms / compacted ms
of the same call.  One row per run is written (replacing a row of the same run folder): task, structure, init,
retraining, metric, the run's dense metric, parameters, measured speed-up, the command, machine, date.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from prunekit.cli.compact import compact_loaded, load_run
from prunekit.deploy.surgery import compact
from prunekit.deploy.timing import call_model, interleaved_ms
from prunekit.graph.families import head_neuron_masks
from prunekit.io.checkpoint import atomic_write_json
from prunekit.pipelines.recipe import load_recipe
from prunekit.pipelines.runner import machine_info, run_pipeline
from prunekit.pipelines.workloads import build_workload

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "glue_speed.json"


def seq_input(example: dict, batch: int, seq: int, seed: int = 0) -> dict:
    """A ``batch x seq`` input with the keys of the run's example: random word-piece ids between [CLS] and
    [SEP], full attention mask, segment 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch, seq), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    full = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    return {k: full[k] for k in example}


def measure(run_dir: Path, batch: int, seq: int, repeats: int) -> dict:
    masked, masks, recipe, x0 = load_run(run_dir)
    res = compact_loaded(copy.deepcopy(masked), masks, x0, recipe.model.name)
    x = seq_input(x0, batch, seq)
    fns = {k: functools.partial(call_model, m, x) for k, m in (("dense", masked), ("compacted", res.model))}
    ms = interleaved_ms(fns, repeats=repeats, warmup=2, threads=1)
    return {"params_before": res.params_before, "params_after": res.params_after,
            "dense_ms": round(ms["dense"], 1), "compacted_ms": round(ms["compacted"], 1),
            "speedup": round(ms["dense"] / ms["compacted"], 3), "batch": batch, "seq": seq, "threads": 1,
            "repeats": repeats}


def sweep(recipe_path: str, pairs: list[tuple[float, float]], batch: int, seq: int, repeats: int) -> list[dict]:
    """Speed-up of the compacted model for each (head, neuron) sparsity pair (magnitude masks on the recipe's
    pre-trained model: the speed of a shape does not depend on which groups are removed)."""
    recipe = load_recipe(recipe_path, ["data.limit=8", "data.eval_limit=8"])
    wl = build_workload(recipe)
    model, x0 = wl.model.eval(), wl.example_input
    x = seq_input(x0, batch, seq)
    rows = []
    for h, n in pairs:
        res = compact(copy.deepcopy(model), head_neuron_masks(model, h, n), x0)
        ms = interleaved_ms({"dense": functools.partial(call_model, model, x),
                             "compacted": functools.partial(call_model, res.model, x)}, repeats=repeats, warmup=2,
                            threads=1)
        rows.append({"head_sparsity": h, "neuron_sparsity": n, "params_after": res.params_after,
                     "dense_ms": round(ms["dense"], 1), "compacted_ms": round(ms["compacted"], 1),
                     "speedup": round(ms["dense"] / ms["compacted"], 3)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def describe(recipe) -> tuple[str, str]:
    """(init, retraining) of a recipe, in words."""
    a = recipe.algorithm
    p = dict(a.params)
    init = {"obs_structured": "OBS-structured (calibration, least-squares refit)",
            "heads_neurons": "magnitude (L2 of the group)"}.get(a.name, a.name)
    init += f"; heads {p.get('head_sparsity')}, neurons {p.get('neuron_sparsity')} removed per layer"
    rt = recipe.phase("retrain")
    kd = dict(recipe.distill or {})
    how = f"{rt.epochs:g} epoch(s), lr {rt.lr:g}" + (
        f", KD from dense (alpha {kd.get('alpha')}, T {kd.get('temperature')})" if "retrain" in kd.get("stages", [])
        else ", no KD")
    return init, how


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--run", default=None, help="run folder (reused when it holds results.json)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--sweep", default=None, metavar="H:N,H:N",
                    help="only time these head:neuron sparsity pairs (no training) into the file's 'sweep'")
    ap.add_argument("--dense-protocol", type=float, default=None,
                    help="the dense score of the benchmark protocol (glue_minilm.json) shown beside the row")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(a.out)
    doc: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {"notes": __doc__, "rows": []}
    if a.sweep:
        pairs = [(float(p.split(":")[0]), float(p.split(":")[1])) for p in a.sweep.split(",")]
        doc["sweep"] = {"rows": sweep(a.recipe, pairs, a.batch, a.seq, a.repeats), "batch": a.batch, "seq": a.seq,
                        "threads": 1, "command": " ".join(["python", *map(shlex.quote, sys.argv)]),
                        "machine": machine_info(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        atomic_write_json(out, doc)
        return 0
    if a.run is None:
        ap.error("--run DIR is required (unless --sweep)")
    run = Path(a.run)
    recipe = load_recipe(ROOT / a.recipe if not Path(a.recipe).is_absolute() else a.recipe, a.sets)
    t0 = time.perf_counter()
    res = (json.loads((run / "results.json").read_text()) if (run / "results.json").is_file()
           else run_pipeline(recipe, run, log=lambda m: print(f"  [{run.name}] {m}", flush=True)))
    wall = time.perf_counter() - t0
    speed = measure(run, a.batch, a.seq, a.repeats)
    init, how = describe(recipe)
    m = res["metric"]
    row = {"task": res["workload"]["task"], "structure": recipe.prune.structure, "init": init, "retraining": how,
           "metric": m, "score": round(res["metrics"]["final"][m], 2), "dense_score": round(res["dense_score"], 2),
           "delta": round(res["metrics"]["final"][m] - res["dense_score"], 2),
           "score_after_init": round(res["metrics"]["after_hard_prune"][m], 2),
           "dense_protocol": a.dense_protocol, "train_examples": res["workload"]["train_examples"],
           "seconds": {k: round(v, 1) for k, v in res["seconds"].items()}, **speed,
           "run": str(run), "command": " ".join(["python", *map(shlex.quote, sys.argv)]),
           "run_command": f"prunekit run {a.recipe} " + " ".join(f"--set {s}" for s in a.sets) + f" --out {run}",
           "machine": {**machine_info(), "threads": 1}, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "wall_seconds": round(wall, 1)}
    doc["rows"] = [r for r in doc["rows"] if r["run"] != row["run"]] + [row]
    atomic_write_json(out, doc)
    print(json.dumps({k: row[k] for k in ("task", "init", "score", "dense_score", "speedup", "params_after")}))
    return 0


def table(doc: dict) -> str:
    lines = ["| task | init | retraining | metric | dense (same run) | Δ | params | speed-up (b32 s128 1 thr) |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['task']} | {r['init']} | {r['retraining']} | {r['score']:.2f} | {r['dense_score']:.2f} | "
              f"{r['delta']:+.2f} | {r['params_after']:,} / {r['params_before']:,} | {r['speedup']:.2f}× |"
              for r in doc["rows"]]
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--table"]:
        print(table(json.loads(Path(sys.argv[2] if len(sys.argv) > 2 else OUT).read_text())))
        raise SystemExit(0)
    raise SystemExit(main())
