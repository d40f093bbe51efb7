"""``prunekit run RECIPE.yaml [--set k=v ...] [--out DIR] [--resume] [--checkpoint-every N] [--nproc K]``"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from prunekit.core.errors import RecipeError
from prunekit.pipelines.recipe import load_recipe
from prunekit.pipelines.runner import run_pipeline


def add_parser(sub):
    p = sub.add_parser("run", help="run a pruning recipe end to end (train/load → prune → retrain → results)",
                       description="Run a YAML recipe: dense training (or model.checkpoint), the algorithm's phase, "
                                   "hard-prune, retraining; writes results.json, model.safetensors, masks.safetensors, "
                                   "manifest.json and the resolved recipe.yaml into --out.  The run state is "
                                   "checkpointed into --out/state after every epoch (and every --checkpoint-every "
                                   "steps); after a crash, rerun the same command with --resume.")
    p.add_argument("recipe", help="recipe YAML (see recipes/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value by dotted key, e.g. --set train.epochs=1 --set data.limit=2000")
    p.add_argument("--out", default=None, help="output folder (default: runs/<recipe name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished run in --out from its newest good checkpoint (fresh start if none)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="also checkpoint every N optimizer steps (default: recipe key checkpoint_every; 0 = per epoch)")
    p.add_argument("--nproc", type=int, default=1, metavar="K",
                   help="data-parallel over K local processes (spawns torchrun; gloo on CPU, nccl on GPUs)")
    p.set_defaults(func=run)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(args) -> int:
    """Re-launch this command under torchrun with K processes (``--nproc`` dropped)."""
    argv = [args.recipe, *sum((["--set", o] for o in args.overrides), [])]
    if args.out:
        argv += ["--out", args.out]
    if args.resume:
        argv += ["--resume"]
    if args.checkpoint_every is not None:
        argv += ["--checkpoint-every", str(args.checkpoint_every)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={args.nproc}",
           f"--master_port={_free_port()}", "-m", "prunekit.cli.main", "run", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(cmd, env=env)


def run(args) -> int:

    if args.nproc < 1:
        raise RecipeError(f"--nproc must be >= 1, got {args.nproc}")
    if args.checkpoint_every is not None and args.checkpoint_every < 0:
        raise RecipeError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    recipe = load_recipe(args.recipe, args.overrides)   # fails before any work on a bad key/value
    if args.nproc > 1:
        return _spawn(args)
    out = Path(args.out or Path("runs") / recipe.name)
    res = run_pipeline(recipe, out, resume=args.resume, checkpoint_every=args.checkpoint_every)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    m = res["metric"]
    summary = {"out": str(out), m: res["score"], f"dense_{m}": res["dense_score"],
               f"{m}_after_hard_prune": res["score_after_hard_prune"], "sparsity": round(res["sparsity"], 6),
               "compression_rate": round(res["compression_rate"], 4)}
    if "distributed" in res:
        summary["world_size"] = res["distributed"]["world_size"]
        summary["ranks_identical"] = res["distributed"]["ranks_identical"]
    print(json.dumps(summary, indent=2))
    return 0
