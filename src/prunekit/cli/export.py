"""``prunekit export RUN_DIR --format onnx [--int8 dynamic|static] [--out DIR]`` — the deployable artefact
of a run, evaluated.

1. The run's model is rebuilt from its recipe, its weights and masks loaded (as ``prunekit compact``), and
   compacted on the fly by the verified :func:`prunekit.compact` (a model that does not trace or has no
   removable unit is exported as it is, with a note).
2. :func:`prunekit.deploy.export.export` writes ONNX (fp32 checked against PyTorch, relative ``--rtol`` on
   every output on its own scale, also on the first dev batch — else the export is refused, exit code 2)
   and, with ``--int8``, ONNX Runtime's int8 (``dynamic``: ``quantize_dynamic`` per channel; ``static``:
   ``quantize_static`` QDQ with ``--calibration-samples`` training examples of the run's own data set).
3. The artefact is run by ONNX Runtime over the run's dev/test set (the task's own ``evaluate``) and its
   metric compared with the PyTorch model's; a loss of more than ``--tolerance`` points prints a WARNING
   line and sets ``tolerance_exceeded`` in the record.
4. Latency: ONNX Runtime vs the PyTorch compacted model on the run's example input (one dev example; token
   inputs tiled to ``--seq`` positions, default ``data.max_length``; ``input_shape`` is recorded) repeated to each ``--batches`` size at each ``--threads`` count (warm-up, interleaved, median of ``--repeats``;
   :func:`prunekit.deploy.timing.interleaved_ms`).

The record is written into ``RUN_DIR/results.json`` under ``export`` → ``onnx-fp32`` / ``onnx-int8-dynamic``
/ ``onnx-int8-static`` (several exports of one run sit side by side) and printed.
"""
from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from prunekit.algorithms.calibration import collect_batches, model_inputs
from prunekit.cli.compact import add_trust_flag, load_run_workload
from prunekit.core.errors import CheckpointError
from prunekit.deploy.export import INT8_MODES, ExportError, OrtModel, check_onnx, export, ort_latency_ms
from prunekit.deploy.surgery import compact
from prunekit.deploy.timing import repeat_batch
from prunekit.graph import TraceError
from prunekit.io.checkpoint import atomic_write_json
from prunekit.pipelines.workloads import Workload

FORMATS = ("onnx",)


def add_parser(sub):
    p = sub.add_parser("export", help="compact a run and export it (ONNX fp32 / int8 dynamic|static), evaluate the "
                                      "artefact with ONNX Runtime on the dev set, time it; record in results.json",
                       description="Export a finished run for deployment: compacted model → ONNX (checked against "
                                   "PyTorch) → optional int8 by ONNX Runtime's quantization tools; the file is "
                                   "evaluated on the run's dev/test set and timed, and the record is written into "
                                   "RUN_DIR/results.json under 'export'.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="folder written by `prunekit run`")
    p.add_argument("--format", default="onnx", choices=FORMATS, help="artefact format (default onnx)")
    p.add_argument("--int8", default=None, choices=INT8_MODES,
                   help="int8 by ONNX Runtime: dynamic (weights per channel, activations at run time) or static "
                        "(QDQ, activation ranges from the run's training data)")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/export)")
    p.add_argument("--tolerance", type=float, default=1.0,
                   help="metric points the artefact may lose against PyTorch before a WARNING (default 1.0)")
    p.add_argument("--rtol", type=float, default=1e-4,
                   help="fp32 ONNX vs PyTorch: largest relative output error allowed (default 1e-4)")
    p.add_argument("--calibration-samples", type=int, default=None,
                   help="static int8: training examples for activation ranges (default: the recipe's calibration.samples)")
    p.add_argument("--batches", default="1,32", help="comma-separated batch sizes timed (default 1,32)")
    p.add_argument("--threads", default="1", help="comma-separated thread counts timed (default 1)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per variant (default 10)")
    p.add_argument("--seq", type=int, default=None,
                   help="token models: positions of the timed input (default: the recipe's data.max_length; the "
                        "example sentence is tiled, all positions attended)")
    p.add_argument("--no-compact", action="store_true", help="export the masked model without compaction")
    add_trust_flag(p)
    p.set_defaults(func=run)


def _compacted(wl: Workload, masks: Any, x: Any, no_compact: bool) -> tuple[Any, dict]:
    if no_compact:
        return wl.model, {"compacted": False, "note": "--no-compact"}
    model = copy.deepcopy(wl.model)
    try:
        res = compact(model, masks, x)
    except TraceError as e:
        return wl.model, {"compacted": False, "note": f"does not trace ({str(e).splitlines()[0][:160]}); exported uncompacted"}
    return model, {"compacted": True, "params_before": res.params_before, "params_after": res.params_after,
                   "removed": {k: v for k, v in res.removed.items() if v}}


def _metric(task: Any, model: Any, loader: Any) -> float:
    return float(task.evaluate(model, loader)[task.metric])


def at_length(x: Any, seq: int | None) -> Any:
    """Token inputs (a dict of ``(batch, length)`` tensors) tiled / cut to ``seq`` positions; else ``x``."""
    if seq is None or not isinstance(x, dict):
        return x
    out = {}
    for k, v in x.items():
        if isinstance(v, torch.Tensor) and v.dim() == 2:
            v = v.repeat(1, -(-seq // v.shape[1]))[:, :seq]
        out[k] = v
    return out


def _latency(path: Path, model: Any, x0: Any, batches: tuple[int, ...], threads: tuple[int, ...],
             repeats: int) -> list[dict]:
    rows = []
    for b in batches:
        x = repeat_batch(x0, b)
        for t in threads:
            ms = ort_latency_ms({"onnx": path}, x, threads=t, repeats=repeats, warmup=3, torch_models={"pytorch": model})
            first = next(iter(x.values())) if isinstance(x, dict) else x
            rows.append({"batch": b, "threads": t, "input_shape": list(first.shape), "onnx_ms": ms["onnx"],
                         "pytorch_ms": ms["pytorch"],
                         "speedup_vs_pytorch": ms["pytorch"] / ms["onnx"]})
    return rows


def export_run(run_dir: str | os.PathLike, *, int8: str | None = None, out: str | os.PathLike | None = None,
               tolerance: float = 1.0, rtol: float = 1e-4, calibration_samples: int | None = None,
               batches: tuple[int, ...] = (1, 32), threads: tuple[int, ...] = (1,), repeats: int = 10,
               no_compact: bool = False, seq: int | None = None, trust_code: bool = False, log=print) -> dict:
    """Compact, export, evaluate and time a run (module docstring); returns the record written into
    ``results.json`` under ``export[<key>]``.  Raises :class:`ExportError` when the fp32 graph does not
    reproduce PyTorch (nothing kept)."""
    run_dir = Path(run_dir)
    res_file = run_dir / "results.json"
    if not res_file.is_file():
        raise CheckpointError(f"{res_file} not found: export a finished `prunekit run` folder")
    out = Path(out) if out is not None else run_dir / "export"
    wl, masks, recipe = load_run_workload(run_dir, trust_code=trust_code)
    x = repeat_batch(wl.example_input, 2)          # batch 2: the exported batch axis stays dynamic
    model, comp = _compacted(wl, masks, x, no_compact)
    key = "onnx-fp32" if int8 is None else f"onnx-int8-{int8}"
    calib = None
    if int8 == "static":
        c = recipe.calibration
        calib = [model_inputs(b) for b in collect_batches(wl.train_loader, calibration_samples or c.samples,
                                                          c.batch_size, c.max_length, c.seed)]
    res = export(model, x, out / f"model.{key.removeprefix('onnx-')}.onnx", int8=int8, calibration=calib, rtol=rtol)
    dev_x = model_inputs(next(iter(wl.eval_loader)))
    dev_check = check_onnx(res.fp32_path, model, dev_x)
    if dev_check.max_rel > rtol:
        for f in {res.path, res.fp32_path}:
            f.unlink(missing_ok=True)
        raise ExportError(f"fp32 ONNX differs from PyTorch on the first dev batch by {dev_check.max_rel:.3g} relative "
                          f"(> rtol {rtol:g}); refusing the export")
    metric_pt = _metric(wl.task, model, wl.eval_loader)
    metric_onnx = _metric(wl.task, OrtModel(res.path), wl.eval_loader)
    loss = metric_pt - metric_onnx
    record = {"format": "onnx", **res.as_dict(), "metric_name": wl.task.metric, "metric": metric_onnx,
              "pytorch_metric": metric_pt, "metric_loss": loss, "tolerance": tolerance,
              "tolerance_exceeded": bool(loss > tolerance), "rtol": rtol,
              "fp32_dev_batch_max_rel_error": dev_check.max_rel, "eval_examples": wl.info.get("eval_examples"),
              "calibration_batches": len(calib) if calib else 0, **comp,
              "latency": _latency(res.path, model, at_length(wl.example_input, seq or recipe.data.max_length), batches,
                                  threads, repeats)}
    results = json.loads(res_file.read_text())
    results.setdefault("export", {})[key] = record
    atomic_write_json(res_file, results)
    if record["tolerance_exceeded"]:
        log(f"WARNING: the {key} artefact loses {loss:.2f} {wl.task.metric} points against PyTorch "
            f"({metric_onnx:.2f} vs {metric_pt:.2f}), more than the tolerance {tolerance:g}; flagged in {res_file}",
            file=sys.stderr)
    return record


def format_record(key: str, r: dict) -> str:
    lines = [f"{key}: {r['file']} ({r['bytes']:,} bytes; fp32 {r['fp32_bytes']:,})",
             f"{r['metric_name']}: ONNX Runtime {r['metric']:.2f} vs PyTorch {r['pytorch_metric']:.2f} "
             f"(ONNX − PyTorch {-r['metric_loss']:+.2f} points; loss tolerance {r['tolerance']:g}"
             + (", EXCEEDED" if r["tolerance_exceeded"] else "") + ")"]
    if r.get("compacted"):
        lines.append(f"compacted: {r['params_before']:,} → {r['params_after']:,} parameters")
    elif r.get("note"):
        lines.append(f"note: {r['note']}")
    lines += ["", "| batch | threads | ONNX Runtime ms | PyTorch ms | speed-up |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {x['batch']} | {x['threads']} | {x['onnx_ms']:.2f} | {x['pytorch_ms']:.2f} | "
              f"{x['speedup_vs_pytorch']:.2f} |" for x in r["latency"]]
    return "\n".join(lines)


def run(args) -> int:
    ints = lambda s: tuple(int(v) for v in s.split(",") if v.strip())  # noqa: E731
    r = export_run(args.run_dir, int8=args.int8, out=args.out, tolerance=args.tolerance, rtol=args.rtol,
                   calibration_samples=args.calibration_samples, batches=ints(args.batches),
                   threads=ints(args.threads), repeats=args.repeats, no_compact=args.no_compact, seq=args.seq,
                   trust_code=args.trust_code,
                   log=lambda *a, **k: print(*a, **k))
    print(format_record("onnx-fp32" if args.int8 is None else f"onnx-int8-{args.int8}", r))
    return 0
