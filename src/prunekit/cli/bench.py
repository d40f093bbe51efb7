"""``prunekit bench RUN_DIR`` — latency and size of a run: dense vs compacted vs sparse (CSR Linear).

The run's model is rebuilt (see ``prunekit compact``); three variants are timed on the run's example
input repeated to batch 1 and 32, at 1 and 2 threads: the *masked* model (dense kernels; zeros
stored), the *compacted* model — the same graph-driven, verified compaction ``prunekit compact`` writes
(:func:`prunekit.deploy.surgery.compact`; a model that does not trace is refused, not timed) — and the
masked model with Linear layers switched to CSR where measured faster
(``prunekit.deploy.sparse_linear.sparsify_linears``).  Calls are interleaved,
under ``torch.inference_mode`` after warm-up; medians are reported.  Sizes are the bytes of the
three state dicts as safetensors-encoded tensors (sparse: ``storage.encode_state_dict``).  A run whose
recipe names code to import needs ``--trust-code`` (see ``prunekit compact``).
"""
from __future__ import annotations

import copy
import functools

import torch

from prunekit.cli.compact import add_trust_flag, compact_loaded, load_run
from prunekit.deploy.sparse_linear import sparsify_linears
from prunekit.deploy.storage import encode_state_dict
from prunekit.deploy.timing import call_model, interleaved_ms, repeat_batch


def add_parser(sub):
    p = sub.add_parser("bench", help="latency (batch 1/32, threads 1/2) and size table: dense vs compacted vs sparse",
                       description="Measure a finished run: file sizes and interleaved CPU latency of the masked (dense) model, "
                                   "the compacted model and the model with CSR Linear layers where they are faster.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="folder written by `prunekit run`")
    p.add_argument("--repeats", type=int, default=9, help="timed calls per variant (default 9)")
    p.add_argument("--batches", default="1,32", help="comma-separated batch sizes (default 1,32)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    add_trust_flag(p)
    p.set_defaults(func=run)


def _bytes(sd: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def bench_run(run_dir, repeats: int = 9, batches=(1, 32), threads=(1, 2), *, trust_code: bool = False) -> dict:
    """Sizes and latencies of a run folder (module docstring); the compacted variant is verified."""
    masked, masks, recipe, x0 = load_run(run_dir, trust_code=trust_code)
    res = compact_loaded(copy.deepcopy(masked), masks, x0, recipe.model.name)
    comp = res.model
    sizes = {"dense": _bytes(masked.state_dict()), "compacted": _bytes(comp.state_dict()),
             "sparse": _bytes(encode_state_dict(masked.state_dict(), "best")[0]),
             "compacted+sparse": _bytes(encode_state_dict(comp.state_dict(), "best")[0])}
    rows = []
    for b in batches:
        x = repeat_batch(x0, b)
        for t in threads:
            sparse = copy.deepcopy(masked)
            report = sparsify_linears(sparse, x, num_threads=t)
            variants = {"dense": masked, "compacted": comp, "sparse": sparse}
            ms = interleaved_ms({k: functools.partial(call_model, m, x) for k, m in variants.items()},
                                repeats=repeats, warmup=1, threads=t)
            rows.append({"batch": b, "threads": t, **{f"{k}_ms": v for k, v in ms.items()},
                         "compacted_speedup": ms["dense"] / ms["compacted"], "sparse_speedup": ms["dense"] / ms["sparse"],
                         "csr_layers": sum(r["chosen"] == "csr" for r in report)})
    return {"model": recipe.model.name, "params": {"before": res.params_before, "after": res.params_after},
            "sizes": sizes, "latency": rows}


def format_bench(r: dict) -> str:
    d = r["sizes"]["dense"]
    lines = [f"## {r['model']}: {r['params']['before']:,} → {r['params']['after']:,} parameters compacted", "",
             "| storage | bytes | vs dense |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:,} | {v / d:.3f} |" for k, v in r["sizes"].items()]
    lines += ["", "| batch | threads | dense ms | compacted ms | sparse (CSR) ms | compacted × | sparse × | CSR layers |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {x['batch']} | {x['threads']} | {x['dense_ms']:.3f} | {x['compacted_ms']:.3f} | {x['sparse_ms']:.3f} | "
              f"{x['compacted_speedup']:.2f} | {x['sparse_speedup']:.2f} | {x['csr_layers']} |" for x in r["latency"]]
    return "\n".join(lines)


def run(args) -> int:
    ints = lambda s: tuple(int(v) for v in s.split(",") if v.strip())  # noqa: E731
    print(format_bench(bench_run(args.run_dir, args.repeats, ints(args.batches), ints(args.threads),
                                 trust_code=args.trust_code)))
    return 0
