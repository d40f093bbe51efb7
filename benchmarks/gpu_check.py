"""GPU check (issue 14): one command, < 8 min, never required by the test suite.

    PYTHONPATH=src python benchmarks/gpu_check.py        # → benchmarks/results/gpu.json

With CUDA: (1) the device tests (``pytest -m gpu``), (2) a MiniLM-L6 SST-2 prune-and-retrain run on the
GPU (small subset, bf16), (3) training throughput of prunekit's ``fit`` vs a plain PyTorch loop on the
same model and batches (MiniLM, dense and hard-pruned), (4) 2:4 semi-structured sparse inference
(``torch.sparse.to_sparse_semi_structured``) vs dense on a BERT-base-shaped encoder (fp16), (5) SparseGPT 2:4
on a Llama-style decoder in GPU memory vs offloaded (blocks read one at a time onto the GPU, issue 21).
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


def offloaded_pruning() -> dict:
    """Issue 21: a Llama-style decoder (~0.7 GB fp32) pruned with SparseGPT 2:4 (a) in memory on the GPU and
    (b) offloaded — one block at a time read from the shards onto the GPU, activations on CPU (spilled to
    disk above 64 MB), each pruned block written straight to the output shards; masks and weights compared."""
    import transformers

    from prunekit.algorithms.calibration import run_blockwise
    from prunekit.algorithms.offload import load_offload_masks, prune_offloaded
    from prunekit.algorithms.sparsegpt import SparseGPT
    from prunekit.core.masks import MaskSet
    from prunekit.core.plan import PruneSpec
    from prunekit.core.targets import TargetSpec
    from prunekit.io.sharded import ShardReader
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2752, num_hidden_layers=8, num_attention_heads=16,
                                   num_key_value_heads=16, vocab_size=32000, max_position_embeddings=128,
                                   tie_word_embeddings=False)
    spec = PruneSpec("nm:2:4", 0.5, targets=TargetSpec([r"re:^model\.layers\.\d+\."], [], ["Linear"]))
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 32000, (8, 128), generator=g)} for _ in range(4)]
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(cfg).save_pretrained(src, max_shard_size="200MB")
        model = transformers.LlamaForCausalLM.from_pretrained(src).cuda().eval()
        algo = SparseGPT(SparseGPT.Params(), spec)
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        targets, make = algo.block_pruner(model, batches)
        masks = MaskSet()
        run_blockwise(model, [{k: v.cuda() for k, v in b.items()} for b in batches], targets, make(masks))
        torch.cuda.synchronize()
        mem_s, mem_peak = time.perf_counter() - t, torch.cuda.max_memory_allocated()
        ref = {k: v.cpu() for k, v in model.state_dict().items()}
        del model
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        res = prune_offloaded(src, out, SparseGPT(SparseGPT.Params(), spec), batches, device="cuda",
                              activation_budget=64 * 2**20)
        torch.cuda.synchronize()
        off_s, off_peak = time.perf_counter() - t, torch.cuda.max_memory_allocated()
        got = load_offload_masks(out)
        same_masks = all(torch.equal(got[n].cpu(), masks[n].cpu()) for n in masks.names())
        reader = ShardReader(out)
        diff = max(float((reader.load([n])[n].float() - ref[n].float()).abs().max()) for n in reader.names())
    return {"model": "Llama d1024, 8 layers, vocab 32000 (fp32, ~0.7 GB)", "calibration": "32 x 128 tokens",
            "in_memory": {"seconds": round(mem_s, 2), "gpu_peak_mb": round(mem_peak / 2**20, 1)},
            "offloaded": {"seconds": round(off_s, 2), "gpu_peak_mb": round(off_peak / 2**20, 1),
                          "blocks": res.blocks, "spilled_batches": res.spilled_batches},
            "masks_identical": same_masks, "max_abs_weight_diff": diff}


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
                     ("training_throughput", throughput), ("semi_structured_2_4", semi_structured),
                     ("offloaded_pruning_cuda", offloaded_pruning)):
        _part(doc, name, fn)
        print(name, json.dumps({k: v for k, v in doc[name].items() if k != "traceback"})[:400], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
