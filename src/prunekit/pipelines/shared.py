"""The shared-weights pipeline: train nested levels sequentially or jointly, save one artifact."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence
import torch
from torch import Tensor, nn
from prunekit.core.masks import MaskSet
from prunekit.core.plan import PruneSpec
from prunekit.training.loop import fit
from prunekit.algorithms.shared_levels import FreezeShared, JointLevels, LevelView
from prunekit.core.nested import NestedMasks, _spec_at, nested_masks, sorted_levels
from prunekit.deploy.timing import forward_latency_ms
from prunekit.deploy.shared_weights import SharedWeightsModel, breakeven_report, save_shared, switch_table
from prunekit.pipelines.recipe import from_dict
import dataclasses as _dc
from prunekit.training.config import TrainConfig
from prunekit.core.errors import RecipeError
import yaml
from datetime import datetime, timezone
from prunekit.algorithms import get_algorithm_class
from prunekit.io.checkpoint import atomic_write_json, atomic_write_text, load_checkpoint, save_checkpoint
from prunekit.pipelines.recipe import to_dict
from prunekit.pipelines.runner import _machine, validate_recipe
from prunekit.pipelines.workloads import build_workload
from prunekit.training.loop import seed_everything
import copy


def train_sequential(model: nn.Module, task, train_loader, eval_loader, spec: PruneSpec,
                     sparsities: Sequence[float], *, algorithm=None, search_cfg=None, retrain_cfg=None,
                     level_cfg=None, log: Callable[[str], None] = print,
                     on_level: Callable[[int, nn.Module], None] | None = None) -> dict:
    """Sequential training.  The model holds the dense weights ``W`` on entry.

    1. sparsest level: ``algorithm`` (any registered :class:`~prunekit.algorithms.base.Algorithm` built for
       ``spec`` at the sparsest level; default one-shot magnitude) runs its search phase (``search_cfg``)
       when it has one, its ``final_masks`` give ``M_0``, then hard-pruned retraining (``retrain_cfg``);
    2. each denser level k: ``M_k`` nests around ``M_{k-1}`` (scored on the dense ``W``), the added
       weights start from ``W``, and only they train (``level_cfg``; :class:`FreezeShared` restores every
       other element after each step; biases and other unpruned parameters are frozen).

    ``on_level(k, model)`` is called after each level is trained.  Returns ``{"nested", "dense_values",
    "history", "seconds"}``; on return the model holds the densest level."""
    levels = sorted_levels(sparsities)
    params = dict(model.named_parameters())
    W = {n: p.detach().clone() for n, p in params.items()}
    history: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    if algorithm is None:
        cls = get_algorithm_class("oneshot")
        algorithm = cls(cls.Params(), _spec_at(spec, levels[0]))
    if algorithm.has_search:
        if search_cfg is None:
            raise ValueError(f"algorithm {algorithm.name!r} has a search phase: pass search_cfg")
        r = fit(model, task, train_loader, eval_loader, search_cfg, hooks=[algorithm],
                masks=algorithm.masks_during_search(model), desc=f"L0 {algorithm.name}")
        history["level0_search"] = r["history"]
    m0 = algorithm.final_masks(model)
    m0.apply(model)
    if retrain_cfg is not None and retrain_cfg.epochs > 0:
        r = fit(model, task, train_loader, eval_loader, retrain_cfg, masks=m0, desc="L0 retrain", restore_best=True)
        history["level0_retrain"] = r["history"]
    seconds["level0"] = time.perf_counter() - t0
    log(f"level 0 (sparsity {m0.sparsity():.4f}) trained")
    if on_level is not None:
        on_level(0, model)
    # nested masks for the denser levels, scored on the dense weights, base = the trained level-0 mask
    nested = nested_masks(model, spec, levels, base=m0, weights={n: W[n] for n in m0})
    masked = set(nested.names())
    others = [n for n in params if n not in masked]
    for k in range(1, len(nested)):
        t0 = time.perf_counter()
        add = nested.added(k)
        with torch.no_grad():
            for n in masked:
                p = params[n]
                p.copy_(torch.where(add[n], W[n], p))
        cfg = level_cfg or retrain_cfg
        if cfg is not None and cfg.epochs > 0:
            fz = FreezeShared(model, {n: add[n] for n in masked}, frozen_params=others).freeze()
            try:
                r = fit(model, task, train_loader, eval_loader, cfg, hooks=[fz], masks=nested[k],
                        desc=f"L{k} added", restore_best=True)
            finally:
                fz.release()
            history[f"level{k}"] = r["history"]
        seconds[f"level{k}"] = time.perf_counter() - t0
        log(f"level {k} (sparsity {nested[k].sparsity():.4f}) trained (added weights only)")
        if on_level is not None:
            on_level(k, model)
    dense_values = {n: params[n].detach().clone() for n in masked}
    return {"nested": nested, "dense_values": dense_values, "history": history, "seconds": seconds}


def train_joint(model: nn.Module, task, train_loader, eval_loader, spec: PruneSpec, sparsities: Sequence[float],
                cfg, *, schedule: str = "cycle", base: MaskSet | None = None, seed: int = 0,
                log: Callable[[str], None] = print) -> dict:
    """Joint training: nested masks from the current weights (``base`` = the sparsest level's mask if an
    algorithm chose it), then one :func:`fit` on a :class:`LevelView` with the :class:`JointLevels` hook,
    hard-pruned by the densest mask.  On return the model holds the densest level."""
    nested = nested_masks(model, spec, sparsities, base=base)
    view = LevelView(model, nested, level=-1)
    hook = JointLevels(view, schedule, eval_level=0, seed=seed)
    dense_mask = MaskSet({f"inner.{n}": m for n, m in nested.densest.items()}, nested.densest.structures)
    t0 = time.perf_counter()
    r = fit(view, task, train_loader, eval_loader, cfg, hooks=[hook], masks=dense_mask, desc=f"joint/{schedule}",
            restore_best=True)
    nested.densest.apply(model)
    log(f"joint training done: steps per level {hook.counts}")
    dense_values = {n: p.detach().clone() for n, p in model.named_parameters() if n in nested.densest}
    return {"nested": nested, "dense_values": dense_values, "history": {"joint": r["history"]},
            "seconds": {"joint": time.perf_counter() - t0}, "steps_per_level": hook.counts}


def _evaluate_levels(model, task, loader, nested: NestedMasks, dense_values: dict[str, Tensor]) -> list[dict]:
    """Evaluate each level by loading it in place (weights = dense_values · M_k)."""
    swm = SharedWeightsModel(model, nested, dense_values, level=len(nested) - 1)
    out = []
    for k in range(len(nested)):
        swm.switch(k)
        out.append(task.evaluate(model, loader))
    swm.switch(len(nested) - 1)
    return out


# =============================================================================================
# Recipe-driven pipeline (``prunekit shared``)
# =============================================================================================
@dataclass
class SharedConfig:
    """``extra.shared`` section of a recipe (CLI flags override it).

    * ``levels``: level sparsities (any order; run sparsest first).  The recipe's ``prune.sparsity`` is
      ignored for the levels; its structure, score, scope, targets and overrides apply to every level
      (overrides scale with the level's sparsity).
    * ``mode``: ``sequential`` | ``joint``.
    * ``schedule`` (joint): ``cycle`` | ``sample`` | ``all``.
    * ``level_train``: TrainConfig keys over ``retrain`` for each denser level (sequential).
    * ``joint_train``: TrainConfig keys over ``retrain`` for the joint phase.
    * ``latency_batch``: batch size of the per-level forward latency measurement."""

    levels: list[float] = field(default_factory=lambda: [0.6, 0.4, 0.2])
    mode: str = "sequential"
    schedule: str = "cycle"
    level_train: dict = field(default_factory=dict)
    joint_train: dict = field(default_factory=dict)
    latency_batch: int = 1

    def __post_init__(self):
        if self.mode not in ("sequential", "joint"):
            raise RecipeError(f"mode: {self.mode!r} is not one of ['sequential', 'joint']")
        if self.schedule not in JointLevels.SCHEDULES:
            raise RecipeError(f"schedule: {self.schedule!r} is not one of {list(JointLevels.SCHEDULES)}")
        try:
            sorted_levels(self.levels)
        except ValueError as e:
            raise RecipeError(f"levels: {e}") from None
        if self.latency_batch < 1:
            raise RecipeError("latency_batch must be >= 1")


def shared_config(recipe, levels: Sequence[float] | None = None, mode: str | None = None,
                  schedule: str | None = None) -> SharedConfig:
    raw = dict(recipe.extra.get("shared") or {})
    if levels is not None:
        raw["levels"] = list(levels)
    if mode is not None:
        raw["mode"] = mode
    if schedule is not None:
        raw["schedule"] = schedule
    return from_dict(SharedConfig, raw, "extra.shared")


def _phase_over(recipe, base: str, over: dict, key: str):
    cfg = _dc.asdict(recipe.phase(base))
    bad = set(over) - set(cfg)
    if bad:
        raise RecipeError(f"unknown key(s) {sorted(f'{key}.{k}' for k in bad)}; valid: {sorted(cfg)}")
    cfg.update(over)
    return from_dict(TrainConfig, cfg, key)


def run_shared(recipe, out_dir: str | os.PathLike, *, levels: Sequence[float] | None = None, mode: str | None = None,
               schedule: str | None = None, log: Callable[[str], None] = print) -> dict:
    """dense (train or ``model.checkpoint``) → nested levels (sequential or joint) → per-level evaluation,
    switch-cost table, breakeven → ``out_dir/shared.safetensors`` (the one artifact), ``results.json``,
    ``recipe.yaml``.  Returns the results dict."""

    sc = shared_config(recipe, levels, mode, schedule)
    lv = sorted_levels(sc.levels)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    resolved = to_dict(recipe)
    resolved["extra"] = {**resolved.get("extra", {}), "shared": to_dict(sc)}
    atomic_write_text(out / "recipe.yaml", yaml.safe_dump(resolved, sort_keys=False))
    seed_everything(recipe.seed)
    t_start = time.perf_counter()
    wl = build_workload(recipe)
    spec, _ = validate_recipe(recipe, wl)
    model, task = wl.model, wl.task
    metric = task.metric
    res: dict[str, Any] = {"name": recipe.name, "metric": metric, "mode": sc.mode, "levels_requested": lv,
                           "workload": wl.info, "seconds": {}, "history": {}}
    t0 = time.perf_counter()
    if recipe.model.checkpoint:
        load_checkpoint(recipe.model.checkpoint, model)
        log(f"loaded dense weights from {recipe.model.checkpoint}")
    else:
        dense_cfg = recipe.phase("dense")
        if dense_cfg.epochs > 0:
            r = fit(model, task, wl.train_loader, wl.eval_loader, dense_cfg, desc="dense")
            res["history"]["dense"] = r["history"]
            save_checkpoint(out / "dense", model, None, recipe=resolved, extra={"stage": "dense"})
    dense_metrics = task.evaluate(model, wl.eval_loader)
    res["dense_score"] = dense_metrics[metric]
    res["seconds"]["dense"] = time.perf_counter() - t0
    log(f"dense {metric}: {dense_metrics[metric]:.4f}")

    spec0 = _spec_at(spec, lv[0])
    cls = get_algorithm_class(recipe.algorithm.name)
    algo = cls(from_dict(cls.Params, recipe.algorithm.params, "algorithm.params"), spec0)
    if sc.mode == "sequential":
        r = train_sequential(model, task, wl.train_loader, wl.eval_loader, spec, lv, algorithm=algo,
                             search_cfg=recipe.phase("search"), retrain_cfg=recipe.phase("retrain"),
                             level_cfg=_phase_over(recipe, "retrain", sc.level_train, "extra.shared.level_train"),
                             log=log)
    else:
        base = None
        if algo.has_search:   # the algorithm picks the sparsest level's mask on a copy of the dense model
            m2 = copy.deepcopy(model)
            fit(m2, task, wl.train_loader, wl.eval_loader, recipe.phase("search"), hooks=[algo],
                masks=algo.masks_during_search(m2), desc=f"L0 {algo.name}")
            base = algo.final_masks(m2)
            del m2
        r = train_joint(model, task, wl.train_loader, wl.eval_loader, spec, lv,
                        _phase_over(recipe, "retrain", sc.joint_train, "extra.shared.joint_train"),
                        schedule=sc.schedule, base=base, seed=recipe.seed, log=log)
        res["steps_per_level"] = r["steps_per_level"]
    nested, values = r["nested"], r["dense_values"]
    res["history"].update(r["history"])
    res["seconds"].update(r["seconds"])

    # per-level evaluation, switching, latency ------------------------------------------------------
    params = dict(model.named_parameters())
    dtypes = {n: params[n].dtype for n in nested.names()}
    other = sum(p.numel() * p.element_size() for n, p in params.items() if n not in dtypes)
    costs = {(c["from"], c["to"]): c for c in switch_table(nested, dtypes, other_bytes=other)}
    full = sum(p.numel() * p.element_size() for p in params.values())   # every parameter, dense
    swm = SharedWeightsModel(model, nested, values, level=len(nested) - 1)
    rows = []
    for k in range(len(nested)):
        rec = swm.switch(k)
        m = task.evaluate(model, wl.eval_loader)
        prev = costs.get((k - 1, k))
        rows.append({"level": k, "target_sparsity": lv[k], "sparsity": nested[k].sparsity(), "metric": metric,
                     "score": m[metric], "switch_bytes_from_previous": prev["switch_bytes"] if prev else None,
                     "switch_index_bytes_from_previous": prev["index_bytes"] if prev else None,
                     "full_rewrite_bytes": full,
                     "latency_ms": forward_latency_ms(model, wl.example_input, sc.latency_batch),
                     "inplace_switch_bytes_written": rec.bytes_written if k else None,
                     "dense_score": dense_metrics[metric]})
        log(f"level {k}: sparsity {rows[-1]['sparsity']:.4f} {metric} {m[metric]:.4f}")
    swm.switch(len(nested) - 1)
    res["levels"] = rows
    res["switch_matrix"] = [{k: v for k, v in c.items() if k != "encodings"} for c in costs.values()]
    res["switch_encodings"] = {f"{a}->{b}": c["encodings"] for (a, b), c in costs.items()}
    res["breakeven"] = {k: v for k, v in breakeven_report(model, nested).items() if k != "per_tensor"}
    res["algorithm"] = recipe.algorithm.name
    res["structure"] = recipe.prune.structure
    res["machine"] = _machine()
    res["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    info = [{"level": r_["level"], "target_sparsity": r_["target_sparsity"], "sparsity": r_["sparsity"],
             metric: r_["score"]} for r_ in rows]
    save_shared(out / "shared.safetensors", model, nested, levels_info=info,
                extra={"recipe": resolved, "metric": metric, "dense_score": dense_metrics[metric]})
    res["artifact"] = str(out / "shared.safetensors")
    res["artifact_bytes"] = (out / "shared.safetensors").stat().st_size
    res["seconds"]["total"] = time.perf_counter() - t_start
    atomic_write_json(out / "results.json", res)
    return res
