"""How the cost of post-training pruning grows: wall time and measured peak memory of Wanda and SparseGPT
(2:4) on Llama-style decoders of growing width (fixed depth), in memory and offloaded (one block at a time
from the safetensors shards), plus the number of calibration sequences at one width — and the offloaded
run checked against the in-memory one (masks identical, weights within 1e-6).

    nice -n 10 python benchmarks/scale.py                       # → benchmarks/results/scale.json
    python benchmarks/scale.py --widths 512 1024 --seqs 32      # a quicker subset

Models: ``LlamaForCausalLM``, ``--depth`` layers (default 4), width ``d`` (heads of 64), MLP ``8d/3`` rounded
to 64 (block parameters ≈ 12·d² per layer: at depth 4, d = 512 / 1024 / 2048 → 12.6 M / 50 M / 201 M in the
blocks, 45 M / 117 M / 332 M with the embeddings; the issue's 25 M … 1.6 B at depth 8 take hours on 2 shared
cores — ``--depth 8 --widths 512 1024 2048 4096`` runs them where there is time), ``--vocab`` tokens (untied embeddings and LM head, which stay dense), random weights (seeded),
saved once as shards of 500 MB under ``--cache``.  Calibration: ``--seqs`` (default 8) random token windows of
``--seq-len`` tokens (seeded); the sweep over their number (32 / 128 / 512) runs at ``--sweep-width`` (default
128: on 2 shared cores 512 sequences at a larger width take too long).  Every run is a fresh subprocess (1 thread): ``seconds`` = the pruning
call (calibration forwards + statistics + pruning; offloaded: the sum over blocks of reading, pruning and
writing each block), ``total_seconds`` = + loading (in memory: ``from_pretrained``; offloaded: building the
empty model, capturing the first block's inputs, copying the embeddings/LM head, writing the index),
``peak_mb`` = its peak resident memory (``getrusage`` max RSS, measured), ``base_mb`` = the RSS after
the imports, before the model.  Offloaded runs keep ``--budget`` bytes (default 4 MiB: small, so that
spilling is exercised) of activations in memory, the rest spilled to disk.  The fitted exponent is the least-squares slope of log(seconds) on log(d) per method
and mode; the theory per layer: Wanda O(n·d²) (statistics) + O(d²) (scores), SparseGPT O(n·d²) + O(d³)
(the Hessian inverse and the column sweep).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "scale.json"


def _rss_mb() -> float:
    """Peak resident memory of this process (MB): ``VmHWM`` of its own address space (Linux).  ``getrusage``'s
    ``ru_maxrss`` is the fallback only: Linux carries it over from the parent through fork and exec, so a
    worker started by a big parent would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------------------------- worker (subprocess)
def _config(d: int, depth: int, vocab: int, seq_len: int):
    import transformers
    ff = int(round(8 * d / 3 / 64)) * 64
    return transformers.LlamaConfig(hidden_size=d, intermediate_size=ff, num_hidden_layers=depth,
                                    num_attention_heads=max(d // 64, 1), num_key_value_heads=max(d // 64, 1),
                                    vocab_size=vocab, max_position_embeddings=seq_len, tie_word_embeddings=False)


def worker(a: argparse.Namespace) -> dict:
    import torch
    torch.set_num_threads(1)
    import transformers

    from prunekit.algorithms.calibration import run_blockwise
    from prunekit.algorithms.offload import prune_offloaded
    from prunekit.algorithms.sparsegpt import SparseGPT
    from prunekit.algorithms.wanda import Wanda
    from prunekit.core.masks import MaskSet
    from prunekit.core.plan import PruneSpec
    from prunekit.core.targets import TargetSpec
    _ = transformers.LlamaForCausalLM, transformers.AutoModelForCausalLM     # import the model code first
    __import__("accelerate.utils")
    base = _rss_mb()
    folder, out = Path(a.folder), Path(a.out)
    if a.mode == "make":
        torch.manual_seed(0)
        m = transformers.LlamaForCausalLM(_config(a.width, a.depth, a.vocab, a.seq_len))
        m.save_pretrained(folder, max_shard_size="500MB")
        return {"params": sum(p.numel() for p in m.parameters()),
                "block_params": sum(p.numel() for p in m.model.layers.parameters())}
    cls = {"wanda": Wanda, "sparsegpt": SparseGPT}[a.method]
    spec = PruneSpec("nm:2:4", 0.5, targets=TargetSpec([r"re:^model\.layers\.\d+\."], [], ["Linear"]))
    algo = cls(cls.Params(), spec)
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, a.vocab, (min(a.batch, a.seqs - i), a.seq_len), generator=g)}
               for i in range(0, a.seqs, a.batch)]
    t0 = time.perf_counter()
    if a.mode == "memory":
        m = transformers.LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
        t1 = time.perf_counter()
        targets, make = algo.block_pruner(m, batches)
        run_blockwise(m, batches, targets, make(MaskSet()), hessian=algo.hessian)
        seconds = time.perf_counter() - t1
        if a.save:
            m.save_pretrained(out, max_shard_size="500MB")
        extra: dict = {"total_seconds": time.perf_counter() - t0}
    else:
        res = prune_offloaded(folder, out, algo, batches, activation_budget=a.budget)
        total = time.perf_counter() - t0
        seconds = sum(res.block_seconds)
        extra = {"total_seconds": total, "spilled_batches": res.spilled_batches,
                 "block_seconds": [round(s, 2) for s in res.block_seconds]}
    return {"seconds": seconds, "peak_mb": _rss_mb(), "base_mb": base, **extra}


# --------------------------------------------------------------------------------------------- driver
def _run(args: list[str], timeout: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, env=env,
                       timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _model(cache: Path, d: int, a: argparse.Namespace) -> tuple[Path, dict]:
    folder = cache / f"llama_d{d}_L{a.depth}_v{a.vocab}"
    info_f = folder / "scale_info.json"
    if not info_f.is_file():
        shutil.rmtree(folder, ignore_errors=True)
        info = _run(["--mode", "make", "--folder", str(folder), "--width", str(d), "--depth", str(a.depth),
                     "--vocab", str(a.vocab), "--seq-len", str(a.seq_len)], a.timeout)
        info_f.write_text(json.dumps(info))
    return folder, json.loads(info_f.read_text())


def _row(folder: Path, out: Path, method: str, mode: str, seqs: int, a: argparse.Namespace, save: bool) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    args = ["--mode", mode, "--method", method, "--folder", str(folder), "--out", str(out), "--seqs", str(seqs),
            "--batch", str(a.batch), "--seq-len", str(a.seq_len), "--vocab", str(a.vocab),
            "--budget", str(a.budget)] + (["--save"] if save else [])
    r = _run(args, a.timeout)
    print(json.dumps({"method": method, "mode": mode, "seqs": seqs, **r}), flush=True)
    return r


def compare(mem: Path, off: Path) -> dict:
    """Masks (the zero patterns of the pruned matrices, and the offloaded run's mask files) and weights, one
    tensor at a time."""
    import torch
    from safetensors.torch import load_file

    from prunekit.algorithms.offload import MASK_DIR
    from prunekit.io.sharded import ShardReader
    rm, ro = ShardReader(mem), ShardReader(off)
    if sorted(rm.names()) != sorted(ro.names()):
        return {"same_names": False}
    max_diff, masks_equal, n_masks = 0.0, True, 0
    for n in rm.names():
        x, y = rm.load([n])[n], ro.load([n])[n]
        max_diff = max(max_diff, float((x.float() - y.float()).abs().max()))
        masks_equal &= bool(torch.equal(x != 0, y != 0))
    for f in sorted((off / MASK_DIR).glob("*.safetensors")):
        for n, m in load_file(str(f)).items():
            n_masks += 1
            masks_equal &= bool(torch.equal(m, rm.load([n])[n] != 0))
    return {"same_names": True, "masks_identical": masks_equal, "mask_tensors": n_masks,
            "max_abs_weight_diff": max_diff}


def fit_exponent(xs: list[float], ys: list[float]) -> float | None:
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    return sum((px - mx) * (py - my) for px, py in pts) / sum((px - mx) ** 2 for px, _ in pts)


def predicted_peak_mb(d: int, a: argparse.Namespace, seqs: int, base_mb: float, method: str) -> float:
    """The memory formula of docs/big_models.md for an offloaded run (MB): the base + the embeddings + the
    largest of (one block, twice while it is read + its statistics + pruning one matrix + activations in
    memory + one batch through the block) and (the LM head, twice, during the final copy).  Allocator caching
    comes on top."""
    ff = int(round(8 * d / 3 / 64)) * 64
    emb = head = a.vocab * d * 4
    block = (4 * d * d + 3 * d * ff) * 4
    if method == "sparsegpt":
        stats = (6 * d * d + ff * ff) * 8                  # one float64 Hessian per target
        work = 5 * ff * ff * 8 + 2 * d * ff * 4            # H, I, L, H⁻¹, U (float64) + W copies, largest target
    else:
        stats = (6 * d + ff) * 8
        work = d * ff * (4 + 8 + 1)                        # scores, argsort indices, mask
    acts = min(2 * seqs * a.seq_len * d * 4, a.budget)
    batch = a.batch * a.seq_len * (4 * d + 2 * ff) * 4 + a.batch * max(d // 64, 1) * a.seq_len ** 2 * 4
    # reading a block (or the LM head) maps its bytes from the shard file while the copy is made: counted twice
    return base_mb + (emb + max(2 * block + stats + work + acts + batch, 2 * head)) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="memory")
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--folder", default="")
    ap.add_argument("--out", default="")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--save", action="store_true")
    ap.add_argument("--widths", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--seqs", type=int, default=8, help="calibration sequences of the width sweep")
    ap.add_argument("--seq-sweep", type=int, nargs="*", default=[32, 128, 512])
    ap.add_argument("--sweep-width", type=int, default=128, help="width of the calibration-sequence sweep")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--budget", type=int, default=4 * 2**20, help="offloaded: activation bytes in memory")
    ap.add_argument("--equal-width", type=int, default=None, help="width of the in-memory vs offloaded check "
                    "(default: the largest)")
    ap.add_argument("--cache", default=os.environ.get("PRUNEKIT_SCALE_CACHE", "/tmp/prunekit_scale"))
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--out-json", default=str(OUT))
    ap.add_argument("--part", choices=("all", "seqs"), default="all",
                    help="seqs: rerun only the calibration-sequence sweep into an existing --out-json")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a)), flush=True)
        return
    sys.path.insert(0, str(ROOT / "src"))
    from prunekit.pipelines.runner import machine_info
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    eq_w = a.equal_width or max(a.widths)
    result: dict = {"command": " ".join(["python", *map(shlex.quote, sys.argv)]), "machine": machine_info(),
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "setup": {"depth": a.depth, "vocab": a.vocab, "seq_len": a.seq_len, "batch": a.batch,
                              "structure": "nm:2:4", "threads": 1, "budget_bytes": a.budget,
                              "calibration_sequences": a.seqs},
                    "widths": [], "seq_sweep": [], "equivalence": None}
    out_json = Path(a.out_json)

    def save() -> None:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(result, indent=2))

    if a.part == "seqs":
        result = {**json.loads(out_json.read_text()), "seq_sweep": [], "seq_sweep_command": result["command"]}
    else:
        _width_sweep(a, cache, eq_w, result, save)
    d0 = a.sweep_width
    folder, info = _model(cache, d0, a)
    for seqs in a.seq_sweep:
        row = {"width": d0, "seqs": seqs, "runs": {}}
        for method in ("wanda", "sparsegpt"):
            for mode in ("memory", "offload"):
                row["runs"][f"{method}/{mode}"] = _row(folder, cache / f"out_{mode}", method, mode, seqs, a, False)
        result["seq_sweep"].append(row)
        save()
    shutil.rmtree(cache / "out_memory", ignore_errors=True)
    shutil.rmtree(cache / "out_offload", ignore_errors=True)
    print(json.dumps({"exponents": result["exponents"], "equivalence": result["equivalence"]}, indent=2))


def _width_sweep(a: argparse.Namespace, cache: Path, eq_w: int, result: dict, save) -> None:
    for d in a.widths:
        folder, info = _model(cache, d, a)
        row = {"width": d, **info, "runs": {}}
        for method in ("wanda", "sparsegpt"):
            for mode in ("memory", "offload"):
                keep = d == eq_w and method == "sparsegpt"
                r = _row(folder, cache / f"out_{mode}", method, mode, a.seqs, a, save=keep)
                if mode == "offload":
                    r["predicted_peak_mb"] = round(predicted_peak_mb(d, a, a.seqs, r["base_mb"], method), 1)
                row["runs"][f"{method}/{mode}"] = r
            if d == eq_w and method == "sparsegpt":
                result["equivalence"] = {"width": d, "params": info["params"], "method": "sparsegpt",
                                         "budget_bytes": a.budget, **compare(cache / "out_memory", cache / "out_offload"),
                                         "memory": row["runs"]["sparsegpt/memory"],
                                         "offload": row["runs"]["sparsegpt/offload"]}
        result["widths"].append(row)
        save()
    ws = [r["width"] for r in result["widths"]]
    result["exponents"] = {f"{m}/{mode}": fit_exponent(ws, [r["runs"][f"{m}/{mode}"]["seconds"] for r in result["widths"]])
                           for m in ("wanda", "sparsegpt") for mode in ("memory", "offload")}
    result["theory"] = {"wanda": "2 (n·d² statistics and d² scores per layer)",
                        "sparsegpt": "between 2 (n·d² statistics, n >> d) and 3 (d³ inverse and sweep per layer)"}
    save()


if __name__ == "__main__":
    main()
