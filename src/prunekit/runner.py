"""The pipeline a recipe describes: dense → algorithm phase → hard-prune → retrain → results.

``run_pipeline(recipe, out_dir)`` writes into ``out_dir``::

    recipe.yaml        the resolved recipe (every default filled in)
    results.json       metrics per stage, sparsity, compression rate, per-layer table, FLOPs, timings
    model.safetensors  final weights   ┐
    masks.safetensors  final masks     ├ a prunekit checkpoint (see prunekit.checkpoint)
    manifest.json      shapes, checksums, recipe ┘
    dense/             the dense checkpoint (reused by later runs via model.checkpoint)
"""
from __future__ import annotations

import dataclasses
import math
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch import nn

from .algorithms import get_algorithm_class
from .checkpoint import atomic_write_json, atomic_write_text, load_checkpoint, save_checkpoint
from .config import Recipe, RecipeError, from_dict, to_dict
from .masks import MaskSet
from .pruner import PruneSpec
from .report import model_summary
from .targets import TargetSpec
from .train import ClassificationTask, fit, seed_everything

__all__ = ["Workload", "build_workload", "prune_spec_from", "run_pipeline", "WORKLOAD_BUILDERS"]


@dataclass
class Workload:
    """Everything a run trains and measures."""

    model: nn.Module
    task: Any                      # .step / .evaluate / .metric
    train_loader: Any
    eval_loader: Any
    example_input: Any = None      # for FLOPs
    info: dict = dataclasses.field(default_factory=dict)


def _classification_workload(recipe: Recipe) -> Workload:
    from .data.registry import get_dataset  # noqa: PLC0415
    from .models.registry import get_model  # noqa: PLC0415

    d = recipe.data
    train = get_dataset(d.name, root=d.root, split="train", limit=d.limit, **({"augment": True} if d.augment else {}))
    test = get_dataset(d.name, root=d.root, split="test", limit=d.eval_limit or d.limit)
    g = torch.Generator().manual_seed(recipe.seed)
    train_loader = torch.utils.data.DataLoader(train, batch_size=d.batch_size, shuffle=True, generator=g)
    eval_loader = torch.utils.data.DataLoader(test, batch_size=d.eval_batch_size)
    n_classes = len(getattr(train, "classes", ())) or 10
    args = {"num_classes": n_classes, **recipe.model.args}
    model = get_model(recipe.model.name, **args)
    x0 = train[0][0].unsqueeze(0)
    info = {"train_examples": len(train), "eval_examples": len(test)}
    if getattr(train, "note", None):
        info["data_note"] = train.note
    return Workload(model, ClassificationTask(), train_loader, eval_loader, x0, info)


def _glue_workload(recipe: Recipe) -> Workload:
    from .nlp import build_glue_workload  # noqa: PLC0415  (transformers is optional)
    return build_glue_workload(recipe)


WORKLOAD_BUILDERS: dict[str, Callable[[Recipe], Workload]] = {
    "classification": _classification_workload,
    "glue": _glue_workload,
}


def build_workload(recipe: Recipe) -> Workload:
    return WORKLOAD_BUILDERS[recipe.task](recipe)


def prune_spec_from(recipe: Recipe) -> PruneSpec:
    p = recipe.prune
    try:
        return PruneSpec(p.structure, p.sparsity, p.score, p.scope,
                         TargetSpec(list(p.targets.include), list(p.targets.exclude), list(p.targets.types)),
                         dict(p.overrides))
    except ValueError as e:
        raise RecipeError(f"prune: {e}") from None


def _machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def validate_recipe(recipe: Recipe, workload: Workload) -> tuple[PruneSpec, Any]:
    """Checks that need the model: targets exist, overrides match, structure fits each target."""
    from .pruner import compute_masks  # noqa: PLC0415
    from .targets import find_targets  # noqa: PLC0415

    spec = prune_spec_from(recipe)
    try:
        targets = find_targets(workload.model, spec.targets)
        plan = spec.layer_plan(list(targets))
        params = dict(workload.model.named_parameters())
        for n, (st, sp) in plan.items():
            st.check_shape(params[n].shape)
    except ValueError as e:
        raise RecipeError(f"prune.targets/structure: {e}") from None
    cls = get_algorithm_class(recipe.algorithm.name)
    algo = cls(from_dict(cls.Params, recipe.algorithm.params, "algorithm.params"), spec)
    return spec, algo


def run_pipeline(recipe: Recipe, out_dir: str | Path, *, log: Callable[[str], None] = print) -> dict:
    """Run the recipe end to end; returns the results dict (also written to ``out_dir/results.json``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    resolved = to_dict(recipe)
    atomic_write_text(out / "recipe.yaml", yaml.safe_dump(resolved, sort_keys=False))
    seed_everything(recipe.seed)
    t_start = time.perf_counter()
    wl = build_workload(recipe)
    spec, algo = validate_recipe(recipe, wl)
    model, task = wl.model, wl.task
    metric = task.metric
    results: dict[str, Any] = {"name": recipe.name, "metric": metric, "metrics": {}, "seconds": {},
                               "history": {}, "workload": wl.info}
    extra_hooks = []
    if recipe.distill:
        from .algorithms.distill import make_distiller  # noqa: PLC0415
        extra_hooks_factory = lambda: make_distiller(recipe.distill, model, task)  # noqa: E731
    else:
        extra_hooks_factory = None

    # 1. dense -----------------------------------------------------------------------------------
    t0 = time.perf_counter()
    if recipe.model.checkpoint:
        load_checkpoint(recipe.model.checkpoint, model)
        log(f"loaded dense weights from {recipe.model.checkpoint}")
    dense_cfg = recipe.phase("dense")
    if dense_cfg.epochs > 0 and not recipe.model.checkpoint:
        r = fit(model, task, wl.train_loader, wl.eval_loader, dense_cfg, desc="dense")
        results["history"]["dense"] = r["history"]
        save_checkpoint(out / "dense", model, None, recipe=resolved, extra={"stage": "dense"})
    results["metrics"]["dense"] = task.evaluate(model, wl.eval_loader)
    results["seconds"]["dense"] = time.perf_counter() - t0
    log(f"dense {metric}: {results['metrics']['dense'][metric]:.4f}")
    if extra_hooks_factory is not None:
        extra_hooks = [extra_hooks_factory()]  # teacher = the dense fine-tuned model, frozen copy

    # 2. algorithm phase -------------------------------------------------------------------------
    t0 = time.perf_counter()
    if algo.has_search:
        search_cfg = recipe.phase("search")
        r = fit(model, task, wl.train_loader, wl.eval_loader, search_cfg, hooks=[algo, *extra_hooks],
                masks=algo.masks_during_search(model), desc=f"{algo.name}")
        results["history"]["search"] = r["history"]
    masks = algo.final_masks(model)
    masks.apply(model)
    results["metrics"]["after_hard_prune"] = task.evaluate(model, wl.eval_loader)
    results["seconds"]["search"] = time.perf_counter() - t0
    log(f"after hard-prune ({masks.sparsity():.4f} sparsity): {results['metrics']['after_hard_prune'][metric]:.4f}")

    # 3. hard-pruned retraining ------------------------------------------------------------------
    t0 = time.perf_counter()
    retrain_cfg = recipe.phase("retrain")
    if retrain_cfg.epochs > 0:
        for h in extra_hooks:
            getattr(h, "set_stage", lambda *_: None)("retrain")
        r = fit(model, task, wl.train_loader, wl.eval_loader, retrain_cfg, hooks=extra_hooks, masks=masks,
                desc="retrain", restore_best=True)
        results["history"]["retrain"] = r["history"]
    final = task.evaluate(model, wl.eval_loader)
    results["metrics"]["final"] = final
    results["seconds"]["retrain"] = time.perf_counter() - t0
    results["seconds"]["total"] = time.perf_counter() - t_start
    log(f"final {metric}: {final[metric]:.4f}")

    # 4. numbers + checkpoint --------------------------------------------------------------------
    summary = model_summary(model, masks, wl.example_input)
    for layer in summary["layers"]:
        layer["structure"] = masks.structures.get(layer["name"], layer["structure"])
    results.update({k: summary[k] for k in summary})
    results["score"] = final[metric]
    results["dense_score"] = results["metrics"]["dense"][metric]
    results["score_after_hard_prune"] = results["metrics"]["after_hard_prune"][metric]
    results["algorithm"] = recipe.algorithm.name
    results["structure"] = recipe.prune.structure
    results["target_sparsity"] = recipe.prune.sparsity
    results["machine"] = _machine()
    results["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results["algorithm_state_keys"] = sorted(algo.state_dict())
    save_checkpoint(out, model, masks, recipe=resolved, extra={"stage": "final", "metric": metric, "score": final[metric]})
    atomic_write_json(out / "results.json", results)
    return results
