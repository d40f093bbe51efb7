"""Real size and speed on CPU (issue #6): compaction, CSR sparse Linear, compressed file size.

Command (full run, ~20 min on the shared 2-core box; defaults: 12 layers at batch 1, 2 layers at
batch 32, 4 layers for file sizes, 11 / 7 repeats)::

    python benchmarks/speed.py            # writes benchmarks/results/speed.json
    python benchmarks/speed.py --quick    # 2-layer encoder, few repeats: a smoke run

Parts (one run, rows in ``rows``; every row has model, structure, sparsity, flop_reduction,
latency_ms_dense, latency_ms, speedup, batch, seq_len, threads, bytes):

(a) BERT-base-shaped encoder (``BertConfig()`` random init, ``--layers`` layers, default 12; batch 32
    uses ``--layers-b32`` layers, default 2, to keep one forward under a few seconds on a shared CPU —
    the speedup is a per-layer ratio) with 50 % of the heads and 50 % of the FFN neurons of every layer
    zeroed (smallest L2 norm) and then *compacted* by ``prunekit.deploy.surgery.compact`` (verified).  Peer in the same run:
    Torch-Pruning (``MetaPruner`` with ``prune_num_heads``) at the same parameter count, or the error
    it gave.  ``flop_reduction`` = Linear-layer FLOPs dense / compacted; target speedup
    ≥ 0.85 × flop_reduction.
(b) Unstructured 90 % / 95 % magnitude sparsity on every encoder Linear, batch 1: ``sparsify_linears``
    picks CSR per layer by measured speed; whole-model latency vs dense (target ≥ 1.5× at 95 %).
(c) File size of the encoder Linear weights (``--size-layers`` layers, default 4: every layer has the
    same shapes, so the ratios do not depend on the count; encoding 12 layers takes ~10 min): dense bytes vs
    ``storage.encode_state_dict`` (best encoding per tensor) for unstructured 50/80/90/95 %, block:4x4
    at 90 %, nm:2:4, plus ``storage.theoretical_min_bytes``.

Latency: ``torch.inference_mode()``, warm-up, then dense and pruned calls *interleaved* (the CPU is
shared with other jobs, so load hits both alike); in (a) dense, prunekit and Torch-Pruning are timed in
ONE rotating loop (a b c, b c a, c a b ...), so the prunekit/peer ratio comes from the same time window
(``paired_peer_ms_over_prunekit_ms``: per-round peer ms / prunekit ms).  Medians reported, with the
relative interquartile range (``noise_dense``, ``noise``) as the noise record.  The JSON is rewritten
after every measurement (``complete: false`` until the end), so a killed run keeps what it measured.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from prunekit.core.structures import parse_structure  # noqa: E402
from prunekit.deploy.sparse_linear import sparsify_linears  # noqa: E402
from prunekit.deploy.storage import encode_state_dict, theoretical_min_bytes  # noqa: E402
from prunekit.deploy.surgery import compact  # noqa: E402


def machine() -> dict:
    return {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__,
            "threads_available": torch.get_num_threads()}


def bert(layers: int) -> nn.Module:
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    return BertModel(BertConfig(num_hidden_layers=layers), add_pooling_layer=False).eval()


def inputs(batch: int, seq: int) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(1000, 20000, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


def _stats(ts: list[float]) -> tuple[float, float]:
    """Median and relative IQR (interquartile range / median) of a list of timings."""
    q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
    med = statistics.median(ts)
    return med, (q[2] - q[0]) / med


def interleaved_many(models: dict, x: dict, repeats: int, warmup: int, threads: int) -> dict:
    """Time several models called in a rotating order within each round (a b c, b c a, c a b ...),
    so that load from other jobs hits all of them alike.  Returns per model the list of ms."""
    torch.set_num_threads(threads)
    items = list(models.items())
    ts = {k: [] for k in models}
    with torch.inference_mode():
        for _ in range(warmup):
            for _, f in items:
                f(**x)
        for i in range(repeats):
            k0 = i % len(items)
            for k, f in items[k0:] + items[:k0]:
                t0 = time.perf_counter()
                f(**x)
                ts[k].append(1e3 * (time.perf_counter() - t0))
    return ts


def interleaved(fa, fb, x: dict, repeats: int, warmup: int, threads: int) -> dict:
    """Median ms of fa and fb called alternately (a, b, b, a ...) + relative IQR noise."""
    ts = interleaved_many({"a": fa, "b": fb}, x, repeats, warmup, threads)
    (ma, na), (mb, nb) = _stats(ts["a"]), _stats(ts["b"])
    return {"latency_ms_dense": ma, "latency_ms": mb, "speedup": ma / mb, "noise_dense": na, "noise": nb,
            "repeats": repeats}


def linear_flops(model: nn.Module, seq: int) -> int:
    return sum(2 * seq * m.weight.numel() for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n.startswith("encoder."))


@torch.no_grad()
def mask_heads_ffn(model: nn.Module, frac: float = 0.5) -> None:
    """Zero the ``frac`` smallest-L2 heads (q/k/v rows + output columns) and FFN neurons per layer."""
    for L in model.encoder.layer:
        sa, Wo = L.attention.self, L.attention.output.dense
        H, d = sa.num_attention_heads, sa.attention_head_size
        score = Wo.weight.reshape(-1, H, d).pow(2).sum((0, 2)) + sa.value.weight.reshape(H, d, -1).pow(2).sum((1, 2))
        drop = score.argsort()[: round(frac * H)]
        for h in drop.tolist():
            sl = slice(h * d, (h + 1) * d)
            for lin in (sa.query, sa.key, sa.value):
                lin.weight[sl] = 0
                lin.bias[sl] = 0
            Wo.weight[:, sl] = 0
        W1, W2 = L.intermediate.dense, L.output.dense
        score = W1.weight.pow(2).sum(1) + W2.weight.pow(2).sum(0)
        drop = score.argsort()[: round(frac * W1.out_features)]
        W1.weight[drop] = 0
        W1.bias[drop] = 0
        W2.weight[:, drop] = 0


def torch_pruning_peer(layers: int, target_params: int, seq: int) -> tuple[nn.Module | None, str]:
    """Torch-Pruning's HF BERT recipe (its examples/transformers/prune_hf_bert.py): MetaPruner with
    prune_num_heads, head_pruning_ratio 0.5, pruning_ratio 0.5 (reaches only the FFN
    intermediate since the hidden-size layers are ignored), magnitude importance."""
    try:
        import torch_pruning as tp
    except ImportError as e:
        return None, f"torch-pruning not installed: {e}"
    try:
        model = bert(layers)
        num_heads, ignored = {}, []
        for m in model.modules():
            if hasattr(m, "query") and hasattr(m, "num_attention_heads"):
                num_heads[m.query] = m.num_attention_heads
                num_heads[m.key] = m.num_attention_heads
                num_heads[m.value] = m.num_attention_heads
        # keep the hidden size (ignore the layers whose rows are the residual stream): what is left to
        # prune at ratio 0.5 is the FFN intermediate and, through prune_num_heads, whole heads
        for L in model.encoder.layer:
            ignored += [L.attention.output.dense, L.output.dense]
        x = inputs(1, seq)
        pruner = tp.pruner.MetaPruner(
            model, (x["input_ids"],), importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=0.5, num_heads=num_heads, prune_head_dims=False,
            prune_num_heads=True, head_pruning_ratio=0.5, ignored_layers=ignored + [model.embeddings],
            global_pruning=False)
        pruner.step()
        for m in model.modules():
            if hasattr(m, "query") and hasattr(m, "num_attention_heads"):
                m.num_attention_heads = pruner.num_heads[m.query]
                m.all_head_size = m.query.out_features
        with torch.inference_mode():
            model(**x)
        n = sum(p.numel() for p in model.parameters())
        note = f"torch-pruning {tp.__version__}: {n} params vs prunekit {target_params}"
        return model.eval(), note
    except Exception as e:  # record what happened, do not hide it
        return None, f"torch-pruning failed: {type(e).__name__}: {str(e)[:300]}"


def part_a(args, rows, notes, save=lambda: None):
    seq = 128
    for batch, layers in ((1, args.layers), (32, args.layers_b32)):
        dense = bert(layers)
        masked = copy.deepcopy(dense)
        mask_heads_ffn(masked, 0.5)
        comp = copy.deepcopy(masked)
        res = compact(comp, None, inputs(2, 16), count_macs=False)   # the zero pattern; verified
        del masked
        x = inputs(batch, seq)
        with torch.inference_mode():
            xs = inputs(2, 16)
            ref = copy.deepcopy(dense)
            mask_heads_ffn(ref, 0.5)
            diff = float((comp(**xs).last_hidden_state - ref(**xs).last_hidden_state).abs().max())
            del ref
        fr = linear_flops(dense, seq) / linear_flops(comp, seq)
        enc = [p for n, p in dense.named_parameters() if n.startswith("encoder.") and p.dim() == 2]
        sparsity = 1 - (sum(p.numel() for n, p in comp.named_parameters() if n.startswith("encoder.") and p.dim() == 2)
                        / sum(p.numel() for p in enc))
        notes.setdefault("compaction_max_abs_diff", {})[f"b{batch}"] = diff
        tp_model, tp_note = torch_pruning_peer(layers, res.params_after, seq)
        notes.setdefault("torch_pruning", {})[f"b{batch}"] = tp_note
        print(f"[a] batch {batch} layers {layers}: params {res.params_before} -> {res.params_after}, "
              f"linear FLOP reduction {fr:.3f}, diff {diff:.2e}; {tp_note}", flush=True)
        models = {"dense": dense, "prunekit": comp}
        if tp_model is not None:
            models["torch_pruning"] = tp_model
        reps = args.repeats if batch == 1 else args.repeats_b32
        for threads in (1, 2):
            # dense, prunekit and the peer in ONE rotating loop: their ratios come from the same time window
            ts = interleaved_many(models, x, reps, 2 if batch == 1 else 1, threads)
            md, nd = _stats(ts["dense"])
            for key, label, m in (("prunekit", "prunekit compact", comp), ("torch_pruning", "torch-pruning peer", tp_model)):
                if key not in ts:
                    continue
                mm, nm = _stats(ts[key])
                f = linear_flops(dense, seq) / linear_flops(m, seq)
                row = {"model": f"bert-base-shaped ({layers} layers)", "structure": f"heads 50% + ffn 50% ({label})",
                       "sparsity": sparsity, "flop_reduction": f, "latency_ms_dense": md, "latency_ms": mm,
                       "speedup": md / mm, "noise_dense": nd, "noise": nm, "repeats": reps, "batch": batch,
                       "seq_len": seq, "threads": threads,
                       "bytes": sum(p.numel() * p.element_size() for p in m.parameters()),
                       "bytes_dense": sum(p.numel() * p.element_size() for p in dense.parameters()),
                       "params": sum(p.numel() for p in m.parameters()),
                       "target_speedup": 0.85 * f, "target_met": md / mm >= 0.85 * f}
                if key == "prunekit" and "torch_pruning" in ts:
                    paired = [b / a for a, b in zip(ts["prunekit"], ts["torch_pruning"])]
                    pm, pn = _stats(paired)
                    row["ratio_prunekit_over_peer"] = (md / mm) / (md / _stats(ts["torch_pruning"])[0])
                    row["paired_peer_ms_over_prunekit_ms"] = {"median": pm, "iqr_rel": pn,
                                                              "min": min(paired), "max": max(paired)}
                rows.append(row)
                print(f"    threads {threads} {label}: dense {md:.1f} ms (iqr {nd:.2f}), {mm:.1f} ms (iqr {nm:.2f}), "
                      f"speedup {md / mm:.2f} (target {0.85 * f:.2f})", flush=True)
            save()
        del dense, comp, tp_model, models


@torch.no_grad()
def magnitude_unstructured(model: nn.Module, sparsity: float) -> None:
    st = parse_structure("unstructured")
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear) and n.startswith("encoder."):
            m.weight.mul_(st.mask(m.weight, sparsity, "l1").to(m.weight.dtype))


def part_b(args, rows, notes, save=lambda: None):
    seq, batch = 128, 1
    dense = bert(args.layers)
    x = inputs(batch, seq)
    for sp in (0.9, 0.95):
        for threads in (1, 2):
            sparse = copy.deepcopy(dense)
            magnitude_unstructured(sparse, sp)
            ref = copy.deepcopy(sparse)
            torch.set_num_threads(threads)
            report = sparsify_linears(sparse, x, min_sparsity=0.5, num_threads=threads)
            n_csr = sum(r["chosen"] == "csr" for r in report)
            with torch.inference_mode():
                diff = float((sparse(**x).last_hidden_state - ref(**x).last_hidden_state).abs().max())
            m = interleaved(dense, sparse, x, args.repeats, 2, threads)
            row = {"model": f"bert-base-shaped ({args.layers} layers)", "structure": "unstructured (CSR sparse_linear)",
                   "sparsity": sp, "flop_reduction": 1 / (1 - sp), **m, "batch": batch, "seq_len": seq,
                   "threads": threads, "bytes": None, "csr_layers": n_csr, "linear_layers": len(report),
                   "max_abs_diff": diff, "target_met": (m["speedup"] >= 1.5) if sp == 0.95 else None}
            rows.append(row)
            print(f"[b] {sp:.0%} threads {threads}: {n_csr}/{len(report)} CSR, dense {m['latency_ms_dense']:.1f} ms, "
                  f"csr {m['latency_ms']:.1f} ms, speedup {m['speedup']:.2f}, diff {diff:.1e}", flush=True)
            save()
            del sparse, ref


def part_c(args, rows, notes, save=lambda: None):
    dense = bert(args.size_layers)
    base = {n: p.detach().clone() for n, p in dense.named_parameters()
            if n.startswith("encoder.") and p.dim() == 2}
    dense_bytes = sum(t.numel() * t.element_size() for t in base.values())
    settings = [("unstructured", 0.5), ("unstructured", 0.8), ("unstructured", 0.9), ("unstructured", 0.95),
                ("block:4x4", 0.9), ("nm:2:4", 0.5)]
    for structure, sp in settings:
        st = parse_structure(structure)
        t0 = time.perf_counter()
        sd = {n: w * st.mask(w, sp, "l1").to(w.dtype) for n, w in base.items()}
        tensors, meta = encode_state_dict(sd, "best")
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        tmin = sum(theoretical_min_bytes(w) for w in sd.values())
        chosen = sorted({m["encoding"] for m in json.loads(meta)["tensors"].values()})
        real = 1 - sum(int((w != 0).sum()) for w in sd.values()) / sum(w.numel() for w in sd.values())
        rows.append({"model": f"bert-base-shaped encoder Linear weights ({args.size_layers} layers)",
                     "structure": f"{structure} (file size)", "sparsity": real, "flop_reduction": None,
                     "latency_ms_dense": None, "latency_ms": None, "speedup": None, "batch": None,
                     "seq_len": None, "threads": None, "bytes": nbytes, "bytes_dense": dense_bytes,
                     "size_ratio": nbytes / dense_bytes, "bytes_theoretical_min": tmin,
                     "theoretical_min_ratio": tmin / dense_bytes, "encodings": chosen})
        print(f"[c] {structure} {real:.3f}: {nbytes / dense_bytes:.3f} of dense (min {tmin / dense_bytes:.3f}) "
              f"{chosen} [{time.perf_counter() - t0:.0f}s]", flush=True)
        save()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2-layer encoder, few repeats (smoke run)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--layers-b32", type=int, default=2)
    ap.add_argument("--size-layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--repeats-b32", type=int, default=7)
    ap.add_argument("--parts", default="abc")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "speed.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.layers_b32, args.size_layers, args.repeats, args.repeats_b32 = 2, 1, 2, 3, 2
    rows, notes = [], {}
    t0 = time.time()
    part_seconds: dict[str, float] = {}

    def save(final: bool = False) -> None:
        """Write the JSON now (after every measurement), so a killed run keeps what it measured."""
        out = {"command": " ".join(["python"] + sys.argv), "machine": machine(),
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seconds": time.time() - t0,
               "complete": final, "part_seconds": part_seconds,
               "settings": {k: v for k, v in vars(args).items() if k != "out"},
               "notes": {**notes, "timing": "medians of interleaved calls (dense, prunekit, peer in one rotating "
                                            "loop) under torch.inference_mode after warm-up; noise = interquartile "
                                            "range / median; the 2-core CPU was shared with other engineers' jobs "
                                            "during the run"},
               "rows": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(out, indent=2, default=str) + "\n")
        tmp.replace(args.out)

    for part in args.parts:
        tp0 = time.time()
        try:
            {"a": part_a, "b": part_b, "c": part_c}[part](args, rows, notes, save)
        except Exception:
            notes[f"part_{part}_error"] = traceback.format_exc()[-2000:]
            print(notes[f"part_{part}_error"], flush=True)
        part_seconds[part] = time.time() - tp0
        save()
    save(final=True)
    print(f"wrote {args.out} ({len(rows)} rows, {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
