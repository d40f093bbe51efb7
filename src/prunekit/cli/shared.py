"""``prunekit shared RECIPE.yaml --levels 0.6,0.4,0.2 [--mode sequential|joint] [--set k=v ...] [--out DIR]``
and ``prunekit shared-switch ARTIFACT [--from L1] --to L2 [--recipe R --eval]``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from prunekit.core.errors import RecipeError
from prunekit.deploy.shared_weights import load_level, read_shared, switch_cost
from prunekit.pipelines.recipe import load_recipe, parse_recipe
from prunekit.pipelines.shared import run_shared
from prunekit.pipelines.workloads import build_workload


def _levels(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--levels expects comma-separated sparsities like 0.6,0.4,0.2; got {text!r}") from None


def add_parser(sub):
    p = sub.add_parser("shared", help="train nested multi-sparsity levels sharing one weight set",
                       description="Shared-weights multi-sparsity models (see prunekit.deploy.shared_weights): dense (or "
                                   "model.checkpoint) → nested levels trained sequentially or jointly → one artifact "
                                   "(shared.safetensors) + results.json with a levels table and switch costs.")
    p.add_argument("recipe", help="recipe YAML (see recipes/*_shared.yaml)")
    p.add_argument("--levels", type=_levels, default=None,
                   help="level sparsities, comma separated, any order (default: the recipe's extra.shared.levels)")
    p.add_argument("--mode", choices=["sequential", "joint"], default=None,
                   help="sequential: train the sparsest level, freeze it, add the next (default); joint: all levels share one training run")
    p.add_argument("--schedule", choices=["cycle", "sample", "all"], default=None, help="joint: level per step")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value by dotted key")
    p.add_argument("--out", default=None, help="output folder (default: runs/<recipe name>-shared)")
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished run in --out from its newest good checkpoint (fresh start if none)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="also checkpoint every N optimizer steps (default: recipe key checkpoint_every)")
    p.set_defaults(func=run)

    s = sub.add_parser("shared-switch", help="load a level of a shared-weights artifact / switch between levels",
                       description="Load level --from of ARTIFACT (default: the densest), switch in place to --to, "
                                   "print the elements/bytes written and the modelled switch cost; with --recipe "
                                   "and --eval, evaluate the level on the recipe's eval data.")
    s.add_argument("artifact", help="shared.safetensors written by `prunekit shared`")
    s.add_argument("--from", dest="src", type=int, default=-1, help="level to load first (0 = sparsest; -1 = densest)")
    s.add_argument("--to", dest="dst", type=int, required=True, help="level to switch to")
    s.add_argument("--recipe", default=None, help="recipe to rebuild the model (default: the one in the artifact)")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key (dotted), e.g. --set data.limit=1000")
    s.add_argument("--eval", action="store_true", help="evaluate the model at --to")
    s.set_defaults(func=switch)


def run(args) -> int:

    recipe = load_recipe(args.recipe, args.overrides)
    out = Path(args.out or Path("runs") / f"{recipe.name}-shared")
    res = run_shared(recipe, out, levels=args.levels, mode=args.mode, schedule=args.schedule, resume=args.resume,
                     checkpoint_every=args.checkpoint_every)
    print(levels_table(res["levels"]))
    print(json.dumps({"out": str(out), "artifact": res["artifact"], "dense_score": res["dense_score"],
                      "breakeven_sparsity": round(res["breakeven"]["model_breakeven_sparsity"], 6)}, indent=2))
    return 0


def levels_table(rows: list[dict]) -> str:
    """Markdown table of the levels (level, sparsity, metric, score, switch bytes, full rewrite, latency)."""
    lines = ["| level | sparsity | metric | score | switch bytes from previous | full rewrite bytes | latency ms |",
             "|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        sb = "—" if r["switch_bytes_from_previous"] is None else f"{r['switch_bytes_from_previous']:,}"
        lines.append(f"| {r['level']} | {100 * r['sparsity']:.2f}% | {r['metric']} | {r['score']:.2f} | {sb} | "
                     f"{r['full_rewrite_bytes']:,} | {r['latency_ms']:.3f} |")
    return "\n".join(lines)


def switch(args) -> int:

    _, nested, manifest = read_shared(args.artifact)
    if args.recipe:
        recipe = load_recipe(args.recipe, args.overrides)
    else:
        raw = manifest.get("extra", {}).get("recipe")
        if not raw:
            raise RecipeError(f"{args.artifact} holds no recipe; pass --recipe")
        raw = {k: v for k, v in raw.items()}
        raw["model"] = {**raw["model"], "checkpoint": None}
        recipe = parse_recipe(raw, args.overrides)
    wl = build_workload(recipe)
    swm = load_level(args.artifact, args.src, wl.model)
    src = swm.level
    rec = swm.switch(args.dst)
    params = dict(wl.model.named_parameters())
    dtypes = {n: params[n].dtype for n in nested.names()}
    other = sum(p.numel() * p.element_size() for n, p in params.items() if n not in dtypes)
    cost = switch_cost(nested, src, rec.dst, dtypes, other_bytes=other)
    out = {"from": src, "to": rec.dst, "sparsity": nested[rec.dst].sparsity(),
           "elements_written_in_place": rec.elements_written, "bytes_written_in_place": rec.bytes_written,
           "switch_patch_bytes": cost["switch_bytes"], "index_bytes": cost["index_bytes"],
           "full_rewrite_bytes": cost["full_rewrite_bytes"], "ratio_vs_full": round(cost["ratio_vs_full"], 6),
           "switch_ms": round(rec.seconds * 1000, 3)}
    if args.eval:
        m = wl.task.evaluate(wl.model, wl.eval_loader)
        out[wl.task.metric] = m[wl.task.metric]
    print(json.dumps(out, indent=2))
    return 0
