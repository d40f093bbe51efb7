"""``prunekit run`` for a language model larger than memory: ``calibration.offload: true`` (or a
``calibration.max_memory``).

The recipe names a Hugging Face model folder (``model.safetensors`` or sharded) and language-modelling data
(``data.name: text`` or ``hf_disk``).  Nothing loads the whole model:

* calibration windows are drawn from the train windows (``calibration`` section) and the model is pruned
  block by block by :func:`prunekit.algorithms.offload.prune_offloaded` into ``OUT/model`` (sharded HF
  layout, config and tokenizer; ``from_pretrained(OUT/model)`` loads it; masks in ``OUT/model/prune_masks``);
  ``calibration.max_memory`` = bytes of calibration activations kept in memory (the rest spilled to disk);
* perplexity per token on the eval windows, dense and pruned, is measured with the model dispatched by
  accelerate (``from_pretrained(device_map=..., max_memory=..., offload_folder=...)``: the weights beyond
  ``max_memory`` stay on disk and are streamed in per layer);
* ``results.json`` (the keys ``prunekit report`` reads) and ``recipe.yaml`` are written into ``OUT``.

There is no training phase (the model is pretrained; ``retrain`` epochs are refused).  Started again on
the same ``OUT`` with ``resume=True`` (``prunekit run --resume``), a killed run continues at the block it
was in.
"""
from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml

from prunekit.adapters.hf import resolve_model_source
from prunekit.algorithms import get_algorithm_class
from prunekit.algorithms.calibration import PostTraining, collect_batches
from prunekit.algorithms.offload import STATE_DIR, empty_model, load_offload_masks, parse_bytes, prune_offloaded
from prunekit.core.errors import RecipeError
from prunekit.graph.families import default_targets
from prunekit.io.checkpoint import atomic_write_text
from prunekit.io.sharded import ShardReader
from prunekit.pipelines.recipe import Recipe, from_dict, to_dict
from prunekit.pipelines.runner import machine_info, prune_spec_from, run_device
from prunekit.pipelines.user_workloads import check_vocab, is_lm_recipe, lm_windows
from prunekit.training.tasks import CausalLMTask

__all__ = ["run_offloaded"]


def _check(recipe: Recipe) -> Path:
    kind, where = resolve_model_source(recipe.model.name)
    if kind != "folder":
        raise RecipeError(f"calibration.offload: model.name must be a model folder with safetensors shards, got "
                          f"{recipe.model.name!r} ({kind})")
    if not is_lm_recipe(recipe):
        raise RecipeError("calibration.offload works on causal language models: data.name text (or hf_disk with "
                          "task_type causal_lm)")
    if float(recipe.phase("retrain").epochs) > 0 and recipe.retrain.get("epochs"):
        raise RecipeError("calibration.offload prunes post-training only; set retrain.epochs: 0")
    return Path(where)


def _algorithm(recipe: Recipe, folder: Path) -> PostTraining[Any]:
    cls = get_algorithm_class(recipe.algorithm.name)
    if not issubclass(cls, PostTraining):
        raise RecipeError(f"calibration.offload needs a post-training algorithm (wanda, sparsegpt, obs_structured), "
                          f"got {recipe.algorithm.name!r}")
    if recipe.prune.targets.is_default:
        ts = default_targets(empty_model(folder, recipe.model.trust_remote_code))
        recipe.prune.targets.include, recipe.prune.targets.types = list(ts.include), list(ts.types)
    algo = cls(from_dict(cls.Params, recipe.algorithm.params, "algorithm.params"), prune_spec_from(recipe))
    algo.calibration = recipe.calibration
    return algo


@torch.no_grad()
def evaluate_dispatched(folder: Path, loader: Any, max_memory: int | None, device: torch.device,
                        offload_dir: Path) -> dict[str, float]:
    """Perplexity of the model in ``folder`` loaded by accelerate: on ``device`` up to ``max_memory``
    bytes, the rest offloaded to ``offload_dir`` (disk)."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415
    key: Any = device.index if device.type == "cuda" and device.index is not None else (
        0 if device.type == "cuda" else "cpu")
    kw: dict[str, Any] = {"device_map": {"": key}}
    if max_memory is not None:
        kw = {"device_map": "auto", "max_memory": {key: max_memory, **({} if key == "cpu" else {"cpu": max_memory})},
              "offload_folder": str(offload_dir), "offload_state_dict": True}
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, **kw).eval()
    try:
        return CausalLMTask().evaluate(model, loader)
    finally:
        del model
        shutil.rmtree(offload_dir, ignore_errors=True)


def _summary(out_model: Path) -> dict[str, Any]:
    """Sparsity and per-layer rows from the mask files, whole-model counts tensor by tensor from the shards."""
    masks = load_offload_masks(out_model)
    layers = [{"name": n, "shape": list(m.shape), "structure": masks.structures.get(n, ""),
               "sparsity": 1.0 - float(m.float().mean()), "nonzeros": int(m.sum())} for n, m in masks.items()]
    reader = ShardReader(out_model)
    total = nonzero = 0
    for n in reader.names():
        t = reader.load([n])[n]
        total, nonzero = total + t.numel(), nonzero + int(torch.count_nonzero(t))
    t_numel = sum(m.numel() for _, m in masks.items())
    t_nz = sum(int(m.sum()) for _, m in masks.items())
    return {"sparsity": 1.0 - t_nz / max(t_numel, 1), "compression_rate": total / max(nonzero, 1), "params": total,
            "nonzero_params": nonzero, "targeted_params": t_numel, "layers": layers}


def run_offloaded(recipe: Recipe, out_dir: str | Path, *, log: Callable[[str], None] = print,
                  resume: bool = False) -> dict[str, Any]:
    """Run an offloaded recipe (see the module doc); returns the results (also ``OUT/results.json``)."""
    t0 = time.perf_counter()
    budget = parse_bytes(recipe.calibration.max_memory)
    folder = _check(recipe)
    device = run_device(recipe)
    out = Path(out_dir)
    if (out / "model" / STATE_DIR).is_dir() and not resume:
        raise RecipeError(f"{out} holds an unfinished offloaded run; pass --resume to continue it")
    train, ev, tok = lm_windows(recipe)
    check_vocab(empty_model(folder, recipe.model.trust_remote_code), tok, recipe.model.name)
    algo = _algorithm(recipe, folder)
    c = recipe.calibration
    loader = torch.utils.data.DataLoader(train, batch_size=c.batch_size)
    batches = collect_batches(loader, c.samples, c.batch_size, c.max_length, c.seed)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "recipe.yaml", yaml.safe_dump(to_dict(recipe), sort_keys=False))
    ev_loader = torch.utils.data.DataLoader(ev, batch_size=recipe.data.eval_batch_size)
    dense = evaluate_dispatched(folder, ev_loader, budget, device, out / ".eval_offload")
    log(f"dense perplexity: {dense['perplexity']:.4f}")
    res = prune_offloaded(folder, out / "model", algo, batches, device=device, activation_budget=budget,
                          resume=True, trust_remote_code=recipe.model.trust_remote_code,
                          on_block_done=lambda i: log(f"block {i} pruned and written"))
    pruned = evaluate_dispatched(out / "model", ev_loader, budget, device, out / ".eval_offload")
    log(f"after offloaded pruning: perplexity {pruned['perplexity']:.4f}")
    results: dict[str, Any] = {
        "name": recipe.name, "metric": "perplexity",
        "metrics": {"dense": dense, "after_hard_prune": pruned, "final": pruned},
        "dense_score": dense["perplexity"], "score_after_hard_prune": pruned["perplexity"],
        "score": pruned["perplexity"], **_summary(out / "model"),
        "algorithm": recipe.algorithm.name, "structure": recipe.prune.structure,
        "target_sparsity": recipe.prune.sparsity, "machine": machine_info(device),
        "offload": {"model": str(out / "model"), "blocks": res.blocks, "blocks_computed_now": res.pruned_blocks,
                    "block_seconds": res.block_seconds, "spilled_batches": res.spilled_batches,
                    "max_memory": budget, "calibration_batches": len(batches)},
        "seconds": {"prune": res.seconds, "total": time.perf_counter() - t0},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    return results

