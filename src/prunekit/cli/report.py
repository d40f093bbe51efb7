"""``prunekit report RUN_DIR...`` — one run: its per-layer table and headline numbers.  Several runs: the
methods × tasks table, a per-run summary, shared-weight level tables, and PNG plots (score vs sparsity,
per-layer sparsity heatmap, latency vs sparsity) printed and written to ``--out`` (default: the first
run's parent ``report/``) as ``report.md`` + PNGs.  ``--plots`` also draws them for a single run."""
from __future__ import annotations

import json
from pathlib import Path

from prunekit.core.errors import RecipeError
from prunekit.reporting.runs import LOWER_IS_BETTER, build_report, levels_table, load_run, quant_markdown
from prunekit.reporting.tables import format_table


def add_parser(sub):
    p = sub.add_parser("report", help="per-layer table of one run; tables + PNG plots comparing several runs",
                       description="With one RUN_DIR: print its headline numbers and per-layer sparsity table. "
                                   "With several: print a methods × tasks table (GLUE-paper layout), a summary "
                                   "and shared-weight level tables, and write report.md + PNG plots to --out.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="folders written by `prunekit run`")
    p.add_argument("--out", default=None,
                   help="folder for report.md and the PNGs (default: <first run's parent>/report)")
    p.add_argument("--plots", action="store_true", help="also write report.md + PNGs for a single run")
    p.set_defaults(func=run)


def load_results(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (is {run_dir} a `prunekit run` output folder?)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RecipeError(f"{path} is not valid JSON: {e}") from None


def render(res: dict, run_dir: str | Path | None = None) -> str:

    m = res.get("metric", "metric")
    if m in LOWER_IS_BETTER:
        m = f"{m} (lower is better)"
    if "score" not in res and res.get("levels") and run_dir is not None:   # shared-weight run
        dense = res.get("dense_score")
        return (f"## {res.get('name', 'run')} (shared weights, {len(res['levels'])} levels)\n\n"
                + (f"- dense {m}: {dense:.4f}\n\n" if isinstance(dense, (int, float)) else "")
                + levels_table(load_run(run_dir)) + "\n")
    head = [f"## {res.get('name', 'run')}", "",
            f"- {m}: dense {res['dense_score']:.4f} → after hard-prune {res['score_after_hard_prune']:.4f} → final {res['score']:.4f}",
            f"- targeted sparsity {100 * res['sparsity']:.2f}%, whole-model compression rate {res['compression_rate']:.3f}× "
            f"({res['nonzero_params']:,} of {res['params']:,} parameters nonzero)"]
    if "flops" in res:
        head.append(f"- FLOPs {res['flops']:,} dense, {res['nonzero_flops']:,} nonzero ({res['flop_reduction']:.2f}× fewer)")
    out = "\n".join(head) + "\n\n" + format_table(res["layers"]) + "\n"
    if res.get("quant"):
        out += "\n" + quant_markdown(res["quant"])
    if res.get("levels") and run_dir is not None:
        out += "\n" + levels_table(load_run(run_dir)) + "\n"
    return out


def run(args) -> int:
    if len(args.run_dirs) == 1 and not args.plots:
        d = args.run_dirs[0]
        print(render(load_results(d), d))
        return 0

    rep = build_report(args.run_dirs, args.out)
    print(rep["markdown"])
    print(f"\nwrote {', '.join(rep['files'])}")
    return 0
