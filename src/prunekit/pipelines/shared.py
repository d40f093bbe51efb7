"""The shared-weights pipeline: train nested levels sequentially or jointly, save one artifact."""
from __future__ import annotations

import dataclasses as _dc
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.algorithms import get_algorithm_class
from prunekit.algorithms.shared_levels import FreezeShared, JointLevels, LevelView
from prunekit.core.errors import RecipeError
from prunekit.core.masks import MaskSet
from prunekit.core.nested import NestedMasks, _spec_at, nested_masks, sorted_levels
from prunekit.core.plan import PruneSpec
from prunekit.deploy.shared_weights import SharedWeightsModel, breakeven_report, save_shared, switch_table
from prunekit.deploy.timing import forward_latency_ms
from prunekit.pipelines.recipe import from_dict, to_dict
from prunekit.pipelines.runner import machine_info, open_run, prune_spec_from, run_stages
from prunekit.pipelines.stages import (
    Dense,
    HardPrune,
    JointBase,
    JointLevelsStage,
    Retrain,
    Search,
    SharedLevel,
    Stage,
    level_nested,
)
from prunekit.training.config import TrainConfig
from prunekit.training.loop import fit


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
            raise RecipeError(f"algorithm {algorithm.name!r} has a search phase: pass search_cfg")
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


def shared_stages(recipe, sc: SharedConfig, levels: Sequence[float]) -> list:
    """dense → (sequential) the algorithm's search, hard-prune and retraining of the sparsest level, one stage per
    denser level | (joint) the algorithm's search on the dense model, joint training → the levels' report."""
    if sc.mode == "sequential":
        level_cfg = _phase_over(recipe, "retrain", sc.level_train, "extra.shared.level_train")
        return [Dense(keep=True, evaluate=True), Search(desc=None, history_key="level0_search", seconds_key="level0"),
                HardPrune(evaluate=False, seconds_key="level0"),
                Retrain(desc="L0 retrain", history_key="level0_retrain", seconds_key="level0", final=False),
                *[SharedLevel(k, level_cfg) for k in range(1, len(levels))], SharedReport(sc)]
    joint_cfg = _phase_over(recipe, "retrain", sc.joint_train, "extra.shared.joint_train")
    return [Dense(keep=True, evaluate=True), Search(seconds_key="joint_search"), JointBase(),
            JointLevelsStage(joint_cfg, sc.schedule), SharedReport(sc)]


class SharedReport(Stage):
    """Per-level evaluation (loaded in place), switch costs, latency, breakeven → ``shared.safetensors``."""

    name = "shared_report"

    def __init__(self, sc: SharedConfig):
        self.sc = sc

    def run(self, ctx) -> dict:
        model, task, metric, lv = ctx.model, ctx.task, ctx.task.metric, ctx.cache["levels"]
        nested = level_nested(ctx) if self.sc.mode == "sequential" else ctx.cache["nested"]
        params = dict(model.named_parameters())
        values = {n: params[n].detach().clone() for n in nested.names()}
        dtypes = {n: params[n].dtype for n in nested.names()}
        other = sum(p.numel() * p.element_size() for n, p in params.items() if n not in dtypes)
        costs = {(c["from"], c["to"]): c for c in switch_table(nested, dtypes, other_bytes=other)}
        full = sum(p.numel() * p.element_size() for p in params.values())   # every parameter, dense
        swm = SharedWeightsModel(model, nested, values, level=len(nested) - 1)
        rows, dense_score = [], ctx.results["dense_score"]
        for k in range(len(nested)):
            rec = swm.switch(k)
            m = task.evaluate(model, ctx.workload.eval_loader)
            prev = costs.get((k - 1, k))
            rows.append({"level": k, "target_sparsity": lv[k], "sparsity": nested[k].sparsity(), "metric": metric,
                         "score": m[metric], "switch_bytes_from_previous": prev["switch_bytes"] if prev else None,
                         "switch_index_bytes_from_previous": prev["index_bytes"] if prev else None,
                         "full_rewrite_bytes": full,
                         "latency_ms": forward_latency_ms(model, ctx.workload.example_input, self.sc.latency_batch),
                         "inplace_switch_bytes_written": rec.bytes_written if k else None, "dense_score": dense_score})
            ctx.log(f"level {k}: sparsity {rows[-1]['sparsity']:.4f} {metric} {m[metric]:.4f}")
        swm.switch(len(nested) - 1)
        info = [{"level": r["level"], "target_sparsity": r["target_sparsity"], "sparsity": r["sparsity"],
                 metric: r["score"]} for r in rows]
        path = ctx.out / "shared.safetensors"
        if ctx.is_main:
            save_shared(path, model, nested, levels_info=info,
                        extra={"recipe": ctx.resolved, "metric": metric, "dense_score": dense_score})
        return {"levels": rows,
                "switch_matrix": [{k: v for k, v in c.items() if k != "encodings"} for c in costs.values()],
                "switch_encodings": {f"{a}->{b}": c["encodings"] for (a, b), c in costs.items()},
                "breakeven": {k: v for k, v in breakeven_report(model, nested).items() if k != "per_tensor"},
                "algorithm": ctx.recipe.algorithm.name, "structure": ctx.recipe.prune.structure,
                "machine": machine_info(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "artifact": str(path), "artifact_bytes": path.stat().st_size if path.exists() else None}


def run_shared(recipe, out_dir: str | os.PathLike, *, levels: Sequence[float] | None = None, mode: str | None = None,
               schedule: str | None = None, log: Callable[[str], None] = print, resume: bool = False,
               checkpoint_every: int | None = None) -> dict:
    """dense (train or ``model.checkpoint``) → nested levels (sequential or joint) → per-level evaluation,
    switch-cost table, breakeven → ``out_dir/shared.safetensors`` (the one artifact), ``results.json``,
    ``recipe.yaml``.  Run by :func:`~prunekit.pipelines.runner.run_stages`: checkpointed, ``resume`` continues
    an interrupted run.  Returns the results dict."""
    sc = shared_config(recipe, levels, mode, schedule)
    lv = sorted_levels(sc.levels)
    resolved = to_dict(recipe)
    resolved["extra"] = {**resolved.get("extra", {}), "shared": to_dict(sc)}
    spec = prune_spec_from(recipe)
    ctx, state = open_run(recipe, out_dir, resolved=resolved, resume=resume, checkpoint_every=checkpoint_every,
                          log=log, spec=_spec_at(spec, lv[0]))
    ctx.spec = spec                  # the levels' spec; the algorithm is built for the sparsest level
    ctx.cache["levels"] = lv
    ctx.results = {"name": recipe.name, "metric": ctx.task.metric, "mode": sc.mode, "levels_requested": lv,
                   "workload": ctx.workload.info, "seconds": {}, "history": {}}
    return run_stages(ctx, shared_stages(recipe, sc, lv), state)
