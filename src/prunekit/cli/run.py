"""``prunekit run RECIPE.yaml [--set k=v ...] [--out DIR] [--resume | --overwrite] [--checkpoint-every N] [--nproc K]
[--device D] [--precision P] [--threads T]``

Ctrl-C or SIGTERM stop the run after any checkpoint being written is whole and print the exact command
that resumes it; the exit status is 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM)."""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

from prunekit.core.errors import RecipeError
from prunekit.pipelines.offloaded import run_offloaded
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
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished run in --out (its files, including compact/ and tb/, are removed first, "
                        "after the recipe has been validated)")
    p.add_argument("--device", default=None, metavar="D",
                   help="auto | cpu | cuda | cuda:N | mps (default: recipe key device, auto = CUDA when available)")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"],
                   help="autocast precision (default: recipe key precision, fp32); fp16 needs CUDA")
    p.add_argument("--threads", type=int, default=None, metavar="T",
                   help="CPU threads for torch (torch.set_num_threads; default: recipe key threads, else torch's)")
    p.add_argument("--nproc", type=int, default=1, metavar="K",
                   help="data-parallel over K local processes (spawns torchrun; gloo on CPU, nccl on GPUs)")
    p.set_defaults(func=run)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flag_overrides(args) -> list[str]:
    """``--device/--precision/--threads`` as recipe overrides (so they land in the resolved recipe)."""
    out = []
    for key in ("device", "precision", "threads"):
        v = getattr(args, key, None)
        if v is not None:
            out.append(f"{key}={v}")
    return out


def resume_command(args, out: Path) -> str:
    """The exact command that continues this run."""
    argv = ["prunekit", "run", args.recipe, *sum((["--set", o] for o in args.overrides), []), "--out", str(out)]
    for key in ("device", "precision", "threads"):
        if getattr(args, key, None) is not None:
            argv += [f"--{key}", str(getattr(args, key))]
    if args.checkpoint_every is not None:
        argv += ["--checkpoint-every", str(args.checkpoint_every)]
    if args.nproc > 1:
        argv += ["--nproc", str(args.nproc)]
    return shlex.join(argv + ["--resume"])


class Stopped(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so the same cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_sigterm(signum, _frame):
    raise Stopped(signum)


def _spawn(args) -> int:
    """Re-launch this command under torchrun with K processes (``--nproc`` dropped)."""
    argv = [args.recipe, *sum((["--set", o] for o in args.overrides + _flag_overrides(args)), [])]
    if args.out:
        argv += ["--out", args.out]
    if args.resume:
        argv += ["--resume"]
    if args.overwrite:
        argv += ["--overwrite"]
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
    if args.resume and args.overwrite:
        raise RecipeError("--resume and --overwrite exclude each other")
    recipe = load_recipe(args.recipe, args.overrides + _flag_overrides(args))   # fails before any work on a bad key/value
    out = Path(args.out or Path("runs") / recipe.name)
    if args.nproc > 1:
        return _interruptible(args, out, lambda: _spawn(args))
    if recipe.calibration.offload or recipe.calibration.max_memory is not None:   # block by block from the shards
        res = _interruptible(args, out, lambda: run_offloaded(recipe, out, resume=args.resume))
    else:
        res = _interruptible(args, out, lambda: run_pipeline(recipe, out, resume=args.resume,
                                                             overwrite=args.overwrite,
                                                             checkpoint_every=args.checkpoint_every))
    if isinstance(res, int):
        return res
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


def _interruptible(args, out: Path, work):
    """Run ``work()``; on Ctrl-C/SIGTERM print how to resume and return 128 + the signal number."""
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return work()
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        if int(os.environ.get("RANK", "0")) == 0:
            name = signal.Signals(signum).name
            if not (out / "state").is_dir():       # stopped before the first checkpoint (a started folder is removed)
                print(f"\nprunekit run: stopped by {name} before the first checkpoint; nothing to resume",
                      file=sys.stderr, flush=True)
                return 128 + int(signum)
            print(f"\nprunekit run: stopped by {name}; the run state in {out / 'state'} is intact "
                  f"(checkpoints are written whole or not at all).  Resume with:\n  {resume_command(args, out)}",
                  file=sys.stderr, flush=True)
        return 128 + int(signum)
    finally:
        signal.signal(signal.SIGTERM, old)
