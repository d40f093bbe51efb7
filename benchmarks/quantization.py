"""Joint pruning + quantization on LeNet-5 / MNIST (and the ResNet-18 code path): prunekit's methods beside
PyTorch fake-quant QAT and NNCF on the same model, in the same run.

One command per row (the JSON keeps every row's command; rows of earlier invocations are kept); then
``--rows refresh`` re-encodes every row's artefact (plain, Huffman- and LZMA-coded) so all figures come from one
encoder::

    python benchmarks/quantization.py --rows prune300 rtn_int3 qat_int3 share_c8 admm_joint binary sparsegpt_int4 resnet18 \
        torch_fakequant nncf
    python benchmarks/quantization.py --rows minilm_sst2_rtn_int8 minilm_sst2_sparsegpt_int4 \
        minilm_sst2_sparsegpt_then_rtn4 minilm_sst2_sparsegpt_qat4 gpt2_lm_rtn_int4 gpt2_lm_sparsegpt_int4 \
        gpt2_lm_sparsegpt_then_rtn4

Inputs (``benchmarks/results/cache/``, not in git): the dense LeNet-5 of ``benchmarks/lenet5_mnist.py``
(``lenet5_sgd_tall_d3/dense``) and its 300× progressive-ADMM pruned model (``lenet5_prune300``, made by
``python benchmarks/lenet5_mnist.py --part unstructured --methods admm_progressive --ladder 300
--search-epochs 3 --retrain-epochs 2``; its row is imported as the "pruning alone" row).

Rows (each a prunekit recipe run through ``run_pipeline``; the resolved recipe is in the row):

* ``rtn_int3`` — the 300× model, round-to-nearest 3-bit (no training);
* ``qat_int3`` — the 300× model, quantization-aware retraining (STE) onto 3-bit per-tensor grids;
* ``share_c8`` — the 300× model, Deep Compression weight sharing (8 centroids per layer, centroids fine-tuned);
* ``admm_joint`` — ADMM-NN: progressive ADMM from the dense model with the Z-step onto "pruned and quantized",
  bits 8 → 4 → 3 while the pruning targets rise, then QAT retraining (``recipes/lenet5_admm_quant.yaml``);
* ``sparsegpt_int4`` — post-training only: SparseGPT 50 % with GPTQ-style joint rounding to 4 bits per channel
  (128 calibration images), no retraining;
* ``joint_ternary`` — the ``admm_joint`` model (cached in ``lenet5_admm_joint`` after that row) retrained onto
  ternary grids (−α, 0, +α; its zeros are counted as pruned), 1 epoch;
* ``binary`` — every layer ±α (no pruning), QAT from the dense model (``recipes/lenet5_binary.yaml``);
* ``resnet18`` — ResNet-18 on the CIFAR-10 sample, 50 % + int:4 per channel: the code path for convolutions,
  residuals and BatchNorm (not an accuracy claim);
* ``torch_fakequant`` — peer: ``torch.ao.quantization.FakeQuantize`` (per-tensor symmetric, 3 bits, moving
  min/max observer) as a weight parametrization under the same masks, retrained like ``qat_int3``;
* ``nncf`` — peer: ``nncf.quantize`` (post-training INT8) of the 300× model, if nncf imports.

Transformer rows (post-training only, 128 calibration examples of the training split, no retraining; the dense
metric is evaluated from the same checkpoint in the same run):

* ``minilm_sst2_sparsegpt_int4`` — MiniLM-L6 fine-tuned on SST-2 (``recipes/glue_sst2_bench.yaml``: 8000-sentence
  subset, 2 dense epochs), SparseGPT 50 % unstructured with joint GPTQ rounding to 4 bits per channel
  (target: within 2.5 accuracy points of dense);
* ``minilm_sst2_rtn_int8`` — the same dense model, 8-bit per-channel round-to-nearest alone (target: within 0.5);
* ``minilm_sst2_sparsegpt_then_rtn4`` — SparseGPT 50 % (``algorithm.params.joint: false``), then 4-bit
  round-to-nearest (the comparison for the joint row);
* ``minilm_sst2_sparsegpt_qat4`` — the joint row, then 1 epoch of quantization-aware retraining (STE, the bench
  recipe's retrain phase: AdamW 5e-5 on the 8000-sentence subset; target: within 1.5 points);
* ``gpt2_lm_sparsegpt_int4`` / ``gpt2_lm_sparsegpt_then_rtn4`` / ``gpt2_lm_rtn_int4`` — the 4-layer width-128
  GPT-2 decoder trained on SST-2 sentences (``recipes/gpt2_sst2_text_sparsegpt_2of4.yaml``'s dense stage),
  held-out perplexity on the dev windows: joint 50 % + 4 bits, 50 % then 4-bit round-to-nearest, 4-bit alone.

Their dense checkpoints are prunekit ``dense/`` folders copied to ``benchmarks/results/cache/minilm_sst2_dense``
and ``gpt2_sst2_lm_dense`` (each with the ``source_recipe.yaml`` of the run that trained it); without them the
row trains one with the recipe's dense stage (``benchmarks/posttraining.py``'s ``dense_recipe``).

Figures per row: accuracy and drop vs the dense model; sparsity; ``weight_data_compression`` (dense fp32
weight bytes / codes + scales + positions), ``weight_values_compression`` (codes + scales, no positions),
``whole_artefact_compression`` (every byte of ``model.pkq``), the byte breakdown and bits per weight per layer.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from lenet5_mnist import algorithm, layer_budget  # noqa: E402
from posttraining import dense_recipe  # noqa: E402
from prunekit.core.quant import ConstraintSet, parse_quantizer  # noqa: E402
from prunekit.deploy.quant_storage import artefact_report, encode_artefact, load_artefact  # noqa: E402
from prunekit.io.checkpoint import atomic_write_json, load_checkpoint  # noqa: E402
from prunekit.pipelines.recipe import parse_recipe  # noqa: E402
from prunekit.pipelines.runner import machine_info, run_pipeline  # noqa: E402
from prunekit.pipelines.workloads import build_workload  # noqa: E402

CACHE = ROOT / "benchmarks/results/cache"
DENSE = CACHE / "lenet5_sgd_tall_d3/dense"
PRUNED = CACHE / "lenet5_prune300"
ANCHORS = {"pruning": {"progressive ADMM (Ye et al. 2019)": 246, "sparse VD (Molchanov et al. 2017)": 280},
           "joint": {"ADMM-NN (Ren et al. 2019), weight data": 1910, "Deep Compression (Han et al. 2016)": 39},
           "binary": "progressive ADMM: lossless fully binarized LeNet-5 (Ye et al. 2019)"}


def lenet_recipe(name: str, rate: float, checkpoint: Path, algo: dict, quant: dict, retrain_epochs: float,
                 search_epochs: float = 0.0, lr: float = 1e-3) -> dict:
    b = layer_budget(rate) if rate > 1 else {"fc1": 0.0, "conv1": 0.0, "conv2": 0.0, "fc2": 0.0}
    sp = b.pop("fc1")
    return {"name": name, "seed": 0, "model": {"name": "lenet5", "checkpoint": str(checkpoint)},
            "data": {"name": "mnist", "batch_size": 128, "eval_batch_size": 1000},
            "prune": {"structure": "unstructured", "sparsity": sp, "scope": "layer",
                      "overrides": b if rate > 1 else {}, "targets": {"include": ["*"], "types": ["Linear", "Conv2d"]}},
            "algorithm": algo, "quant": quant,
            "train": {"optimizer": "adam", "lr": lr, "weight_decay": 0.0, "scheduler": "cosine", "epochs": 1},
            "search": {"epochs": search_epochs, "scheduler": "none"}, "retrain": {"epochs": retrain_epochs}}


def recipes() -> dict[str, dict]:
    steps = 469
    t3 = "int:3:sym:tensor"
    return {
        "rtn_int3": lenet_recipe("lenet5-300x-rtn-int3", 300, PRUNED, {"name": "oneshot"},
                                 {"scheme": t3, "method": "rtn"}, 0),
        "qat_int3": lenet_recipe("lenet5-300x-qat-int3", 300, PRUNED, {"name": "oneshot"},
                                 {"scheme": t3, "method": "qat"}, 2, lr=5e-4),
        "share_c8": lenet_recipe("lenet5-300x-share-c8", 300, PRUNED, {"name": "oneshot"},
                                 {"scheme": "cluster:8", "method": "share"}, 1, lr=5e-4),
        "admm_joint": lenet_recipe("lenet5-admm-joint-150x-int3", 150, DENSE,
                                   algorithm("admm_progressive", layer_budget(150)["fc1"], steps, 3.0),
                                   {"scheme": t3, "schedule": ["int:8:sym:tensor", "int:4:sym:tensor"]}, 2, 3.0),
        "binary": lenet_recipe("lenet5-binary", 1, DENSE, {"name": "oneshot"}, {"scheme": "binary"}, 2, lr=5e-4),
        "joint_ternary": lenet_recipe("lenet5-admm-joint-ternary", 150, CACHE / "lenet5_admm_joint",
                                      {"name": "oneshot"}, {"scheme": "ternary", "method": "qat"}, 1, lr=5e-4),
        "sparsegpt_int4": lenet_recipe("lenet5-sparsegpt-50-int4", 1, DENSE,
                                       {"name": "sparsegpt", "params": {"blocksize": 128, "percdamp": 0.01}},
                                       {"scheme": "int:4", "method": "rtn"}, 0)
        | {"prune": {"structure": "unstructured", "sparsity": 0.5,
                     "targets": {"include": ["*"], "types": ["Linear", "Conv2d"]}},
           "calibration": {"samples": 128, "batch_size": 64, "seed": 0}},
    }


SGPT = {"name": "sparsegpt", "params": {"blocksize": 128, "percdamp": 0.01}}
CALIB = {"samples": 128, "batch_size": 16, "max_length": 64, "seed": 0}
# row suffix → (algorithm, sparsity, quant, target: max drop in points (accuracy) / max perplexity ratio (LM))
PTQ = {"sparsegpt_int4": (SGPT, 0.5, {"scheme": "int:4", "method": "rtn"}),
       "sparsegpt_then_rtn4": ({"name": "sparsegpt", "params": {**SGPT["params"], "joint": False}}, 0.5,
                               {"scheme": "int:4", "method": "rtn"}),
       "rtn_int8": ({"name": "oneshot"}, 0.0, {"scheme": "int:8", "method": "rtn"}),
       "rtn_int4": ({"name": "oneshot"}, 0.0, {"scheme": "int:4", "method": "rtn"}),
       "sparsegpt_qat4": (SGPT, 0.5, {"scheme": "int:4", "method": "qat"})}
RETRAIN = {"sparsegpt_qat4": {"epochs": 1, "lr": 5.0e-5, "patience": 1}}     # the bench recipe's retrain phase
TARGETS = {"minilm_sst2_sparsegpt_int4": 2.5, "minilm_sst2_rtn_int8": 0.5, "minilm_sst2_sparsegpt_qat4": 1.5}
DENSE_CKPT = {"minilm_sst2": ("glue_sst2_bench.yaml", CACHE / "minilm_sst2_dense"),
              "gpt2_lm": ("gpt2_sst2_text_sparsegpt_2of4.yaml", CACHE / "gpt2_sst2_lm_dense")}


def dense_checkpoint(prefix: str) -> Path:
    """The cached dense model of ``prefix``; trained by the recipe's dense stage if absent."""
    name, ckpt = DENSE_CKPT[prefix]
    if (ckpt / "manifest.json").is_file():
        return ckpt
    raw = yaml.safe_load((ROOT / "recipes" / name).read_text())
    raw.update(prune={"structure": "unstructured", "sparsity": 0.0}, algorithm={"name": "oneshot"},
               retrain={"epochs": 0})
    if prefix == "gpt2_lm":
        raw["dense"] = {"epochs": raw["train"]["epochs"]}
    return Path(dense_recipe(parse_recipe(raw), CACHE, f"{prefix}_run").model.checkpoint)


def ptq_recipe(row: str) -> dict:
    """A post-training row of a transformer: ``<prefix>_<PTQ suffix>`` on the cached dense checkpoint."""
    prefix = next((p for p in DENSE_CKPT if row.startswith(p + "_")), None)
    if prefix is None or row[len(prefix) + 1:] not in PTQ:
        raise SystemExit(f"unknown row {row!r}")
    suffix = row[len(prefix) + 1:]
    algo, sparsity, quant = PTQ[suffix]
    raw = yaml.safe_load((ROOT / "recipes" / DENSE_CKPT[prefix][0]).read_text())
    prune = {**raw["prune"], "structure": "unstructured", "sparsity": sparsity}
    raw.update(name=f"quant-{row}", prune=prune, algorithm=copy.deepcopy(algo), quant=dict(quant),
               calibration=dict(CALIB), dense={"epochs": 0}, retrain=dict(RETRAIN.get(suffix, {"epochs": 0})))
    raw["model"] = {**raw["model"], "checkpoint": str(dense_checkpoint(prefix))}
    return raw


def ptq_row(name: str) -> dict:
    """Run a transformer row; perplexity rows report ``perplexity`` (lower is better) instead of accuracy."""
    row = run_recipe(name, ptq_recipe(name), 0.0)
    metric = json.loads((Path(row["artefact"]).parent / "results.json").read_text()).get("metric", "accuracy")
    row["metric"] = metric
    if metric == "perplexity":
        row["perplexity"], row["dense_perplexity"] = row.pop("accuracy"), row.pop("dense_accuracy")
        row["perplexity_ratio"] = round(row["perplexity"] / row["dense_perplexity"], 4)
        row.pop("accuracy_drop")
    else:
        row["accuracy_drop"] = round(row["dense_accuracy"] - row["accuracy"], 3)
        if name in TARGETS:
            row["target_max_drop"] = TARGETS[name]
            row["target_met"] = row["accuracy_drop"] <= TARGETS[name]
    return row


def resnet_recipe() -> dict:
    return {"name": "resnet18-cifar-int4", "seed": 0, "model": {"name": "resnet18_cifar"},
            "data": {"name": "cifar10", "batch_size": 64, "eval_batch_size": 256, "limit": 512, "eval_limit": 256},
            "prune": {"structure": "unstructured", "sparsity": 0.5},
            "algorithm": {"name": "oneshot"}, "quant": {"scheme": "int:4", "method": "qat"},
            "train": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "epochs": 1},
            "dense": {"epochs": 1}, "retrain": {"epochs": 1}}


def _row_from(res: dict, name: str, raw: dict, dense_acc: float, t0: float) -> dict:
    q = res.get("quant", {})
    acc = res["score"]
    return {"row": name, "model": raw["model"]["name"], "accuracy": acc, "dense_accuracy": dense_acc,
            "accuracy_drop": round(dense_acc - acc, 3), "accuracy_after_hard_prune": res.get("score_after_hard_prune"),
            "sparsity": round(res["sparsity"], 6), "targeted_compression_rate": round(res["targeted_compression_rate"], 2),
            "quant": {k: q.get(k) for k in ("scheme", "overrides", "method", "schedule", "entropy")},
            **{k: q.get(k) for k in ("weight_data_compression", "weight_values_compression",
                                     "whole_artefact_compression", "file_bytes", "bytes", "dense_fp32_weight_bytes")},
            "layers": [{k: v for k, v in layer.items()} for layer in q.get("layers", [])],
            "seconds": round(time.perf_counter() - t0, 1), "recipe": raw}


def run_recipe(name: str, raw: dict, dense_acc: float) -> dict:
    t0 = time.perf_counter()
    out = Path(tempfile.gettempdir()) / "prunekit_quant_runs" / raw["name"]
    res = run_pipeline(parse_recipe(raw), out, log=print, overwrite=True)
    row = _row_from(res, name, raw, dense_acc if raw["model"]["name"] == "lenet5" else res["dense_score"], t0)
    row["artefact"] = str(out / "model.pkq")
    return row


def _masked_loader_model():
    raw = lenet_recipe("peer", 300, PRUNED, {"name": "oneshot"}, {}, 1)
    raw.pop("quant")
    wl = build_workload(parse_recipe(raw))
    load_checkpoint(PRUNED, wl.model)
    return wl


def torch_fakequant_row(dense_acc: float, bits: int = 3, epochs: float = 2, lr: float = 5e-4) -> dict:
    """Peer: torch.ao FakeQuantize weight parametrization (per-tensor symmetric, ``bits``), masks kept."""
    from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver  # noqa: PLC0415
    from torch.nn.utils import parametrize  # noqa: PLC0415
    t0 = time.perf_counter()
    wl = _masked_loader_model()
    model, task = wl.model, wl.task
    masks = {n: (p != 0) for n, p in model.named_parameters() if n.endswith("weight")}
    q = 2 ** (bits - 1) - 1

    class FQ(torch.nn.Module):
        def __init__(self, mask):
            super().__init__()
            self.register_buffer("mask", mask)
            self.fq = FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=-q, quant_max=q, dtype=torch.qint8,
                                   qscheme=torch.per_tensor_symmetric)

        def forward(self, w):
            return self.fq(w * self.mask) * self.mask

    mods = dict(model.named_modules())
    for n, m in masks.items():
        parametrize.register_parametrization(mods[n.removesuffix(".weight")], "weight", FQ(m))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    total = int(epochs * len(wl.train_loader))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + __import__("math").cos(__import__("math").pi * s / total)))
    step = 0
    while step < total:
        model.train()
        for x, y in wl.train_loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step >= total:
                break
    acc = task.evaluate(model, wl.eval_loader)[task.metric]
    with torch.no_grad():
        kept = {n: int((mods[n.removesuffix(".weight")].weight != 0).sum()) for n in masks}
        levels = {n: int(torch.unique(mods[n.removesuffix(".weight")].weight).numel()) for n in masks}
    return {"row": "torch_fakequant", "peer": "torch.ao.quantization.FakeQuantize (per-tensor symmetric, "
            f"{bits} bits, MovingAverageMinMaxObserver) as a weight parametrization under prunekit's masks",
            "accuracy": acc, "dense_accuracy": dense_acc, "accuracy_drop": round(dense_acc - acc, 3),
            "kept_weights": kept, "distinct_values": levels, "epochs": epochs, "lr": lr,
            "note": "fake-quant stores no artefact: the weights stay fp32 with scale/zero point in the observer; "
                    "weight data compression = the same codes as prunekit's rows would need",
            "seconds": round(time.perf_counter() - t0, 1)}


def nncf_row(dense_acc: float) -> dict:
    # NNCF compiles a C++ extension on first use; its 60 s default limit is too short on a loaded 2-core machine
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")
    t0 = time.perf_counter()
    try:
        import nncf  # noqa: PLC0415
    except Exception as e:  # noqa: BLE001 - any import failure is the recorded reason
        return {"row": "nncf", "peer": "nncf", "error": f"import failed: {e!r}"}
    try:
        wl = _masked_loader_model()
        model, task = wl.model.eval(), wl.task
        calib = nncf.Dataset(wl.train_loader, lambda b: b[0])
        qm = nncf.quantize(model, calib, subset_size=512)
        acc = task.evaluate(qm, wl.eval_loader)[task.metric]
        return {"row": "nncf", "peer": f"nncf {nncf.__version__} nncf.quantize (post-training INT8, 512 calibration "
                "images) of the 300x pruned model", "accuracy": acc, "dense_accuracy": dense_acc,
                "accuracy_drop": round(dense_acc - acc, 3), "seconds": round(time.perf_counter() - t0, 1),
                "note": "NNCF 3.x has no pruning of its own (removed 2025); it quantizes the model prunekit pruned"}
    except Exception as e:  # noqa: BLE001
        return {"row": "nncf", "peer": "nncf", "error": f"{type(e).__name__}: {e}"[:600],
                "trace": traceback.format_exc()[-1500:]}


def pruning_row() -> dict:
    b = json.loads((PRUNED / "bench_row.json").read_text())
    r = b["rows"][-1]
    return {"row": "prune300", "accuracy": r["accuracy"], "dense_accuracy": r["dense_accuracy_same_eval"],
            "accuracy_drop": r["accuracy_drop"], "targeted_compression_rate": r["targeted_compression_rate"],
            "sparsity": r["sparsity"], "weight_values_compression": r["targeted_compression_rate"],
            "seconds": r["seconds"], "command": b["command"], "layer_density": r["layer_density"],
            "note": "pruning alone; fp32 values, compression = dense / nonzero weights of the four weight tensors"}


def refresh_rows(res: dict) -> None:
    """Re-encode every row's artefact with the current format, plain and with LZMA entropy coding (the
    Shannon bound of the codes beside it): the figures of all rows then come from one encoder."""
    for row in res["rows"].values():
        path = row.get("artefact")
        if not path or not Path(path).is_file():
            continue
        state = load_artefact(path)
        qcodes = {}
        for layer in row.get("layers", []):
            n = layer["name"]
            qcodes[n] = ConstraintSet(parse_quantizer(layer["quantizer"])).check(state[n], state[n] != 0)
        for key, ent in (("plain", None), ("huffman", "huffman"), ("lzma", "lzma")):
            rep = artefact_report(encode_artefact(state, qcodes, ent))
            fig = {k: rep[k] for k in ("file_bytes", "bytes", "weight_data_compression", "weight_values_compression",
                                       "whole_artefact_compression")}
            fig["shannon_code_bytes"] = round(sum(layer["shannon_code_bytes"] for layer in rep["layers"]), 1)
            if key == "plain":
                row.update(fig)
                row["layers"] = rep["layers"]
            else:
                row[f"entropy_{key}"] = fig


def table(res: dict) -> str:
    """The rows as a markdown table (accuracy, drop, pruning rate, the three compression figures, seconds)."""
    lines = ["| row | accuracy | drop vs dense | pruning rate | weight data × | weight values × | whole artefact × | "
             "Huffman: weight data × / artefact × | seconds |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in res["rows"].items():
        h = r.get("entropy_huffman") or {}
        lines.append(f"| {name} | {r.get('accuracy', r.get('perplexity', '—'))} | {r.get('accuracy_drop', '—')} | "
                     f"{r.get('targeted_compression_rate', '—')} | {r.get('weight_data_compression', '—')} | "
                     f"{r.get('weight_values_compression', '—')} | {r.get('whole_artefact_compression', '—')} | "
                     f"{h.get('weight_data_compression', '—')} / {h.get('whole_artefact_compression', '—')} | "
                     f"{r.get('seconds', '—')} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", nargs="+", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/quantization.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.environ.setdefault("PRUNEKIT_NO_PROGRESS", "1")
    out_path = Path(a.out)
    res = json.loads(out_path.read_text()) if out_path.exists() else {"rows": {}}
    res.update({"machine": machine_info(), "anchors": ANCHORS, "docs": "docs/quantization.md"})
    dense_acc = res.get("dense_accuracy", 0.0)        # the LeNet-5 dense model's (rows of other models: their own)
    if (DENSE / "results.json").is_file():
        dense_acc = res["dense_accuracy"] = json.loads((DENSE / "results.json").read_text())["accuracy"]
    recs = recipes()
    if a.rows == ["refresh"]:
        refresh_rows(res)
        atomic_write_json(out_path, res)
        print(table(res))
        return res
    for name in a.rows:
        cmd = "python benchmarks/quantization.py --rows " + shlex.quote(name)
        print(f"== {name}", flush=True)
        if name in recs:
            row = run_recipe(name, copy.deepcopy(recs[name]), dense_acc)
        elif name == "resnet18":
            row = run_recipe(name, resnet_recipe(), dense_acc)
        elif name == "torch_fakequant":
            row = torch_fakequant_row(dense_acc)
        elif name == "nncf":
            row = nncf_row(dense_acc)
        elif name == "prune300":
            row = pruning_row()
        elif name.startswith(tuple(DENSE_CKPT)):
            row = ptq_row(name)
        else:
            raise SystemExit(f"unknown row {name!r}")
        row.setdefault("command", cmd)
        row["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if out_path.exists():        # another invocation may have written rows meanwhile: keep them
            res["rows"] = {**json.loads(out_path.read_text()).get("rows", {}), **res["rows"]}
        res["rows"][name] = row
        atomic_write_json(out_path, res)
        print(json.dumps({k: v for k, v in row.items() if k not in ("layers", "recipe", "trace")}), flush=True)
    return res


if __name__ == "__main__":
    main()
