"""``prunekit run RECIPE.yaml [--set k=v ...] [--out DIR]``"""
from __future__ import annotations

import json
from pathlib import Path


def add_parser(sub):
    p = sub.add_parser("run", help="run a pruning recipe end to end (train/load → prune → retrain → results)",
                       description="Run a YAML recipe: dense training (or model.checkpoint), the algorithm's phase, "
                                   "hard-prune, retraining; writes results.json, model.safetensors, masks.safetensors, "
                                   "manifest.json and the resolved recipe.yaml into --out.")
    p.add_argument("recipe", help="recipe YAML (see recipes/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value by dotted key, e.g. --set train.epochs=1 --set data.limit=2000")
    p.add_argument("--out", default=None, help="output folder (default: runs/<recipe name>)")
    p.set_defaults(func=run)


def run(args) -> int:
    from prunekit.config import load_recipe
    from prunekit.runner import run_pipeline

    recipe = load_recipe(args.recipe, args.overrides)   # fails before any work on a bad key/value
    out = Path(args.out or Path("runs") / recipe.name)
    res = run_pipeline(recipe, out)
    m = res["metric"]
    print(json.dumps({"out": str(out), m: res["score"], f"dense_{m}": res["dense_score"],
                      f"{m}_after_hard_prune": res["score_after_hard_prune"], "sparsity": round(res["sparsity"], 6),
                      "compression_rate": round(res["compression_rate"], 4)}, indent=2))
    return 0
