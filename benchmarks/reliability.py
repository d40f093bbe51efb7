"""Reliability benchmark: kill-and-resume of a LeNet-5 ADMM run, and 2-process data-parallel throughput.

    python benchmarks/reliability.py [--quick]

Writes ``benchmarks/results/reliability.json`` (``rows``: ``case``, ``outcome``, ``seconds_lost``, ...).

* ``uninterrupted``: ``prunekit run recipes/lenet5_admm.yaml`` (MNIST subset, 1 epoch per phase,
  ``--checkpoint-every 4``) — the reference.
* ``kill@<phase>:<step>`` (5 points: dense mid-epoch, at the dense→ADMM boundary, ADMM early, ADMM late,
  retraining): the same command with ``PRUNEKIT_TEST_KILL_AT_STEP`` (SIGKILL right after that optimizer
  step), then ``--resume``.  ``outcome`` = ``identical`` when final ``model.safetensors`` and
  ``masks.safetensors`` are byte-identical to the reference and the final accuracy is equal;
  ``seconds_lost`` = wall(killed run) + wall(resumed run) − wall(uninterrupted run): redone steps plus
  one extra process start-up (wall of the uninterrupted run = mean of two such runs, the second also
  checked byte-identical to the first); ``steps_redone`` = kill step − step of the checkpoint resumed from.
* ``corrupt-latest``: after a kill, the newest checkpoint is truncated; resume falls back to the previous.
* ``ddp-1proc`` / ``ddp-2proc``: dense training only (same global batch), training examples per second of
  the dense phase (``results.seconds.dense``), 2 processes ``--nproc 2`` (torchrun, gloo) vs 1.
Each process runs with ``OMP_NUM_THREADS=1``.  The machine is shared, so wall-clock numbers are noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "lenet5_admm.yaml"


def cli(args, kill_at=None):
    env = {**os.environ, "PRUNEKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PRUNEKIT_TEST_KILL_AT_STEP", None)
    if kill_at is not None:
        env["PRUNEKIT_TEST_KILL_AT_STEP"] = str(kill_at)
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "prunekit.cli.main", *args], capture_output=True, text=True, env=env,
                       cwd=ROOT)
    return r, time.perf_counter() - t


def same(a: Path, b: Path) -> tuple[bool, float, float]:
    ra, rb = json.loads((a / "results.json").read_text()), json.loads((b / "results.json").read_text())
    files = all((a / f).read_bytes() == (b / f).read_bytes() for f in ("model.safetensors", "masks.safetensors"))
    return files and ra["score"] == rb["score"], ra["score"], rb["score"]


def add_steps_redone(rows: list[dict]) -> None:
    """``steps_redone`` = kill step − step of the checkpoint resumed from (load-independent measure of lost work)."""
    import re  # noqa: PLC0415
    for r in rows:
        k = re.search(r"global step (\d+)", r.get("case", ""))
        c = re.search(r"step (\d+)\)", r.get("resumed_from") or "")
        if k and c:
            r["steps_redone"] = int(k[1]) - int(c[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    limit, bs = (512, 64) if a.quick else (2048, 64)
    steps = limit // bs                         # per phase (1 epoch each)
    sets = ["--set", f"data.limit={limit}", "--set", f"data.batch_size={bs}", "--set", "data.eval_batch_size=1000",
            "--set", "train.epochs=1", "--set", "dense.epochs=1", "--set", "search.epochs=1",
            "--set", "retrain.epochs=1", "--set", f"algorithm.params.update_every={max(2, steps // 4)}",
            "--set", "prune.sparsity=0.9"]
    every = 4
    tmp = Path(tempfile.mkdtemp(prefix="prunekit-rel-"))
    rows = []
    ref = tmp / "ref"
    r, t_ref = cli(["run", str(RECIPE), *sets, "--out", str(ref), "--checkpoint-every", str(every)])
    assert r.returncode == 0, r.stderr
    ref_res = json.loads((ref / "results.json").read_text())
    rows.append({"case": "uninterrupted", "outcome": "reference", "seconds_lost": 0.0, "wall_s": round(t_ref, 2),
                 "accuracy": ref_res["score"], "sparsity": ref_res["sparsity"]})
    print(rows[-1], flush=True)
    points = {"dense-mid": steps // 2 + 1, "dense-end/boundary": steps, "admm-early": steps + 3,
              "admm-late": 2 * steps - 1, "retrain-mid": 2 * steps + steps // 2 + 1}
    for name, k in points.items():
        out = tmp / name.replace("/", "_")
        r1, t1 = cli(["run", str(RECIPE), *sets, "--out", str(out), "--checkpoint-every", str(every)], kill_at=k)
        killed = r1.returncode == -9
        r2, t2 = cli(["run", str(RECIPE), *sets, "--out", str(out), "--checkpoint-every", str(every), "--resume"])
        ok = r2.returncode == 0 and killed
        ident, s_ref, s_got = same(ref, out) if ok else (False, ref_res["score"], None)
        rows.append({"case": f"kill@{name} (global step {k})", "outcome": "identical" if ident else "DIFFERS" if ok else "failed",
                     "seconds_lost": round(t1 + t2 - t_ref, 2), "killed_wall_s": round(t1, 2),
                     "resume_wall_s": round(t2, 2), "accuracy": s_got, "reference_accuracy": s_ref,
                     "resumed_from": next((l for l in r2.stdout.splitlines() if l.startswith("resuming")), None)})
        print(rows[-1], flush=True)
    # corrupt newest checkpoint → fall back
    out = tmp / "corrupt"
    r1, t1 = cli(["run", str(RECIPE), *sets, "--out", str(out), "--checkpoint-every", str(every)], kill_at=steps + 6)
    cks = sorted((out / "state").glob("ckpt-*"))
    f = cks[-1] / "state.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    r2, t2 = cli(["run", str(RECIPE), *sets, "--out", str(out), "--checkpoint-every", str(every), "--resume"])
    ident = r2.returncode == 0 and same(ref, out)[0]
    rows.append({"case": f"kill + truncated newest checkpoint (global step {steps + 6})",
                 "outcome": "identical (fell back)" if ident and "falling back" in r2.stdout else "DIFFERS",
                 "seconds_lost": round(t1 + t2 - t_ref, 2), "killed_wall_s": round(t1, 2), "resume_wall_s": round(t2, 2),
                 "resumed_from": next((l for l in r2.stdout.splitlines() if l.startswith("resuming")), None)})
    print(rows[-1], flush=True)
    # DDP throughput, dense phase only, same global batch
    dsets = ["--set", f"data.limit={limit}", "--set", f"data.batch_size={bs}", "--set", "dense.epochs=2",
             "--set", "retrain.epochs=0", "--set", "algorithm.name=oneshot", "--set", "algorithm.params={}",
             "--set", "data.eval_batch_size=1000"]
    thr = {}
    for n in (1, 2):
        out = tmp / f"ddp{n}"
        r, t = cli(["run", str(RECIPE), *dsets, "--out", str(out), "--nproc", str(n)])
        assert r.returncode == 0, r.stderr[-2000:]
        res = json.loads((out / "results.json").read_text())
        thr[n] = 2 * limit / res["seconds"]["dense"]
        rows.append({"case": f"ddp-{n}proc dense training", "outcome": "ok" + (
            f", ranks identical={res['distributed']['ranks_identical']}" if n > 1 else ""), "seconds_lost": None,
            "examples_per_s": round(thr[n], 1), "speedup_vs_1proc": round(thr[n] / thr[1], 3),
            "dense_seconds": round(res["seconds"]["dense"], 2), "wall_s": round(t, 2), "accuracy": res["dense_score"]})
        print(rows[-1], flush=True)
    # second uninterrupted run: same bytes? and a second timing, so seconds_lost uses the mean of both
    ref2 = tmp / "ref2"
    r, t_ref2 = cli(["run", str(RECIPE), *sets, "--out", str(ref2), "--checkpoint-every", str(every)])
    assert r.returncode == 0, r.stderr
    rows.append({"case": "uninterrupted, second run", "outcome": "identical" if same(ref, ref2)[0] else "DIFFERS",
                 "seconds_lost": 0.0, "wall_s": round(t_ref2, 2)})
    t_mean = (t_ref + t_ref2) / 2
    for row in rows:
        if "killed_wall_s" in row or "resume_wall_s" in row:
            row["seconds_lost"] = round(row["killed_wall_s"] + row["resume_wall_s"] - t_mean, 2)
    shutil.rmtree(tmp, ignore_errors=True)
    add_steps_redone(rows)
    doc = {"command": " ".join(["python", *sys.argv]),
           "machine": {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
                       "cpus": os.cpu_count(), "threads_per_process": 1, "torch": torch.__version__},
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "settings": {"recipe": str(RECIPE.relative_to(ROOT)), "overrides": sets, "checkpoint_every": every,
                        "steps_per_phase": steps},
           "notes": "seconds_lost includes one extra process start-up (~imports + data load) besides the redone "
                    "steps. Shared 2-core machine with other jobs running: DDP on 2 processes cannot beat 1 "
                    "process here; the numbers show overhead, not scaling.",
           "rows": rows}
    dest = ROOT / "benchmarks" / "results" / "reliability.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
