"""``prunekit sensitivity RECIPE.yaml [--sparsities 0.1,0.3,...] [--set k=v ...] [--budget 0.8] [--out DIR]``

Loads the dense model of the recipe (``model.checkpoint``) or trains it per the recipe's ``dense`` phase
(saved to ``OUT/dense`` — pass ``--set model.checkpoint=OUT/dense`` next time), prunes each target layer
alone over the sweep with the recipe's structure and score (no retraining), and writes into ``OUT``:

* ``sensitivity.json`` — dense score, curves (sparsity, drop) per layer, the allocation;
* ``sensitivity.png``  — drop vs sparsity, one line per layer;
* ``sensitivity.md``   — the curves as a table and the allocation;
* ``overrides.yaml``   — ``prune: {sparsity: BUDGET, overrides: {layer: sparsity}}`` meeting ``--budget``
  (parameter-weighted), usable in a recipe.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from prunekit.algorithms.sensitivity import DEFAULT_SPARSITIES, overall_sparsity, parse_sparsities
from prunekit.io.checkpoint import atomic_write_text
from prunekit.pipelines.recipe import load_recipe
from prunekit.pipelines.sensitivity import run_sensitivity
from prunekit.reporting.plots import sensitivity_curves


def add_parser(sub):
    p = sub.add_parser("sensitivity", help="prune each layer alone over a sparsity sweep; per-layer ratios for a budget",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="recipe YAML (model, data, structure, targets)")
    p.add_argument("--sparsities", default=None, help="comma-separated sweep, default 0.1,0.3,0.5,0.7,0.8,0.9,0.95")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value by dotted key (e.g. --set data.eval_limit=2000)")
    p.add_argument("--budget", type=float, default=None,
                   help="global targeted sparsity to allocate (default: the recipe's prune.sparsity)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<recipe name>-sensitivity)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep in --out (its dense training)")
    p.set_defaults(func=run)


def sensitivity_table(sens, ratios=None) -> str:
    head = "| layer | structure | params | " + " | ".join(f"{100 * s:g}%" for s in sens.sparsities) + " |"
    if ratios:
        head += " allocated |"
    lines = [head, "|---|---|---:|" + "---:|" * (len(sens.sparsities) + (1 if ratios else 0))]
    for n, pts in sens.curves.items():
        row = f"| {n} | {sens.structures[n]} | {sens.numel[n]} | " + " | ".join(f"{d:+.3f}" for _, d in pts) + " |"
        if ratios:
            row += f" {100 * ratios[n]:.2f}% |"
        lines.append(row)
    return "\n".join(lines)


def run(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    sweep = parse_sparsities(args.sparsities) if args.sparsities else list(DEFAULT_SPARSITIES)
    budget = float(args.budget if args.budget is not None else recipe.prune.sparsity)
    out = Path(args.out or Path("runs") / f"{recipe.name}-sensitivity")
    res, sens = run_sensitivity(recipe, out, sweep, budget, resume=args.resume)
    ratios, metric = res["allocation"], res["metric"]
    snippet = (out / "overrides.yaml").read_text()
    png = sensitivity_curves(sens.curves, out / "sensitivity.png", metric=metric)
    table = sensitivity_table(sens, ratios)
    md = (f"# Sensitivity: {recipe.name}\n\ndense {metric} {sens.dense_score:.4f}; drop = dense − pruned "
          f"(each layer pruned alone, no retraining; structure {recipe.prune.structure}).\n\n{table}\n\n"
          f"Budget {budget}: allocated overall targeted sparsity {overall_sparsity(ratios, sens.numel):.4f}\n\n"
          f"```yaml\n{snippet}```\n\n![sensitivity](sensitivity.png)\n")
    atomic_write_text(out / "sensitivity.md", md)
    print(md)
    print(f"wrote {out / 'sensitivity.json'}, {png}, {out / 'sensitivity.md'}, {out / 'overrides.yaml'}")
    return 0
