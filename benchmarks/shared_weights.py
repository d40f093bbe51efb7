"""Shared-weights multi-sparsity models (issue 5): accuracy per nested level, switch bytes, latency.

Command (full; CPU, one thread, dense LeNet-5 trained once and cached under runs/shared_cache/)::

    python benchmarks/shared_weights.py
    python benchmarks/shared_weights.py --quick            # 2000 training images, short budgets (smoke)
    python benchmarks/shared_weights.py --configs ref,high # a subset of the configurations

Configurations (each a ``prunekit shared`` run of recipes/lenet5_shared.yaml with overrides):

* ``ref``   LeNet-5/MNIST levels 60.24 / 40.50 / 20.70 % (the reference work), sequential, one-shot L0;
* ``joint`` the same levels trained jointly (levels cycled per step) — the peer of ``ref``;
* ``high``  LeNet-5/MNIST levels 98 / 95 / 90 %, sequential, gradual (Zhu & Gupta) L0, global scope;
* ``high_long`` the same with a longer budget (3 + 2 epochs for L0, 1 epoch per denser level);
* ``minilm`` MiniLM-L6 on SST-2 at 70 / 50 / 30 % (subsampled, if prunekit.adapters.hf and the weights exist)
  with separately pruned counterparts at each sparsity.

Writes benchmarks/results/shared_weights.json (rows: model, task, level, sparsity, metric, score,
switch_bytes_from_previous, full_rewrite_bytes, latency_ms, + budget, dense score and deltas), rewritten
after every configuration so a partial run keeps what finished.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "shared_weights.json"
CACHE = ROOT / "runs" / "shared_cache"


def machine() -> dict:
    return {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def dense_lenet(quick: bool, log) -> str:
    """Train the dense LeNet-5 once (recipe's dense phase) and cache it; returns the checkpoint folder."""
    from prunekit.io.checkpoint import read_manifest, save_checkpoint
    from prunekit.pipelines.recipe import load_recipe
    from prunekit.pipelines.workloads import build_workload
    from prunekit.training.loop import fit, seed_everything

    d = CACHE / ("lenet5_dense_quick" if quick else "lenet5_dense")
    try:
        read_manifest(d)
        log(f"dense LeNet-5: cached at {d}")
        return str(d)
    except Exception:
        pass
    ov = ["data.limit=2000", "dense.epochs=1"] if quick else []
    recipe = load_recipe(ROOT / "recipes" / "lenet5_shared.yaml", ov)
    seed_everything(recipe.seed)
    wl = build_workload(recipe)
    t0 = time.perf_counter()
    fit(wl.model, wl.task, wl.train_loader, wl.eval_loader, recipe.phase("dense"), desc="dense")
    acc = wl.task.evaluate(wl.model, wl.eval_loader)["accuracy"]
    save_checkpoint(d, wl.model, None, extra={"stage": "dense", "accuracy": acc, "seconds": time.perf_counter() - t0,
                                              "epochs": recipe.phase("dense").epochs})
    log(f"dense LeNet-5: {acc:.2f}% in {time.perf_counter() - t0:.0f}s, cached at {d}")
    return str(d)


def lenet_configs(quick: bool) -> dict:
    """Budgets in epochs of the 60k MNIST training set (fractional = a random part of one epoch).  CPU is
    shared by ~8 engineers, so the levels get short fine-tunes from the cached dense model."""
    q = ["data.limit=2000", "data.eval_limit=2000"] if quick else []
    ref = [0.6024, 0.4050, 0.2070]
    return {
        "ref": dict(levels=ref, mode="sequential", overrides=[
            "retrain.epochs=0.5", "retrain.lr=0.01", "extra.shared.level_train.epochs=0.25"] + q,
            budget="L0 one-shot + 0.5 retrain epoch (lr 0.01); each denser level 0.25 epoch (added weights only)"),
        "joint": dict(levels=ref, mode="joint", overrides=[
            "extra.shared.joint_train.epochs=1", "retrain.lr=0.01"] + q,
            budget="1 joint epoch (lr 0.01), levels cycled per step (~1/3 epoch each)"),
        "high": dict(levels=[0.98, 0.95, 0.90], mode="sequential", overrides=[
            "algorithm.name=gradual", "search.epochs=1", "search.lr=0.02", "prune.scope=global",
            "retrain.epochs=0.5", "retrain.lr=0.01", "extra.shared.level_train.epochs=0.25"] + q,
            budget="L0 gradual (cubic) 1 epoch + 0.5 retrain epoch, global magnitude; each denser level 0.25 epoch"),
        "high_long": dict(levels=[0.98, 0.95, 0.90], mode="sequential", overrides=[
            "algorithm.name=gradual", "search.epochs=3", "search.lr=0.02", "prune.scope=global",
            "retrain.epochs=2", "retrain.lr=0.01", "extra.shared.level_train.epochs=1"] + q,
            budget="L0 gradual (cubic) 3 epochs + 2 retrain epochs, global magnitude; each denser level 1 epoch"),
    }


def run_lenet(name: str, cfg: dict, dense: str, out_root: Path, log) -> tuple[list[dict], dict]:
    from prunekit.pipelines.recipe import load_recipe
    from prunekit.pipelines.shared import run_shared

    ov = [f"model.checkpoint={dense}", f"name=lenet5-shared-{name}"] + cfg["overrides"]
    recipe = load_recipe(ROOT / "recipes" / "lenet5_shared.yaml", ov)
    res = run_shared(recipe, out_root / name, levels=cfg["levels"], mode=cfg["mode"], log=log)
    rows = []
    for r in res["levels"]:
        rows.append({"model": "lenet5", "task": "mnist", "config": name, "mode": res["mode"],
                     "algorithm": res["algorithm"], "structure": res["structure"], "level": r["level"],
                     "target_sparsity": r["target_sparsity"], "sparsity": round(r["sparsity"], 6),
                     "metric": r["metric"], "score": r["score"], "dense_score": res["dense_score"],
                     "delta_vs_dense": r["score"] - res["dense_score"],
                     "switch_bytes_from_previous": r["switch_bytes_from_previous"],
                     "switch_index_bytes_from_previous": r["switch_index_bytes_from_previous"],
                     "full_rewrite_bytes": r["full_rewrite_bytes"],
                     "switch_vs_full_ratio": (None if r["switch_bytes_from_previous"] is None
                                              else r["switch_bytes_from_previous"] / r["full_rewrite_bytes"]),
                     "latency_ms": r["latency_ms"], "budget": cfg["budget"]})
    extra = {"breakeven": res["breakeven"], "switch_matrix": res["switch_matrix"], "artifact_bytes": res["artifact_bytes"],
             "seconds": res["seconds"], "steps_per_level": res.get("steps_per_level"),
             "dense_checkpoint": dense}
    return rows, extra


def run_minilm(quick: bool, out_root: Path, log, budget: dict, name: str = "minilm") -> tuple[list[dict], dict]:
    """MiniLM-L6 / SST-2: shared levels (sequential) + separately pruned counterparts at each sparsity."""
    from prunekit.pipelines.recipe import parse_recipe
    from prunekit.pipelines.runner import run_pipeline
    from prunekit.pipelines.shared import run_shared

    raw = yaml_load(ROOT / "recipes" / "minilm_sst2_shared.yaml")
    ov = [f"data.limit={budget['train']}", f"data.eval_limit={budget['eval']}", f"data.max_length={budget['max_length']}",
          f"dense.epochs={budget['dense_epochs']}", f"dense.lr={budget['dense_lr']}", f"retrain.epochs={budget['retrain_epochs']}",
          f"extra.shared.level_train.epochs={budget['level_epochs']}"]
    dense_dir = CACHE / f"minilm_sst2_dense_{budget['train']}"
    levels = [0.7, 0.5, 0.3]
    if not (dense_dir / "manifest.json").is_file():
        r0 = run_pipeline(parse_recipe(raw, ov + ["prune.sparsity=0.0", "retrain.epochs=0", "name=minilm-dense"]),
                          out_root / "minilm_dense", log=log)
        import shutil
        shutil.copytree(out_root / "minilm_dense" / "dense", dense_dir, dirs_exist_ok=True)
        log(f"dense MiniLM: {r0['dense_score']:.2f}")
    ov2 = ov + [f"model.checkpoint={dense_dir}"]
    res = run_shared(parse_recipe(raw, ov2), out_root / f"{name}_shared", levels=levels, log=log)
    sep = {}
    for s in levels:   # separately pruned counterparts: one-shot from the same dense model + the L0 retrain budget
        try:
            rs = run_pipeline(parse_recipe(raw, ov2 + [f"prune.sparsity={s}", f"name=minilm-sep-{s}"]),
                              out_root / f"{name}_sep_{s}", log=log)
            sep[s] = rs["score"]
        except Exception as e:  # keep the shared rows
            log(f"separate {s}: FAILED {type(e).__name__}: {e}")
    rows = []
    for r in res["levels"]:
        s = r["target_sparsity"]
        rows.append({"model": "minilm-l6", "task": "sst2", "config": name, "mode": res["mode"],
                     "algorithm": res["algorithm"], "structure": res["structure"], "level": r["level"],
                     "target_sparsity": s, "sparsity": round(r["sparsity"], 6), "metric": r["metric"],
                     "score": r["score"], "dense_score": res["dense_score"], "delta_vs_dense": r["score"] - res["dense_score"],
                     "separate_score": sep.get(s), "delta_vs_separate": (r["score"] - sep[s]) if s in sep else None,
                     "switch_bytes_from_previous": r["switch_bytes_from_previous"],
                     "switch_index_bytes_from_previous": r["switch_index_bytes_from_previous"],
                     "full_rewrite_bytes": r["full_rewrite_bytes"],
                     "switch_vs_full_ratio": (None if r["switch_bytes_from_previous"] is None
                                              else r["switch_bytes_from_previous"] / r["full_rewrite_bytes"]),
                     "latency_ms": r["latency_ms"], "budget": json.dumps(budget)})
    return rows, {"breakeven": res["breakeven"], "switch_matrix": res["switch_matrix"], "seconds": res["seconds"]}


def merge(main: Path, other: Path) -> int:
    """Merge ``other``'s rows and configs into ``main`` (rows of a config in ``other`` replace ``main``'s)."""
    a = json.loads(main.read_text()) if main.is_file() else {"rows": [], "configs": {}, "notes": []}
    b = json.loads(other.read_text())
    cfgs = set(b.get("configs", {}))
    a["rows"] = [r for r in a.get("rows", []) if r.get("config") not in cfgs] + b.get("rows", [])
    a.setdefault("configs", {}).update(b.get("configs", {}))
    cmds = a.get("commands") or ([a["command"]] if a.get("command") else [])
    a["commands"] = cmds + [b["command"]]
    a["command"] = " && ".join(a["commands"])
    a.setdefault("machine", b.get("machine"))
    note = "configs run as separate processes were merged with: python benchmarks/shared_weights.py --merge FILE"
    if note not in a.setdefault("notes", []):
        a["notes"].append(note)
    tmp = main.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(a, indent=2) + "\n")
    os.replace(tmp, main)
    print(f"merged {len(b.get('rows', []))} rows of {sorted(cfgs)} from {other} into {main}")
    return 0


def yaml_load(p):
    import yaml
    return yaml.safe_load(Path(p).read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2000 training images, short budgets (smoke test)")
    ap.add_argument("--configs", default="ref,joint,high", help="comma list of ref,joint,high,high_long,minilm "
                    "(any name starting with minilm runs MiniLM with --minilm-train/--minilm-eval)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "shared_bench"), help="run folders")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--minilm-train", type=int, default=1000, help="SST-2 training subsample")
    ap.add_argument("--minilm-eval", type=int, default=400, help="SST-2 dev subsample (872 = all)")
    ap.add_argument("--merge", default=None, metavar="FILE",
                    help="only merge the rows/configs of another results file (e.g. a separate minilm run) into --results")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(Path(args.results), Path(args.merge))
    torch.set_num_threads(1)
    os.environ.setdefault("PRUNEKIT_NO_PROGRESS", "1")
    out_root = Path(args.out)
    log = lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True)  # noqa: E731
    doc = {"command": "python " + " ".join([sys.argv[0].replace(str(ROOT) + "/", "")] + (argv if argv is not None else sys.argv[1:])),
           "machine": machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "quick": args.quick, "rows": [], "configs": {}, "notes": [
               "switch_bytes_from_previous: bytes a device writes to go from level k-1 (sparser) to level k: per "
               "tensor the cheapest of (index of the added positions in bitmask/CSR/relative from prunekit.deploy.storage "
               "+ the added float32 values) and a dense rewrite of that tensor; full_rewrite_bytes: every "
               "parameter written dense (float32).",
               "latency_ms: median dense-kernel forward time of one example at that level (1 thread); the "
               "levels differ only in which weights are zero, so dense kernels run at the same speed.",
               "CPU shared by ~8 engineers (2 cores): budgets are labelled per row; timings are noisy."]}
    res_path = Path(args.results)
    res_path.parent.mkdir(parents=True, exist_ok=True)

    def flush():
        tmp = res_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, res_path)

    wanted = [c.strip() for c in args.configs.split(",") if c.strip()]
    configs = lenet_configs(args.quick)
    dense = None
    for name in wanted:
        t0 = time.perf_counter()
        try:
            if name.startswith("minilm"):
                budget = {"train": 200 if args.quick else args.minilm_train, "eval": 200 if args.quick else args.minilm_eval,
                          "max_length": 64, "dense_epochs": 2, "dense_lr": 1e-4, "retrain_epochs": 1, "level_epochs": 0.5}
                rows, extra = run_minilm(args.quick, out_root, log, budget, name)
            else:
                if name not in configs:
                    raise ValueError(f"unknown config {name!r}; valid: {sorted(configs) + ['minilm']}")
                dense = dense or dense_lenet(args.quick, log)
                rows, extra = run_lenet(name, configs[name], dense, out_root, log)
        except Exception as e:  # keep what finished; record the failure
            doc["configs"][name] = {"error": f"{type(e).__name__}: {e}"}
            log(f"{name}: FAILED {type(e).__name__}: {e}")
            flush()
            continue
        extra["wall_seconds"] = time.perf_counter() - t0
        doc["rows"].extend(rows)
        doc["configs"][name] = extra
        flush()
        for r in rows:
            log(f"{name} L{r['level']} sparsity {r['sparsity']:.4f} {r['metric']} {r['score']:.2f} "
                f"(dense {r['dense_score']:.2f}) switch {r['switch_bytes_from_previous']} / full {r['full_rewrite_bytes']}")
    flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
