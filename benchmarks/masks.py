"""Mask computation speed and hard-prune training overhead, side by side with the PyTorch peers.

    python benchmarks/masks.py            # full run  → benchmarks/results/masks.json
    python benchmarks/masks.py --quick    # fewer repeats

Model: a BERT-base-shaped stack of the 72 encoder matrices (12 layers × query, key, value,
attention-output 768×768, intermediate 3072×768, output 768×3072), random init, plain nn.Linear.

1. Time to compute *and apply* layer-wise masks at 50% on all 72 matrices:
   unstructured / row / column vs ``torch.nn.utils.prune`` (``l1_unstructured``, ``ln_structured(n=2)``),
   block:4x4 vs ``torch.ao.pruning.WeightNormSparsifier(sparse_block_shape=(4, 4), zeros_per_block=16)``
   (``prepare`` + ``step``).  Median of repeats on fresh copies of the same weights.
2. Per-step training time (forward + backward + SGD-momentum step) dense vs hard-pruned
   (prunekit: masked weights, masked gradients, re-mask after step) vs ``torch.nn.utils.prune``'s
   reparametrisation (``weight = weight_orig * weight_mask`` in a forward pre-hook), for LeNet-5 on MNIST-shaped
   batches of 128 and for the BERT-shaped stack.  Steps are interleaved (dense, prunekit, peer,
   dense, ...) so machine noise hits all three alike; medians reported.  The BERT-shaped stack is measured at
   4×64 and 8×128 tokens per step.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune as tprune

import prunekit
from prunekit.models.registry import get_model

RESULTS = Path(__file__).resolve().parent / "results"


class BertShapedStack(nn.Module):
    """12 × (q, k, v, o, intermediate, output) Linear layers; a residual MLP-like forward."""

    def __init__(self, layers=12, hidden=768, ffn=3072):
        super().__init__()
        self.layer = nn.ModuleList()
        for _ in range(layers):
            self.layer.append(nn.ModuleDict({
                "query": nn.Linear(hidden, hidden), "key": nn.Linear(hidden, hidden), "value": nn.Linear(hidden, hidden),
                "attention_output": nn.Linear(hidden, hidden), "intermediate": nn.Linear(hidden, ffn),
                "output": nn.Linear(ffn, hidden)}))

    def forward(self, x):
        for l in self.layer:
            a = l["query"](x) + l["key"](x) + l["value"](x)
            x = x + l["attention_output"](torch.tanh(a))
            x = x + l["output"](nn.functional.gelu(l["intermediate"](x)))
        return x


def linears(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def time_it(fn, repeats):
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def mask_rows(base, repeats):
    rows = []
    peers = {
        "unstructured": lambda m: [tprune.l1_unstructured(l, "weight", amount=0.5) for l in linears(m)],
        "row": lambda m: [tprune.ln_structured(l, "weight", amount=0.5, n=2, dim=0) for l in linears(m)],
        "column": lambda m: [tprune.ln_structured(l, "weight", amount=0.5, n=2, dim=1) for l in linears(m)],
    }

    def ao_block(m):
        from torch.ao.pruning import WeightNormSparsifier
        sp = WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(4, 4), zeros_per_block=16)
        sp.prepare(m, [{"tensor_fqn": f"{n}.weight"} for n, mod in m.named_modules() if isinstance(mod, nn.Linear)])
        sp.step()
        return sp

    for structure in ["unstructured", "row", "column", "block:4x4"]:
        peer_name = "torch.ao.pruning.WeightNormSparsifier" if structure.startswith("block") else "torch.nn.utils.prune"
        peer_fn = ao_block if structure.startswith("block") else peers[structure]
        ours, theirs = [], []
        for _ in range(repeats):  # interleaved, fresh copies
            m = copy.deepcopy(base)
            t0 = time.perf_counter()
            masks = prunekit.prune(m, structure, 0.5)
            ours.append(time.perf_counter() - t0)
            m2 = copy.deepcopy(base)
            t0 = time.perf_counter()
            peer_fn(m2)
            theirs.append(time.perf_counter() - t0)
        # same kept count as the peer (sanity)
        rows.append({"benchmark": "mask_time", "model": "bert-base-shaped-72", "structure": structure, "sparsity": 0.5,
                     "tool": "prunekit", "seconds": statistics.median(ours), "peer": peer_name,
                     "peer_seconds": statistics.median(theirs),
                     "ratio_vs_peer": statistics.median(ours) / statistics.median(theirs),
                     "measured_sparsity": masks.sparsity()})
        print(rows[-1], flush=True)
    return rows


def step_rows(name, base, make_batch, steps, warmup=3):
    torch.manual_seed(0)
    x, y = make_batch()

    def loss_fn(m):
        out = m(x)
        return nn.functional.cross_entropy(out, y) if y is not None else out.pow(2).mean()

    dense = copy.deepcopy(base)
    ours = copy.deepcopy(base)
    peer = copy.deepcopy(base)
    opts = {}
    for k, m in (("dense", dense), ("prunekit", ours), ("torch.nn.utils.prune", peer)):
        if k == "torch.nn.utils.prune":
            for l in [mm for mm in m.modules() if isinstance(mm, (nn.Linear, nn.Conv2d))]:
                tprune.l1_unstructured(l, "weight", amount=0.5)
        opts[k] = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
    masks = prunekit.prune(ours, "unstructured", 0.5)
    hp = masks.attach(ours, opts["prunekit"])
    models = {"dense": dense, "prunekit": ours, "torch.nn.utils.prune": peer}

    def step(k):
        m, opt = models[k], opts[k]
        loss = loss_fn(m)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times = {k: [] for k in models}
    for i in range(warmup + steps):
        for k in models:
            t0 = time.perf_counter()
            step(k)
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
    hp.detach()
    pruned_zero = all(bool((ours.get_parameter(n)[~mk] == 0).all()) for n, mk in masks.items())
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"benchmark": "train_step", "model": name, "structure": "unstructured", "sparsity": 0.5, "steps": steps,
           "dense_ms": 1e3 * med["dense"], "prunekit_ms": 1e3 * med["prunekit"],
           "peer": "torch.nn.utils.prune", "peer_ms": 1e3 * med["torch.nn.utils.prune"],
           "prunekit_overhead": med["prunekit"] / med["dense"] - 1,
           "peer_overhead": med["torch.nn.utils.prune"] / med["dense"] - 1,
           "pruned_weights_stay_zero": pruned_zero}
    print(row, flush=True)
    return [row]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    bert = BertShapedStack()
    assert len(linears(bert)) == 72
    rows = mask_rows(bert, 3 if args.quick else 7)
    lenet = get_model("lenet5")
    rows += step_rows("lenet5", lenet, lambda: (torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))),
                      steps=10 if args.quick else 40)
    # two batch sizes: a tiny 4×64-token batch (the overhead's worst case: two memory passes over 85M weights
    # per step are fixed, the forward/backward shrinks) and a usual fine-tuning batch of 8×128 tokens
    for b, t in ((4, 64), (8, 128)):
        r = step_rows("bert-base-shaped-72", bert, lambda: (torch.randn(b * t, 768), None),
                      steps=3 if args.quick else 10)
        r[0]["tokens_per_step"] = b * t
        rows += r
    out = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "targets": {"mask_time": "ratio_vs_peer <= 1 for each structure",
                    "train_step": "prunekit_overhead <= 0.05 and < peer_overhead"},
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "masks.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS / 'masks.json'}")


if __name__ == "__main__":
    main()
