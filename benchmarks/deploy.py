"""Deployment speed and accuracy on CPU (issue 20): compaction + int8 through ONNX Runtime vs dense ONNX Runtime.

Command (one run; MiniLM needs a finished run of ``recipes/glue_sst2_deploy.yaml``)::

    prunekit run recipes/glue_sst2_deploy.yaml --out runs/sst2-deploy
    python benchmarks/deploy.py --run runs/sst2-deploy          # writes benchmarks/results/deploy.json
    python benchmarks/deploy.py --parts resnet --quick          # smoke run
    python benchmarks/deploy.py --merge a.json b.json           # parts of several runs into --out
    python benchmarks/deploy.py --table                         # --out as markdown tables

Every part exports its artefacts with :func:`prunekit.export` (fp32 checked against PyTorch, relative 1e-4
on every output) and ``prunekit.deploy.export.quantize_onnx`` (ONNX Runtime ``quantize_dynamic`` per channel,
``quantize_static`` QDQ with calibration batches), then times all variants of a part in ONE interleaved
loop per (batch, threads) — :func:`prunekit.deploy.timing.interleaved_ms`: warm-up, A B C … then … C B A,
medians — so the load of the shared machine hits every variant alike; ``speedup`` is against the ONNX
Runtime dense fp32 session of the same loop.  Token inputs are ``--seq`` (default 128) tokens, all attended.

* ``minilm`` — MiniLM-L6 fine-tuned on SST-2 (``--run``: its ``dense/`` checkpoint is the dense model, the
  run's masks the pruned one, compacted on the fly); dev accuracy of every artefact on the full dev set.
  Rows: ORT dense fp32 (baseline), ORT dense int8 (dynamic), ORT compacted fp32, ORT compacted int8 dynamic
  and static (calibration: 128 training sentences), PyTorch compacted, PyTorch dense with 90 % unstructured
  magnitude sparsity of the encoder matrices and CSR Linear layers where measured faster
  (``sparsify_linears``; no retraining: a speed row, its accuracy is recorded as measured).
* ``bertbase`` — a BERT-base-shaped encoder (``BertConfig()``, random weights, ``--bert-layers`` layers):
  speed only, the same head / neuron ratios as the MiniLM run (50 % heads, 75 % FFN neurons, L2 norm).
* ``resnet`` — ResNet-18 (CIFAR variant, 32×32 inputs, random weights: speed only), 50 % of the channels of
  every coupled group removed (L2); ORT dense fp32, ORT dense int8 static, ORT compacted fp32 and int8
  static (calibration: random batches), PyTorch compacted.

Second engine: where OpenVINO's runtime is installed (``pip install "prunekit[openvino]"``; it pulls no torch),
the fp32 and QDQ static-int8 files are also compiled by OpenVINO (CPU, fp32 precision hint) and timed in a
second interleaved loop with the ONNX Runtime baseline (``openvino`` of each latency row; apart because
OpenVINO's thread pool would load the first loop); ``--no-openvino`` leaves it out.

The JSON is rewritten after every part; ``load_average`` is recorded before and after each timing loop.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import onnxruntime
import torch

import prunekit
from prunekit.cli.export import load_run_workload
from prunekit.deploy.export import OrtModel, quantize_onnx
from prunekit.deploy.sparse_linear import sparsify_linears
from prunekit.deploy.timing import interleaved_ms
from prunekit.graph.families import default_targets
from prunekit.io.checkpoint import atomic_write_json, load_checkpoint
from prunekit.models.resnet import resnet18_cifar
from prunekit.pipelines.runner import machine_info

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "deploy.json"
BASE = "ort_dense_fp32"


def artefacts(dense: torch.nn.Module, comp: torch.nn.Module, x: Any, calib: list, d: Path,
              dense_int8: str) -> dict[str, dict]:
    """Export the ONNX artefacts of one model; ``{name: {"file", "bytes"}}``."""
    d.mkdir(parents=True, exist_ok=True)
    fd = prunekit.export(dense, x, d / "dense.fp32.onnx").path
    fc = prunekit.export(comp, x, d / "compact.fp32.onnx").path
    files = {BASE: fd, f"ort_dense_int8_{dense_int8}": quantize_onnx(fd, d / f"dense.int8-{dense_int8}.onnx",
                                                                     dense_int8, calib),
             "ort_compact_fp32": fc}
    for mode in ("dynamic", "static"):
        files[f"ort_compact_int8_{mode}"] = quantize_onnx(fc, d / f"compact.int8-{mode}.onnx", mode, calib)
    return {k: {"file": str(p), "bytes": Path(p).stat().st_size} for k, p in files.items()}


def openvino_core() -> Any:
    """OpenVINO's runtime if it is installed (``pip install openvino``: no torch), else None."""
    try:
        import openvino  # noqa: PLC0415
    except ImportError:
        return None
    return openvino.Core()


def ov_fn(core: Any, file: str, feed: dict, threads: int):
    """The same ONNX file compiled by OpenVINO (CPU, ``threads`` inference threads, fp32 precision: no
    bf16 down-cast, so fp32 files compute what ONNX Runtime computes; QDQ files run OpenVINO's int8)."""
    c = core.compile_model(file, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"})
    return lambda: c(feed)


def time_grid(files: dict[str, dict], torch_models, make_input, batches, threads, repeats: int,
              ov: Any = None) -> list[dict]:
    """One interleaved loop per (batch, threads) over every ORT session and PyTorch model (and, with
    OpenVINO, its compilation of the fp32 and QDQ static int8 files: dynamic-int8 graphs use ONNX
    Runtime's own integer ops, which OpenVINO runs slower than fp32, so they are left out)."""
    rows = []
    for b in batches:
        x = make_input(b)
        for t in threads:
            fns: dict[str, Any] = {}
            ov_fns: dict[str, Any] = {}
            for k, f in files.items():
                m = OrtModel(f["file"], threads=t)
                feed = m.feed(**x) if isinstance(x, dict) else m.feed(x)
                fns[k] = (lambda s, fd: lambda: s.run(None, fd))(m.session, feed)
                if ov is not None and not k.endswith("dynamic"):
                    ov_fns["openvino" + k.removeprefix("ort")] = ov_fn(ov, f["file"], feed, t)
            for k, tm in torch_models(b, t).items():
                fns[k] = (lambda mm: lambda: mm(**x) if isinstance(x, dict) else mm(x))(tm)
            row = {"batch": b, "threads": t, **_loop(fns, repeats, t)}
            if ov_fns:      # OpenVINO's own thread pool: its loop (with the ORT baseline) runs apart
                row["openvino"] = _loop({BASE: fns[BASE], **ov_fns}, repeats, t)
            rows.append(row)
    return rows


def _loop(fns: dict[str, Any], repeats: int, t: int) -> dict:
    load0 = os.getloadavg()[0]
    ms = interleaved_ms(fns, repeats=repeats, warmup=2, threads=t)
    print(f"  threads {t}: " + ", ".join(f"{k} {v:.1f} ms ({ms[BASE] / v:.2f}x)" for k, v in ms.items()), flush=True)
    return {"ms": ms, "speedup": {k: ms[BASE] / v for k, v in ms.items()}, "load_average": [load0, os.getloadavg()[0]]}


def token_input(vocab: int, seq: int, token_types: bool):
    def make(b: int) -> dict:
        g = torch.Generator().manual_seed(b)
        x = {"input_ids": torch.randint(1000, vocab, (b, seq), generator=g),
             "attention_mask": torch.ones(b, seq, dtype=torch.long)}
        if token_types:
            x["token_type_ids"] = torch.zeros(b, seq, dtype=torch.long)
        return x
    return make


def csr_models(dense: torch.nn.Module, make_input, sparsity: float = 0.9):
    """90 % unstructured magnitude (encoder matrices) + CSR Linear where faster, chosen per (batch, threads)."""
    base = copy.deepcopy(dense)
    prunekit.prune(base, "unstructured", sparsity, targets=default_targets(base))
    cache: dict[tuple[int, int], torch.nn.Module] = {}

    def get(b: int, t: int) -> torch.nn.Module:
        if (b, t) not in cache:
            m = copy.deepcopy(base)
            rep = sparsify_linears(m, make_input(b), num_threads=t)
            m.csr_layers = sum(r["chosen"] == "csr" for r in rep)   # type: ignore[assignment]
            cache[(b, t)] = m
        return cache[(b, t)]
    return base, get


def heads_neurons(model: torch.nn.Module, x: Any, heads: float, neurons: float) -> Any:
    masks = prunekit.prune(model, "heads", heads, example_inputs=x)
    for n, t in prunekit.prune(model, "neurons", neurons, example_inputs=x).items():
        masks.update(n, t)
    return masks


def part_minilm(a) -> dict:
    wl, masks, recipe = load_run_workload(a.run)
    dense = copy.deepcopy(wl.model)
    load_checkpoint(Path(a.run) / "dense", dense)
    make = token_input(dense.config.vocab_size, a.seq, "token_type_ids" in wl.example_input)
    x = make(2)
    comp = copy.deepcopy(wl.model)
    res = prunekit.compact(comp, masks, x)
    calib = [{k: v for k, v in b.items() if k != "labels"} for _, b in zip(range(a.calib_batches), wl.train_loader)]
    files = artefacts(dense.eval(), comp.eval(), x, calib, a.work / "minilm", "dynamic")
    csr_base, csr = csr_models(dense, make)
    acc = {k: float(wl.task.evaluate(OrtModel(f["file"]), wl.eval_loader)[wl.task.metric]) for k, f in files.items()}
    acc["pytorch_dense"] = float(wl.task.evaluate(dense, wl.eval_loader)[wl.task.metric])
    acc["pytorch_compacted"] = float(wl.task.evaluate(comp, wl.eval_loader)[wl.task.metric])
    acc["pytorch_csr90"] = float(wl.task.evaluate(csr_base, wl.eval_loader)[wl.task.metric])
    print("  accuracy: " + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()), flush=True)
    rows = [] if a.accuracy_only else time_grid(files, lambda b, t: {"pytorch_compacted": comp, "pytorch_csr90": csr(b, t)}, make,
                     a.batches, a.threads, a.repeats, a.ov)
    return {"model": "minilm-l6 fine-tuned on SST-2", "run": str(a.run), "metric": wl.task.metric,
            "dev_examples": wl.info.get("eval_examples"), "accuracy": acc, "files": files,
            "params": {"dense": res.params_before, "compacted": res.params_after},
            "results_json": json.loads((Path(a.run) / "results.json").read_text()).get("metrics", {}), "latency": rows}


def part_bertbase(a) -> dict:
    from transformers import BertConfig, BertModel  # noqa: PLC0415

    torch.manual_seed(0)
    dense = BertModel(BertConfig(num_hidden_layers=a.bert_layers), add_pooling_layer=False).eval()
    make = token_input(dense.config.vocab_size, a.seq, True)
    x = make(2)
    pruned = copy.deepcopy(dense)
    masks = heads_neurons(pruned, x, 0.5, 0.75)
    res = prunekit.compact(pruned, masks, x)
    files = artefacts(dense, pruned, x, [make(8)], a.work / "bertbase", "dynamic")
    rows = time_grid(files, lambda b, t: {"pytorch_compacted": pruned}, make, a.bert_batches or a.batches, a.threads,
                     a.repeats, a.ov)
    return {"model": f"BERT-base shape ({a.bert_layers} layers), random weights: speed only", "files": files,
            "params": {"dense": res.params_before, "compacted": res.params_after}, "latency": rows}


def part_resnet(a) -> dict:
    torch.manual_seed(0)
    dense = resnet18_cifar().eval()

    def make(b: int) -> torch.Tensor:
        return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(b))
    x = make(2)
    comp = copy.deepcopy(dense)
    masks = prunekit.prune(comp, "channels", 0.5, example_inputs=x)
    res = prunekit.compact(comp, masks, x)
    files = artefacts(dense, comp, x, [make(16) for _ in range(4)], a.work / "resnet", "static")
    rows = time_grid(files, lambda b, t: {"pytorch_compacted": comp}, make, a.batches, a.threads, a.repeats, a.ov)
    return {"model": "resnet18_cifar (32x32), random weights: speed only", "files": files,
            "params": {"dense": res.params_before, "compacted": res.params_after}, "latency": rows}


def table(doc: dict) -> str:
    """Markdown: per part, one line per variant — dev accuracy (MiniLM), file bytes, ms and speed-up over the
    ONNX Runtime dense fp32 session of the same loop for every (batch, threads)."""
    out = []
    for name, part in doc["parts"].items():
        lat = part["latency"] or [{"batch": "-", "threads": "-", "ms": dict.fromkeys(part["accuracy"], float("nan")),
                                   "speedup": dict.fromkeys(part["accuracy"], float("nan"))}]
        cols = [f"b{r['batch']} t{r['threads']}" for r in lat]
        acc = part.get("accuracy", {})
        out += [f"**{part['model']}** — parameters {part['params']['dense']:,} → {part['params']['compacted']:,} "
                "compacted", "", "| variant | dev " + part.get("metric", "metric") + " | bytes | "
                + " | ".join(f"{c} ms (×)" for c in cols) + " |", "|---|---:|---:|" + "---:|" * len(cols)]
        keys = list(lat[0]["ms"]) + [k for k in lat[0].get("openvino", {}).get("ms", {}) if k != BASE]
        for k in keys:
            cells = []
            for r in lat:
                src = r if k in r["ms"] else r["openvino"]
                cells.append(f"{src['ms'][k]:.1f} ({src['speedup'][k]:.2f}×)")
            f = part["files"].get(k) or part["files"].get(k.replace("openvino", "ort", 1))
            a = acc.get(k, acc.get(k.replace("openvino", "ort", 1))) if not k.startswith("openvino") else None
            out.append(f"| {k} | {'' if a is None else f'{a:.2f}'} | {f['bytes']:,} | " if f else f"| {k} | "
                       f"{'' if a is None else f'{a:.2f}'} | | ")
            out[-1] += " | ".join(cells) + " |"
        out.append("")
    return "\n".join(out)


def merge(files: list[Path], out: Path) -> int:
    docs = [json.loads(f.read_text()) for f in files]
    doc = {"command": "python benchmarks/deploy.py --merge " + " ".join(map(str, files)),
           "commands": [d["command"] for d in docs], "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": docs[0]["machine"], "machines": [d["machine"] for d in docs], "baseline": BASE,
           "settings": [d["settings"] for d in docs], "parts": {},
           "complete": all(d.get("complete") for d in docs)}
    for d in docs:            # a part measured twice (e.g. bertbase at two layer counts) keeps both
        for k, v in d["parts"].items():
            doc["parts"][k if k not in doc["parts"] else f"{k}_{len(doc['parts'])}"] = v
    atomic_write_json(out, doc)
    print(f"wrote {out}")
    return 0


PARTS = {"minilm": part_minilm, "bertbase": part_bertbase, "resnet": part_resnet}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=None, help="finished run of recipes/glue_sst2_deploy.yaml (minilm)")
    ap.add_argument("--parts", default="minilm,resnet,bertbase")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--bert-layers", type=int, default=12)
    ap.add_argument("--bert-batches", default=None, help="bertbase: batch sizes (default: --batches)")
    ap.add_argument("--accuracy-only", action="store_true", help="minilm: dev accuracy of every artefact, no timing")
    ap.add_argument("--calib-batches", type=int, default=4, help="minilm static int8: training batches (of 32)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/prunekit_deploy_bench"))
    ap.add_argument("--quick", action="store_true", help="smoke: batch 1 and 4, 1 thread, 3 repeats, 2 BERT layers")
    ap.add_argument("--no-openvino", action="store_true", help="ONNX Runtime only even if OpenVINO is installed")
    ap.add_argument("--merge", type=Path, nargs="+", default=None, help="combine the parts of these JSON files")
    ap.add_argument("--table", action="store_true", help="print --out as markdown tables")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    if a.merge:
        return merge(a.merge, a.out)
    if a.table:
        print(table(json.loads(a.out.read_text())))
        return 0
    a.ov = None if a.no_openvino else openvino_core()
    ints = lambda s: tuple(int(v) for v in s.split(",") if v.strip())  # noqa: E731
    a.batches, a.threads = ints(a.batches), ints(a.threads)
    a.bert_batches = ints(a.bert_batches) if a.bert_batches else None
    if a.quick:
        a.batches, a.threads, a.repeats, a.bert_layers = (1, 4), (1,), 3, 2
    parts = [p for p in a.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS] + (["minilm needs --run"] if "minilm" in parts and not a.run else [])
    if unknown:
        ap.error(f"bad --parts {unknown}; choose from {list(PARTS)}")
    doc: dict[str, Any] = {"command": "python " + " ".join([f"benchmarks/{Path(__file__).name}", *sys.argv[1:]]),
                           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "machine": {**machine_info(), "load_average_at_start": os.getloadavg(),
                                       "onnxruntime": onnxruntime.__version__,
                                       "openvino": a.ov.get_versions("CPU")["CPU"].build_number if a.ov else None},
                           "settings": {"batches": a.batches, "threads": a.threads, "seq": a.seq, "repeats": a.repeats},
                           "baseline": BASE, "parts": {}, "complete": False}
    for p in parts:
        t0 = time.time()
        print(f"[{p}]", flush=True)
        doc["parts"][p] = {**PARTS[p](a), "seconds": time.time() - t0}
        atomic_write_json(a.out, doc)
    doc["complete"] = True
    atomic_write_json(a.out, doc)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
