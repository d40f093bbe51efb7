"""GPU check (issue 14): one command, < 8 min, never required by the test suite.

    PYTHONPATH=src python benchmarks/gpu_check.py        # → benchmarks/results/gpu.json

With CUDA: (1) the device tests (``pytest -m gpu``), (2) a MiniLM-L6 SST-2 prune-and-retrain run on the
GPU (small subset, bf16), (3) training throughput of prunekit's ``fit`` vs a plain PyTorch loop on the
same model and batches (MiniLM, dense and hard-pruned), (4) 2:4 semi-structured sparse inference
(``torch.sparse.to_sparse_semi_structured``) vs dense on a BERT-base-shaped encoder (fp16).
Without CUDA it writes a JSON saying so and exits 0.  Each part records its error instead of stopping.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

from prunekit.pipelines.runner import machine_info

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "gpu.json"
sys.path.insert(0, str(ROOT / "benchmarks"))


def _part(doc: dict, name: str, fn) -> None:
    t0 = time.perf_counter()
    try:
        doc[name] = fn()
    except Exception as e:   # noqa: BLE001  (a failed part is recorded, the others still run)
        doc[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    doc[name]["seconds"] = round(time.perf_counter() - t0, 1)
    OUT.write_text(json.dumps(doc, indent=2) + "\n")


def gpu_tests() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PRUNEKIT_NO_PROGRESS": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=240)
    return {"returncode": r.returncode, "tail": r.stdout[-1500:]}


def minilm_run() -> dict:
    from prunekit.pipelines.recipe import parse_recipe
    from prunekit.pipelines.runner import run_pipeline
    raw = {"name": "gpu-minilm", "seed": 0, "task": "glue", "device": "cuda", "precision": "bf16",
           "model": {"name": "minilm-l6"}, "data": {"name": "sst2", "limit": 2000, "eval_limit": 872,
                                                     "batch_size": 32, "max_length": 64},
           "prune": {"structure": "unstructured", "sparsity": 0.5}, "algorithm": {"name": "oneshot"},
           "train": {"optimizer": "adamw", "lr": 5e-5, "epochs": 1, "scheduler": "linear"}}
    with tempfile.TemporaryDirectory() as d:
        res = run_pipeline(parse_recipe(raw), Path(d) / "run", log=lambda *_: None)
    return {"recipe": raw, "dense": res["dense_score"], "after_hard_prune": res["score_after_hard_prune"],
            "final": res["score"], "sparsity": res["sparsity"], "metric": res["metric"],
            "train_seconds": res["seconds"], "device": res["machine"].get("gpu")}


def throughput() -> dict:
    import loop_overhead as lo
    from prunekit.training.device import to_device
    model, task, batches, masks, n, cfg = lo.prepare("minilm_sst2")
    dev = torch.device("cuda")
    model.to(dev)
    batches = [to_device(b, dev) for b in batches]
    masks.to(dev)
    out = {}
    for mode, ms in (("dense", None), ("hard_pruned", masks)):
        rows = {"plain": [], "prunekit": []}
        for rep in range(4):
            for name, run in (("plain", lo.plain_loop), ("prunekit", lo.prunekit_loop)):
                torch.cuda.synchronize()
                secs = run(model, task, batches, cfg, ms)
                torch.cuda.synchronize()
                if rep:
                    rows[name].append(n / secs)
        p, k = sorted(rows["plain"])[1], sorted(rows["prunekit"])[1]
        out[mode] = {"plain_examples_per_s": round(p, 1), "prunekit_examples_per_s": round(k, 1), "ratio": round(k / p, 3)}
    return out


def semi_structured() -> dict:
    from torch import nn
    from torch.sparse import to_sparse_semi_structured
    from transformers import BertConfig, BertModel

    from prunekit.core.plan import prune
    enc = BertModel(BertConfig()).encoder.half().cuda().eval()
    x = torch.randn(32, 128, 768, dtype=torch.half, device="cuda")
    prune(enc, "nm:2:4", 0.5, targets={"include": ["*"], "types": ["Linear"]})

    def bench() -> float:
        with torch.inference_mode():
            for _ in range(5):
                enc(x)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(20):
                enc(x)
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / 20 * 1000

    dense_ms = bench()
    for m in enc.modules():
        if isinstance(m, nn.Linear):
            m.weight = nn.Parameter(to_sparse_semi_structured(m.weight.detach()), requires_grad=False)
    sparse_ms = bench()
    return {"shape": "BERT-base encoder (12 layers, H768), batch 32, seq 128, fp16", "dense_ms": round(dense_ms, 3),
            "sparse_2_4_ms": round(sparse_ms, 3), "speedup": round(dense_ms / sparse_ms, 3)}


def main() -> int:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    doc = {"command": "PYTHONPATH=src python benchmarks/gpu_check.py",
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": machine_info(torch.device("cuda") if torch.cuda.is_available() else None),
           "cuda_available": torch.cuda.is_available()}
    if not torch.cuda.is_available():
        doc["skipped"] = "CUDA is not available on this machine: nothing was measured"
        OUT.write_text(json.dumps(doc, indent=2) + "\n")
        print(doc["skipped"])
        return 0
    doc["machine"]["gpu"] = torch.cuda.get_device_name(0)
    for name, fn in (("gpu_tests", gpu_tests), ("minilm_sst2_prune_retrain", minilm_run),
                     ("training_throughput", throughput), ("semi_structured_2_4", semi_structured)):
        _part(doc, name, fn)
        print(name, json.dumps({k: v for k, v in doc[name].items() if k != "traceback"})[:400], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
