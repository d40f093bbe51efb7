"""``prunekit report RUN_DIR`` — print the per-layer table and headline numbers of a run."""
from __future__ import annotations

import json
from pathlib import Path


def add_parser(sub):
    p = sub.add_parser("report", help="print the per-layer sparsity table and headline numbers of run folders")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="folders written by `prunekit run`")
    p.set_defaults(func=run)


def load_results(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (is {run_dir} a `prunekit run` output folder?)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def render(res: dict) -> str:
    from prunekit.report import format_table

    m = res.get("metric", "metric")
    head = [f"## {res.get('name', 'run')}", "",
            f"- {m}: dense {res['dense_score']:.4f} → after hard-prune {res['score_after_hard_prune']:.4f} → final {res['score']:.4f}",
            f"- targeted sparsity {100 * res['sparsity']:.2f}%, whole-model compression rate {res['compression_rate']:.3f}× "
            f"({res['nonzero_params']:,} of {res['params']:,} parameters nonzero)"]
    if "flops" in res:
        head.append(f"- FLOPs {res['flops']:,} dense, {res['nonzero_flops']:,} nonzero ({res['flop_reduction']:.2f}× fewer)")
    return "\n".join(head) + "\n\n" + format_table(res["layers"]) + "\n"


def run(args) -> int:
    for d in args.run_dirs:
        print(render(load_results(d)))
    return 0
