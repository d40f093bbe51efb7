"""The pipeline a recipe describes: dense → algorithm phase → hard-prune → retrain → results.

``run_pipeline(recipe, out_dir)`` writes into ``out_dir``::

    recipe.yaml        the resolved recipe (every default filled in)
    results.json       metrics per stage, sparsity, compression rate, per-layer table, FLOPs, timings
    model.safetensors  final weights   ┐
    masks.safetensors  final masks     ├ a prunekit checkpoint (see prunekit.io.checkpoint)
    manifest.json      shapes, checksums, recipe ┘
    dense/             the dense checkpoint (reused by later runs via model.checkpoint)
"""
from __future__ import annotations

import math
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch import nn

from prunekit.algorithms import get_algorithm_class
from prunekit.training import distributed as D
from prunekit.io.checkpoint import (CheckpointError, StateStore, atomic_write_json, atomic_write_text, load_checkpoint, save_checkpoint)
from prunekit.pipelines.recipe import Recipe, from_dict, to_dict
from prunekit.core.errors import RecipeError
from prunekit.core.masks import MaskSet
from prunekit.core.plan import PruneSpec
from prunekit.core.stats import model_summary
from prunekit.core.targets import TargetSpec
from prunekit.algorithms.hooks import Hook
from prunekit.training.loop import NonFiniteLoss, fit, rng_state, seed_everything, set_rng_state
from prunekit.pipelines.workloads import Workload, build_workload
from prunekit.core.targets import find_targets
from prunekit.io.checkpoint import flatten_state
import shutil
import signal
from prunekit.algorithms.distill import make_distiller
from prunekit.training.config import Runtime
from prunekit.training.device import check_precision, resolve_device, set_threads, to_device
from prunekit.training.progress import TensorBoardLogger

__all__ = ["Workload", "build_workload", "prune_spec_from", "run_pipeline", "ResumeError", "STATE_DIR", "KILL_ENV"]

STATE_DIR = "state"                          # out_dir/state/ckpt-NNNNNN: resumable run state
KILL_ENV = "PRUNEKIT_TEST_KILL_AT_STEP"      # tests: SIGKILL self after this optimizer step ("N" or "phase:N")
_STAGES = ("dense", "search", "retrain")
_NOT_COMPARED = ("checkpoint_every", "device", "threads", "log")   # recipe keys that may change between a run and its resume
FINISHED_FILE = "results.json"               # a folder holding it holds a finished run


class ResumeError(CheckpointError):
    """The output folder holds an unfinished run (pass --resume) or a run of another recipe."""


def prune_spec_from(recipe: Recipe) -> PruneSpec:
    p = recipe.prune
    try:
        return PruneSpec(p.structure, p.sparsity, p.score, p.scope,
                         TargetSpec(list(p.targets.include), list(p.targets.exclude), list(p.targets.types)),
                         dict(p.overrides))
    except ValueError as e:
        raise RecipeError(f"prune: {e}") from None


def _machine(device: torch.device | None = None) -> dict:
    out = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
           "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device is not None:
        out["device"] = str(device)
        if device.type == "cuda":
            out["gpu"] = torch.cuda.get_device_name(device)
    return out


def run_device(recipe: Recipe) -> torch.device:
    """The recipe's device (under torchrun with CUDA: this rank's GPU), its precision checked, and the
    thread count set — before any work; :class:`RecipeError` if the machine lacks the device."""
    device = resolve_device(recipe.device)
    if device.type == "cuda" and device.index in (None, 0) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = resolve_device(f"cuda:{D.local_rank()}")
    check_precision(recipe.precision, device)
    set_threads(recipe.threads)
    return device


def _log_hooks(recipe: Recipe, out: Path, offsets: dict, is_main: bool) -> list:
    return [TensorBoardLogger(out / "tb", offsets)] if recipe.log.tensorboard and is_main else []


def check_out_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a folder holding a finished run (``results.json``) unless ``overwrite`` (or ``resume``
    of an unfinished one)."""
    if (out / FINISHED_FILE).exists() and not overwrite and not (out / STATE_DIR).is_dir():
        raise ResumeError(f"{out} holds a finished run ({out / FINISHED_FILE}); pass --overwrite to replace it "
                          "(its files, including compact/, are removed first) or pick another --out")


def clear_out_dir(out: Path) -> None:
    """``--overwrite``: remove everything a previous run left in ``out`` (results, checkpoints, compact/, tb/)."""
    if out.is_dir():
        for child in out.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()


def validate_recipe(recipe: Recipe, workload: Workload) -> tuple[PruneSpec, Any]:
    """Checks that need the model: targets exist, overrides match, structure fits each target."""

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


def _resumable_loader(loader, seed: int):
    """Rebuild a ``DataLoader`` on a :class:`~prunekit.training.distributed.ResumableSampler` (seeded per-epoch
    permutation, skip-to-batch, sharded by global batch over the ranks).  Other loaders are kept."""
    DL = torch.utils.data.DataLoader
    if not isinstance(loader, DL) or isinstance(loader.batch_sampler, (D.ResumableSampler, D.ShardedBatchSampler)):
        return loader
    if loader.batch_size is None:             # a custom batch sampler (GLUE buckets): keep it, shard it
        if not D.is_distributed():
            return loader
        return DL(loader.dataset, batch_sampler=D.ShardedBatchSampler(loader.batch_sampler, D.world_size(), D.rank()),
                  collate_fn=loader.collate_fn, num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                  generator=torch.Generator().manual_seed(seed))
    if type(loader.sampler) not in (torch.utils.data.RandomSampler, torch.utils.data.SequentialSampler):
        if D.is_distributed():
            raise RecipeError(f"data-parallel training needs a plain shuffled/sequential loader; this workload uses "
                              f"{type(loader.sampler).__name__}")
        return loader          # a custom sampler keeps its order; resume replays it from its RNG state
    shuffle = isinstance(loader.sampler, torch.utils.data.RandomSampler)
    try:
        bs = D.ResumableSampler(len(loader.dataset), loader.batch_size, seed, shuffle=shuffle,
                                world=D.world_size(), rank=D.rank())
    except ValueError as e:
        raise RecipeError(f"data: {e}") from None
    return DL(loader.dataset, batch_sampler=bs, collate_fn=loader.collate_fn, num_workers=loader.num_workers,
              pin_memory=loader.pin_memory, generator=torch.Generator().manual_seed(seed))


class _TestKill(Hook):
    """``$PRUNEKIT_TEST_KILL_AT_STEP`` = ``N`` (optimizer steps counted over all phases of the run) or
    ``phase:N``: SIGKILL this process right after that step — deterministic crash for resume tests."""

    def __init__(self, spec: str, offsets: dict[str, int]):
        phase, _, n = spec.rpartition(":")
        self.phase, self.n, self.offsets = phase or None, int(n), offsets

    def after_step(self, ctx):
        step = ctx.step if self.phase else self.offsets.get(ctx.phase, 0) + ctx.step
        if (self.phase is None or ctx.phase == self.phase) and step == self.n:
            os.kill(os.getpid(), signal.SIGKILL)


def _recipe_diff(a: dict, b: dict, prefix="") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        if key in _NOT_COMPARED:
            continue
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _recipe_diff(va, vb, key + ".")
        elif va != vb:
            out.append(f"{key}: {vb!r} → {va!r}")
    return out


def _phase_steps(cfg, loader) -> int:
    return int(math.ceil(cfg.epochs * len(loader)))


def _model_state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_pipeline(recipe: Recipe, out_dir: str | Path, *, log: Callable[[str], None] = print, resume: bool = False,
                 checkpoint_every: int | None = None, overwrite: bool = False) -> dict:
    """Run the recipe end to end; returns the results dict (also written to ``out_dir/results.json``).

    The run checkpoints its whole state into ``out_dir/state/`` after every epoch and every
    ``checkpoint_every`` optimizer steps (argument, else ``recipe.checkpoint_every``; 0 = epochs only)
    and at each stage boundary.  With ``resume=True`` it continues from the newest good checkpoint
    (falling back to the previous one if the newest is corrupt) and ends with the same result as an
    uninterrupted run.  Without ``resume``, an ``out_dir`` holding an unfinished run is an error.
    Under ``torchrun`` (``WORLD_SIZE`` > 1) it trains data-parallel; only rank 0 writes files.
    A folder holding a finished run is refused unless ``overwrite`` (which clears it after validation);
    nothing is created before the recipe has been validated against the model."""
    device = run_device(recipe)
    D.init_from_env(device)
    is_main = D.rank() == 0
    if not is_main:
        log = lambda *_a, **_k: None  # noqa: E731
    out = Path(out_dir)
    store = StateStore(out / STATE_DIR)
    resolved = to_dict(recipe)
    every = int(recipe.checkpoint_every if checkpoint_every is None else checkpoint_every)
    if every < 0:
        raise RecipeError(f"checkpoint_every: {every} is out of range (must be >= 0)")
    state = None
    if overwrite and resume:
        raise RecipeError("--overwrite and --resume exclude each other")
    check_out_dir(out, resume=resume, overwrite=overwrite)
    if store.exists() and not overwrite:
        if not resume:
            raise ResumeError(f"{out} holds an unfinished run ({len(store.checkpoints())} checkpoint(s) in "
                              f"{store.root}); pass --resume to continue it, or pick another --out")
        loaded = store.load_latest(warn=log)
        state, meta, path = loaded
        diff = _recipe_diff(resolved, state["recipe"])
        if diff:
            raise ResumeError(f"cannot resume {out}: the recipe differs from the one it was started with: "
                              + "; ".join(diff[:8]) + " — rerun with the original recipe or pick another --out")
        log(f"resuming from {path} (stage {state['stage']}, step {meta.get('step', 0)})")
    elif resume:
        log(f"nothing to resume in {out}; starting a fresh run")
    seed_everything(recipe.seed)
    t_start = time.perf_counter()
    wl = build_workload(recipe)
    wl.train_loader = _resumable_loader(wl.train_loader, recipe.seed)
    spec, algo = validate_recipe(recipe, wl)
    model, task = wl.model, wl.task
    metric = task.metric
    if recipe.model.checkpoint:          # checked (names, shapes, checksums) before any training
        load_checkpoint(recipe.model.checkpoint, model)
        log(f"loaded dense weights from {recipe.model.checkpoint}")
    model.to(device)                     # the teacher (a copy, made later) and algorithm state follow it
    D.barrier()
    if is_main:                          # validated: only now does the output folder appear
        if overwrite:
            clear_out_dir(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "recipe.yaml", yaml.safe_dump(resolved, sort_keys=False))
    if state is not None:
        results = state["results"]
        results.setdefault("resumed", []).append({"stage": state["stage"], "step": meta.get("step", 0),
                                                  "checkpoint": str(path)})
    else:
        results = {"name": recipe.name, "metric": metric, "metrics": {}, "seconds": {}, "history": {},
                   "workload": wl.info}
    stage = state["stage"] if state is not None else "dense"
    stage_i = _STAGES.index(stage)

    dense_cfg, search_cfg, retrain_cfg = recipe.phase("dense"), recipe.phase("search"), recipe.phase("retrain")
    train_dense = dense_cfg.epochs > 0 and not recipe.model.checkpoint
    offsets = {"dense": 0, "search": _phase_steps(dense_cfg, wl.train_loader) if train_dense else 0}
    offsets[algo.name] = offsets["search"]
    offsets["retrain"] = offsets["search"] + (_phase_steps(search_cfg, wl.train_loader) if algo.has_search else 0)
    test_hooks: list = [_TestKill(os.environ[KILL_ENV], offsets)] if os.environ.get(KILL_ENV) else []
    test_hooks += _log_hooks(recipe, out, offsets, is_main)
    rt = Runtime(recipe.precision, recipe.log.progress_every_s, recipe.log.progress_every_steps)
    masks: MaskSet | None = None

    def save(stage_name: str, snap: dict | None, step: int) -> None:
        if not is_main:
            return
        body = {"stage": stage_name, "fit": snap, "recipe": resolved, "results": results,
                "algo": algo.state_dict(), "masks": masks.state_dict() if masks is not None else None}
        if snap is None:
            body["model"] = _model_state(model)
            body["rng"] = rng_state(wl.train_loader)
        store.save(body, meta={"stage": stage_name, "step": step, "world_size": D.world_size()})

    def saver(stage_name: str, offset: int):
        def on_checkpoint(make_snapshot):
            if is_main:
                snap = make_snapshot()
                save(stage_name, snap, offset + snap["position"]["step"])
        return on_checkpoint

    def fit_resume(stage_name: str):
        return state["fit"] if state is not None and state["stage"] == stage_name else None

    def restore_boundary(stage_name: str) -> None:
        """Resuming at a stage start (no fit in progress): weights, algorithm state, RNG."""
        if state is not None and state["stage"] == stage_name and state["fit"] is None:
            model.load_state_dict(state["model"])
            set_rng_state(state["rng"], wl.train_loader)

    try:
        # 1. dense ---------------------------------------------------------------------------------
        t0 = time.perf_counter()
        if stage_i == 0:
            if train_dense:
                r = fit(model, task, wl.train_loader, wl.eval_loader, dense_cfg, desc="dense", hooks=test_hooks,
                        resume=fit_resume("dense"), checkpoint_every=every, runtime=rt, on_checkpoint=saver("dense", 0))
                results["history"]["dense"] = r["history"]
                if is_main:
                    save_checkpoint(out / "dense", model, None, recipe=resolved, extra={"stage": "dense"})
            results["metrics"]["dense"] = task.evaluate(model, wl.eval_loader)
            results["seconds"]["dense"] = time.perf_counter() - t0
            log(f"dense {metric}: {results['metrics']['dense'][metric]:.4f}")
        extra_hooks = []
        if recipe.distill:
            if stage_i > 0 and train_dense:   # the teacher is the dense model: reload it
                load_checkpoint(out / "dense", model)
            extra_hooks = [make_distiller(recipe.distill, model, task)]  # frozen copy of the dense model
        if stage_i == 0:
            save("search", None, offsets["search"])

        # 2. algorithm phase -----------------------------------------------------------------------
        t0 = time.perf_counter()
        if stage_i <= 1:
            restore_boundary("search")
            if state is not None and state["stage"] == "search":
                algo.load_state_dict(to_device(state["algo"], device))
            if algo.has_search:
                r = fit(model, task, wl.train_loader, wl.eval_loader, search_cfg, hooks=[algo, *extra_hooks, *test_hooks],
                        masks=algo.masks_during_search(model), desc=f"{algo.name}", resume=fit_resume("search"),
                        checkpoint_every=every, runtime=rt, on_checkpoint=saver("search", offsets["search"]))
                results["history"]["search"] = r["history"]
            masks = algo.final_masks(model).to(device)
            if D.is_distributed():       # identical by construction; rank 0's copy is authoritative
                D.broadcast_state(dict(masks.items()))
            masks.apply(model)
            results["metrics"]["after_hard_prune"] = task.evaluate(model, wl.eval_loader)
            results["seconds"]["search"] = time.perf_counter() - t0
            log(f"after hard-prune ({masks.sparsity():.4f} sparsity): {results['metrics']['after_hard_prune'][metric]:.4f}")
            save("retrain", None, offsets["retrain"])
        else:
            algo.load_state_dict(to_device(state["algo"], device))
            masks = MaskSet()
            masks.load_state_dict(state["masks"])
            masks.to(device)
            restore_boundary("retrain")

        # 3. hard-pruned retraining ----------------------------------------------------------------
        t0 = time.perf_counter()
        if retrain_cfg.epochs > 0:
            for h in extra_hooks:
                getattr(h, "set_stage", lambda *_: None)("retrain")
            r = fit(model, task, wl.train_loader, wl.eval_loader, retrain_cfg, hooks=[*extra_hooks, *test_hooks],
                    masks=masks, desc="retrain", restore_best=True, resume=fit_resume("retrain"),
                    baseline=results["metrics"]["after_hard_prune"],
                    checkpoint_every=every, runtime=rt, on_checkpoint=saver("retrain", offsets["retrain"]))
            results["history"]["retrain"] = r["history"]
    except NonFiniteLoss as e:
        last = store.checkpoints()
        where = (f"the last good checkpoint is {last[-1]} (read it with prunekit.io.checkpoint.load_state)"
                 if last else "no checkpoint had been written yet")
        raise NonFiniteLoss(f"{e}. Stopped; {where}") from None
    final = task.evaluate(model, wl.eval_loader)
    results["metrics"]["final"] = final
    results["seconds"]["retrain"] = time.perf_counter() - t0
    results["seconds"]["total"] = time.perf_counter() - t_start
    log(f"final {metric}: {final[metric]:.4f}")

    # 4. numbers + checkpoint --------------------------------------------------------------------
    for h in test_hooks:
        getattr(h, "close", lambda: None)()
    summary = model_summary(model, masks, to_device(wl.example_input, device))
    for layer in summary["layers"]:
        layer["structure"] = masks.structures.get(layer["name"], layer["structure"])
    results.update({k: summary[k] for k in summary})
    results["score"] = final[metric]
    results["dense_score"] = results["metrics"]["dense"][metric]
    results["score_after_hard_prune"] = results["metrics"]["after_hard_prune"][metric]
    results["retrain_selection"] = "best of the hard-pruned entry weights and each retraining epoch (dev metric)"
    results["algorithm"] = recipe.algorithm.name
    results["structure"] = recipe.prune.structure
    results["target_sparsity"] = recipe.prune.sparsity
    results["machine"] = _machine(device)
    results["precision"] = recipe.precision
    results["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results["algorithm_state_keys"] = sorted(algo.state_dict())
    if D.is_distributed():
        _, algo_tensors = flatten_state(algo.state_dict())
        digest = D.tensor_digest({**{f"model.{k}": v for k, v in model.state_dict().items()},
                                  **{f"mask.{k}": v for k, v in masks.items()},
                                  **{f"algo.{k}": v for k, v in algo_tensors.items()}})
        same, digests = D.all_equal(digest)
        results["distributed"] = {"world_size": D.world_size(), "backend": str(torch.distributed.get_backend()),
                                  "ranks_identical": same, "digests": digests}
        if not same:
            log(f"warning: ranks ended with different weights/masks/algorithm state: {digests}")
    if is_main:
        save_checkpoint(out, model, masks, recipe=resolved,
                        extra={"stage": "final", "metric": metric, "score": final[metric]})
        atomic_write_json(out / "results.json", results)
        shutil.rmtree(store.root, ignore_errors=True)   # finished: the run state is no longer needed
    D.barrier()
    return results
