"""The steps of a run.  A run is a list of stages; each is a small object with a ``name`` and
``run(ctx) -> dict`` (entries merged into the run's results: ``seconds`` add up, ``metrics``/``history``
are merged key by key, anything else is set) over the shared run context
(:class:`prunekit.pipelines.runner.RunContext`: workload, recipe, spec, algorithm, masks, results, log).

A stage never writes run state: the runner (:func:`prunekit.pipelines.runner.run_stages`) checkpoints
before every stage that ``trains``, passes the in-progress stage its snapshot through ``ctx.fit``, and on a
resume calls ``skip(ctx)`` on each stage finished before the checkpoint (only :class:`Dense` does
anything there: the model and the teacher get the dense weights back).  One stage = at most one ``fit``.
"""
from __future__ import annotations

import copy
import time
from typing import Any

import torch

from prunekit.algorithms.calibration import PostTraining
from prunekit.algorithms.distill import make_distiller
from prunekit.algorithms.quantize import QuantTrainer, check_quantized, quantize
from prunekit.algorithms.sensitivity import allocate_budget, layer_sensitivity, overrides_yaml
from prunekit.algorithms.shared_levels import FreezeShared, JointLevels, LevelView
from prunekit.core.masks import MaskSet
from prunekit.core.nested import NestedMasks, nested_masks
from prunekit.io.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from prunekit.training import distributed as D

__all__ = ["Stage", "Dense", "Search", "HardPrune", "Retrain", "Quantize", "quant_spec", "JointBase", "SharedLevel", "JointLevelsStage",
           "SensitivitySweep", "teacher_model", "level_nested"]


class Stage:
    name = "stage"
    trains = False            # the runner checkpoints the run before a stage that trains

    def run(self, ctx) -> dict:
        raise NotImplementedError

    def skip(self, ctx) -> None:
        """Resume: this stage finished before the checkpoint being resumed."""


def teacher_model(ctx):
    """A copy of the model holding the dense weights (the distillation teacher) — never the student."""
    if ctx.dense is None:
        raise RuntimeError("the dense weights were not kept (Dense(keep=True))")
    t = copy.deepcopy(ctx.model)
    t.load_state_dict(ctx.dense)
    return t


def _distill_hooks(ctx, stage: str) -> list:
    if not ctx.recipe.distill:
        return []
    if "distiller" not in ctx.cache:
        ctx.cache["distiller"] = make_distiller(ctx.recipe.distill, teacher_model(ctx), ctx.task)
    d = ctx.cache["distiller"]
    d.set_stage(stage)
    return [d]


def _evaluated(ctx, key: str, label: str) -> dict:
    """``{key: metrics}`` of the model on the eval set, logged as ``label: score``."""
    m = ctx.task.evaluate(ctx.model, ctx.workload.eval_loader)
    ctx.log(f"{label}: {m[ctx.task.metric]:.4f}")
    return {key: m}


class Dense(Stage):
    """The dense model, in one place: ``model.checkpoint`` is loaded, or the ``dense`` phase trains it and it is
    saved to ``out/dense``.  ``keep``: hold a copy of the dense weights in ``ctx.dense`` (teacher, shared levels)."""

    name = "dense"
    trains = True

    def __init__(self, keep: bool = False, evaluate: bool = True):
        self.keep, self.evaluate = keep, evaluate

    def _trains(self, ctx) -> bool:
        return ctx.recipe.phase("dense").epochs > 0 and not ctx.recipe.model.checkpoint

    def _keep(self, ctx) -> None:
        if self.keep:
            ctx.dense = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}

    def skip(self, ctx) -> None:
        if self._trains(ctx):
            load_checkpoint(ctx.out / "dense", ctx.model)
        # else: model.checkpoint (loaded by open_run) or the seeded initial weights, rebuilt identically
        self._keep(ctx)

    def run(self, ctx) -> dict:
        t0 = time.perf_counter()
        out: dict[str, Any] = {}              # model.checkpoint, if given, was loaded by open_run
        if self._trains(ctx):
            r = ctx.fit(ctx.recipe.phase("dense"), desc="dense")
            out["history"] = {"dense": r["history"]}
            if ctx.is_main:
                save_checkpoint(ctx.out / "dense", ctx.model, None, recipe=ctx.resolved, extra={"stage": "dense"})
            ctx.log(f"trained dense model, saved to {ctx.out / 'dense'} "
                    f"(reuse: --set model.checkpoint={ctx.out / 'dense'})")
        self._keep(ctx)
        if self.evaluate:
            m = ctx.task.evaluate(ctx.model, ctx.workload.eval_loader)
            out["metrics"] = {"dense": m}
            out["dense_score"] = m[ctx.task.metric]
            ctx.log(f"dense {ctx.task.metric}: {m[ctx.task.metric]:.4f}")
        out["seconds"] = {"dense": time.perf_counter() - t0}
        return out


class Search(Stage):
    """The algorithm's own training (skipped for algorithms without one)."""

    name = "search"
    trains = True

    def __init__(self, desc: str | None = None, history_key: str = "search", seconds_key: str = "search"):
        self.desc, self.history_key, self.seconds_key = desc, history_key, seconds_key

    def run(self, ctx) -> dict:
        t0 = time.perf_counter()
        algo, out = ctx.algo, {}
        if algo.has_search:
            if callable(getattr(algo, "set_teacher", None)):
                algo.set_teacher(teacher_model(ctx))
            r = ctx.fit(ctx.recipe.phase("search"), desc=self.desc or algo.name,
                        hooks=[algo, *_distill_hooks(ctx, "search")], masks=algo.masks_during_search(ctx.model))
            out["history"] = {self.history_key: r["history"]}
        out["seconds"] = {self.seconds_key: time.perf_counter() - t0}
        return out


class HardPrune(Stage):
    """The algorithm's final masks, applied (and, with ``evaluate``, the score right after)."""

    name = "hard_prune"

    def __init__(self, evaluate: bool = True, seconds_key: str = "search"):
        self.evaluate, self.seconds_key = evaluate, seconds_key

    def run(self, ctx) -> dict:
        t0 = time.perf_counter()
        masks = ctx.algo.final_masks(ctx.model)
        if D.is_distributed():       # identical by construction; rank 0's copy is authoritative
            D.broadcast_state(dict(masks.items()))
        masks.apply(ctx.model)
        ctx.masks = masks
        out: dict[str, Any] = {}
        if self.evaluate:
            out["metrics"] = _evaluated(ctx, "after_hard_prune", f"after hard-prune ({masks.sparsity():.4f} sparsity)")
        out["seconds"] = {self.seconds_key: time.perf_counter() - t0}
        return out


class Retrain(Stage):
    """Hard-pruned retraining by ``ctx.masks``, keeping the best of the entry weights and each epoch;
    with ``final``, the final evaluation (``metrics.final``)."""

    name = "retrain"
    trains = True

    def __init__(self, desc: str = "retrain", history_key: str = "retrain", seconds_key: str = "retrain",
                 final: bool = True):
        self.desc, self.history_key, self.seconds_key, self.final = desc, history_key, seconds_key, final

    def run(self, ctx) -> dict:
        t0 = time.perf_counter()
        cfg, out = ctx.recipe.phase("retrain"), {}
        if cfg.epochs > 0:
            base = ctx.results.get("metrics", {}).get("after_hard_prune")
            hooks = _distill_hooks(ctx, "retrain")
            q = ctx.recipe.quant
            if q.scheme is not None and q.method in ("qat", "share"):
                # quantization-aware: the weights stay on the grid; the unquantized entry weights are no baseline
                hooks = [*hooks, QuantTrainer(quant_spec(ctx), "ste" if q.method == "qat" else "share", q.reduce)]
                base = None
            r = ctx.fit(cfg, desc=self.desc, hooks=hooks, masks=ctx.masks, restore_best=True, baseline=base)
            out["history"] = {self.history_key: r["history"]}
        if self.final:
            out["metrics"] = _evaluated(ctx, "final", f"final {ctx.task.metric}")
        out["seconds"] = {self.seconds_key: time.perf_counter() - t0}
        return out


def quant_spec(ctx):
    """The recipe's quantization spec (targets default to prune's)."""
    return ctx.recipe.quant.spec(ctx.spec.targets)


class Quantize(Stage):
    """The kept weights onto their grids (round-to-nearest; a no-op on weights that quantization-aware
    retraining left on the grid), masks updated with the kept weights the grid sent to 0, every weight
    checked to equal ``decode(codes)`` bit for bit; then the final evaluation (``metrics.final``)."""

    name = "quantize"

    def run(self, ctx) -> dict:
        t0 = time.perf_counter()
        qs = quant_spec(ctx)
        before = ctx.masks.sparsity()
        quantize(ctx.model, qs, ctx.masks)
        ctx.cache["qcodes"] = check_quantized(ctx.model, qs, ctx.masks)
        ctx.log(f"quantized {len(ctx.cache['qcodes'])} weights ({ctx.recipe.quant.scheme}, {ctx.recipe.quant.method}); "
                f"sparsity {before:.4f} → {ctx.masks.sparsity():.4f} (kept weights rounded to 0 counted as pruned)")
        out = {"metrics": _evaluated(ctx, "final", f"final {ctx.task.metric} (quantized)")}
        out["seconds"] = {"quantize": time.perf_counter() - t0}
        return out


# -- shared-weight levels ---------------------------------------------------------------------------
def level_nested(ctx) -> NestedMasks:
    """The nested masks of a sequential shared run: scored on the dense weights around the sparsest level's
    mask (``ctx.masks``); a pure function of both, so a resume recomputes them."""
    if "nested" not in ctx.cache:
        W = ctx.dense
        ctx.cache["nested"] = nested_masks(ctx.model, ctx.spec, ctx.cache["levels"], base=ctx.masks,
                                           weights={n: W[n] for n in ctx.masks})
    return ctx.cache["nested"]


class SharedLevel(Stage):
    """Level ``k`` (> 0) of a sequential shared run: the weights it adds start from the dense ones and only
    they train (:class:`FreezeShared`; biases and other unpruned parameters frozen)."""

    trains = True

    def __init__(self, k: int, cfg):
        self.k, self.cfg, self.name = k, cfg, f"level{k}"

    def run(self, ctx) -> dict:
        t0 = time.perf_counter()
        nested, k, model = level_nested(ctx), self.k, ctx.model
        params = dict(model.named_parameters())
        masked = set(nested.names())
        add = nested.added(k)
        with torch.no_grad():
            for n in masked:
                params[n].copy_(torch.where(add[n], ctx.dense[n], params[n]))
        out: dict[str, Any] = {}
        if self.cfg is not None and self.cfg.epochs > 0:
            others = [n for n in params if n not in masked]
            fz = FreezeShared(model, {n: add[n] for n in masked}, frozen_params=others).freeze()
            try:
                r = ctx.fit(self.cfg, desc=f"L{k} added", hooks=[fz], masks=nested[k], restore_best=True)
            finally:
                fz.release()
            out["history"] = {f"level{k}": r["history"]}
        ctx.log(f"level {k} (sparsity {nested[k].sparsity():.4f}) trained (added weights only)")
        out["seconds"] = {f"level{k}": time.perf_counter() - t0}
        return out


class JointBase(Stage):
    """Joint shared run: the algorithm's masks (its search ran on the dense model; a post-training algorithm
    prunes the dense model from calibration data) become the sparsest level's base; the model gets the dense
    weights back."""

    name = "joint_base"

    def run(self, ctx) -> dict:
        chooses = ctx.algo.has_search or isinstance(ctx.algo, PostTraining)
        ctx.masks = ctx.algo.final_masks(ctx.model) if chooses else None
        ctx.model.load_state_dict(ctx.dense)
        return {}


class JointLevelsStage(Stage):
    """Joint training of every level on one weight set (:class:`LevelView` + :class:`JointLevels`)."""

    name = "joint"
    trains = True

    def __init__(self, cfg, schedule: str):
        self.cfg, self.schedule = cfg, schedule

    def run(self, ctx) -> dict:
        t0 = time.perf_counter()
        nested = nested_masks(ctx.model, ctx.spec, ctx.cache["levels"], base=ctx.masks)
        ctx.cache["nested"] = nested
        view = LevelView(ctx.model, nested, level=-1)
        hook = JointLevels(view, self.schedule, eval_level=0, seed=ctx.recipe.seed)
        dense_mask = MaskSet({f"inner.{n}": m for n, m in nested.densest.items()}, nested.densest.structures)
        r = ctx.fit(self.cfg, model=view, desc=f"joint/{self.schedule}", hooks=[hook], masks=dense_mask,
                    restore_best=True)
        nested.densest.apply(ctx.model)
        ctx.log(f"joint training done: steps per level {hook.counts}")
        return {"history": {"joint": r["history"]}, "seconds": {"joint": time.perf_counter() - t0},
                "steps_per_level": list(hook.counts)}


# -- sensitivity ------------------------------------------------------------------------------------
class SensitivitySweep(Stage):
    """Prune each target layer alone over ``sweep`` (no retraining); the allocation meeting ``budget``;
    ``out/overrides.yaml``."""

    name = "sensitivity"

    def __init__(self, sweep, budget: float):
        self.sweep, self.budget = list(sweep), float(budget)

    def run(self, ctx) -> dict:
        model, task, loader = ctx.model, ctx.task, ctx.workload.eval_loader
        model.eval()
        sens = layer_sensitivity(model, lambda m: task.evaluate(m, loader), ctx.spec, self.sweep,
                                 metric=task.metric, log=ctx.log)
        ratios = allocate_budget(sens, self.budget)
        snippet = overrides_yaml(ratios, budget=self.budget, sens=sens)
        if ctx.is_main:
            atomic_write_text(ctx.out / "overrides.yaml", snippet)
        ctx.cache["sensitivity"] = sens
        return {**sens.to_dict(), "budget": self.budget, "allocation": ratios, "recipe": ctx.resolved,
                "threads": torch.get_num_threads()}
