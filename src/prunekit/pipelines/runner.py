"""The one runner: a run is a list of stages (:mod:`prunekit.pipelines.stages`) over a :class:`RunContext`.

:func:`run_stages` alone owns the run state: the resolved recipe, checkpoints (``out_dir/state``), resume
(finished stages skipped, the stage in progress restored), the results file.  :func:`run_pipeline` is the
pipeline a recipe describes: dense → algorithm phase → hard-prune → retrain → results.

``run_pipeline(recipe, out_dir)`` writes into ``out_dir``::

    recipe.yaml        the resolved recipe (every default filled in)
    results.json       metrics per stage, sparsity, compression rate, per-layer table, FLOPs, timings
    model.safetensors  final weights   ┐
    masks.safetensors  final masks     ├ a prunekit checkpoint (see prunekit.io.checkpoint)
    manifest.json      shapes, checksums, recipe ┘
    dense/             the dense checkpoint (reused by later runs via model.checkpoint)
"""
from __future__ import annotations

import copy
import os
import platform
import shutil
import signal
import time
from collections.abc import Callable, Sized
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import torch
import yaml
from torch import nn

from prunekit.algorithms import get_algorithm_class
from prunekit.algorithms.hooks import Hook
from prunekit.core.errors import RecipeError
from prunekit.core.masks import MaskSet
from prunekit.core.plan import PruneSpec, target_plan
from prunekit.core.stats import model_summary
from prunekit.core.structures import GroupStructure, parse_structure
from prunekit.core.targets import TargetSpec, find_targets
from prunekit.deploy import surgery
from prunekit.deploy.quant_storage import artefact_report, encode_artefact, save_artefact
from prunekit.graph import TraceError, coupled_groups
from prunekit.io.checkpoint import (
    CheckpointError,
    StateStore,
    atomic_write_json,
    atomic_write_text,
    flatten_state,
    save_checkpoint,
)
from prunekit.models.user import load_weights
from prunekit.pipelines.recipe import Recipe, from_dict, to_dict
from prunekit.pipelines.stages import Dense, HardPrune, Quantize, Retrain, Search, Stage
from prunekit.pipelines.workloads import Workload, build_workload
from prunekit.training import distributed as D
from prunekit.training.config import Runtime
from prunekit.training.device import check_precision, resolve_device, set_threads, to_device
from prunekit.training.loop import NonFiniteLoss, fit, rng_state, seed_everything, set_rng_state
from prunekit.training.progress import TensorBoardLogger

__all__ = ["Workload", "build_workload", "prune_spec_from", "validate_recipe", "machine_info", "run_pipeline",
           "run_stages", "RunContext", "ResumeError", "STATE_DIR", "KILL_ENV", "discard_failed_start"]

STATE_DIR = "state"                          # out_dir/state/ckpt-NNNNNN: resumable run state
KILL_ENV = "PRUNEKIT_TEST_KILL_AT_STEP"      # tests: SIGKILL self after this optimizer step ("N" or "phase:N")
_NOT_COMPARED = ("checkpoint_every", "device", "threads", "log")   # recipe keys that may change between a run and its resume
FINISHED_FILE = "results.json"               # a folder holding it holds a finished run


class ResumeError(CheckpointError):
    """The output folder holds an unfinished run (pass --resume) or a run of another recipe."""


def prune_spec_from(recipe: Recipe) -> PruneSpec:
    p = recipe.prune
    try:
        return PruneSpec(p.structure, p.sparsity, p.score, p.scope,
                         TargetSpec(list(p.targets.include), list(p.targets.exclude), list(p.targets.types)),
                         dict(p.overrides), min_keep=p.min_keep, multiple_of=p.multiple_of, uniform=p.uniform,
                         ignore=list(p.ignore))
    except ValueError as e:
        raise RecipeError(f"prune: {e}") from None


def machine_info(device: torch.device | None = None) -> dict:
    """What a result was measured on (``results.json`` and the benchmarks' JSON)."""
    out = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
           "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpus": os.cpu_count()}
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


def _extra_hooks(recipe: Recipe, ctx: RunContext) -> list:
    """Hooks every fit of the run gets: the test kill switch, TensorBoard logging (``log.tensorboard``)."""
    hooks: list = [_TestKill(os.environ[KILL_ENV], ctx)] if os.environ.get(KILL_ENV) else []
    if recipe.log.tensorboard and ctx.is_main:
        hooks.append(TensorBoardLogger(ctx.out / "tb", base=lambda: ctx.steps_done))
    return hooks


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


def validate_recipe(recipe: Recipe, workload: Workload, spec: PruneSpec | None = None) -> tuple[PruneSpec, Any]:
    """Checks that need the model: targets exist, overrides match, structure fits each target.  Returns the
    spec and the recipe's algorithm built for ``spec`` (default: the recipe's)."""

    spec = spec or prune_spec_from(recipe)
    cls = get_algorithm_class(recipe.algorithm.name)
    if spec.groups is None and getattr(cls, "uses_groups", None) and not spec.st.coupled:
        try:                                # e.g. heads_neurons: groups from the graph when the model traces
            was = workload.model.training
            spec.groups = coupled_groups(workload.model.eval(), workload.example_input)
            workload.model.train(was)
        except TraceError:
            workload.model.train(was)
    if spec.st.coupled and spec.groups is None:
        try:
            was = workload.model.training
            spec.groups = coupled_groups(workload.model.eval(), workload.example_input)
            workload.model.train(was)
        except TraceError as e:
            raise RecipeError(f"prune.structure {spec.structure}: the model's coupled groups come from a "
                              f"torch.export trace, which failed: {e}") from None
    try:
        plan = target_plan(workload.model, spec)
        params = dict(workload.model.named_parameters())
        for n, (st, _sp) in plan.items():
            st.check_shape(params[n].shape)
    except ValueError as e:
        raise RecipeError(f"prune.targets/structure: {e}") from None
    if spec.st.coupled and not plan:
        raise RecipeError(f"prune.structure {spec.structure}: the model has no prunable group of these kinds; "
                          f"groups: {group_table(spec, workload.model)}")
    algo = cls(from_dict(cls.Params, recipe.algorithm.params, "algorithm.params"), spec)
    if recipe.quant.scheme is not None:
        qspec = recipe.quant.spec(spec.targets)
        qspec.plan(workload.model)                   # targets and overrides match the model
        if hasattr(algo, "quant"):                   # ADMM family: the Z-step projects onto pruned + quantized
            algo.quant = qspec
        elif qspec.schedule:
            raise RecipeError(f"quant.schedule: algorithm {recipe.algorithm.name} has no quantized search "
                              "(use admm or admm_progressive)")
    return spec, algo


def group_table(spec: PruneSpec, model: nn.Module) -> list[dict]:
    """Group structures: every group of the structure's kinds with ``count`` and ``status``
    (``pruned`` or why it is left dense: not removable and the graph's reason, ignored, not a target)."""
    if not spec.st.coupled or spec.groups is None:
        return []
    plan, skipped = spec.group_plan(find_targets(model, spec.targets))
    sp = {g.name: s for g, s, _ in plan}
    return [{"name": g.name, "kind": g.kind, "count": g.count,
             **({"status": "pruned", "sparsity": sp[g.name]} if g.name in sp else
                {"status": "dense", "reason": skipped.get(g.name, "")})}
            for g in spec.groups if g.kind in cast(GroupStructure, spec.st).kinds]


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
        bs = D.ResumableSampler(len(cast(Sized, loader.dataset)), loader.batch_size, seed, shuffle=shuffle,
                                world=D.world_size(), rank=D.rank())
    except ValueError as e:
        raise RecipeError(f"data: {e}") from None
    return DL(loader.dataset, batch_sampler=bs, collate_fn=loader.collate_fn, num_workers=loader.num_workers,
              pin_memory=loader.pin_memory, generator=torch.Generator().manual_seed(seed))


class _TestKill(Hook):
    """``$PRUNEKIT_TEST_KILL_AT_STEP`` = ``N`` (optimizer steps counted over all phases of the run) or
    ``phase:N``: SIGKILL this process right after that step — deterministic crash for resume tests."""

    def __init__(self, spec: str, run: RunContext):
        phase, _, n = spec.rpartition(":")
        self.phase, self.n, self.run = phase or None, int(n), run

    def after_step(self, ctx):
        step = ctx.step if self.phase else self.run.steps_done + ctx.step
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



def _model_state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclass
class RunContext:
    """What the stages of a run share.  ``results`` (and ``masks``, the algorithm's state, ``steps_done``) are
    saved in every checkpoint; ``dense`` (the dense weights, for a teacher or shared levels) and ``cache`` are
    rebuilt on a resume (by :class:`~prunekit.pipelines.stages.Dense`'s ``skip`` and the stages themselves)."""

    recipe: Recipe
    resolved: dict
    workload: Workload
    spec: PruneSpec
    algo: Any
    out: Path
    log: Callable[[str], None]
    results: dict
    store: StateStore
    every: int = 0
    is_main: bool = True
    masks: MaskSet | None = None
    dense: dict | None = None
    cache: dict = field(default_factory=dict)
    steps_done: int = 0                 # optimizer steps of the run's finished fits
    stage: str = ""
    fit_resume: dict | None = None      # the snapshot of the fit in progress (resume), used once
    test_hooks: list = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    runtime: Runtime = field(default_factory=Runtime)
    created: bool = False               # open_run made ``out`` (so a failed start may remove it)

    @property
    def model(self) -> nn.Module:
        return self.workload.model

    @property
    def task(self):
        return self.workload.task

    def fit(self, cfg, *, desc: str, hooks=(), masks=None, model: nn.Module | None = None, **kw) -> dict:
        """The stage's one training phase: checkpoints every ``every`` steps and epoch, resumes its snapshot."""
        resume, self.fit_resume = self.fit_resume, None
        r = fit(model if model is not None else self.model, self.task, self.workload.train_loader,
                self.workload.eval_loader, cfg, hooks=[*hooks, *self.test_hooks], masks=masks, desc=desc,
                resume=resume, checkpoint_every=self.every, on_checkpoint=self._on_checkpoint,
                runtime=self.runtime, **kw)
        self.steps_done += r["steps"]
        return r

    def _on_checkpoint(self, make_snapshot) -> None:
        if self.is_main:
            self.save(make_snapshot())

    def save(self, snap: dict | None = None) -> None:
        """Checkpoint the run: at a stage start (``snap`` None: weights + RNG) or inside its fit."""
        if not self.is_main:
            return
        body = {"stage": self.stage, "fit": snap, "recipe": self.resolved, "results": self.results,
                "algo": self.algo.state_dict() if self.algo is not None else {}, "steps_done": self.steps_done,
                "masks": self.masks.state_dict() if self.masks is not None else None}
        if snap is None:
            body["model"] = _model_state(self.model)
            body["rng"] = rng_state(self.workload.train_loader)
        step = self.steps_done + (snap["position"]["step"] if snap is not None else 0)
        self.store.save(body, meta={"stage": self.stage, "step": step, "world_size": D.world_size()})

    def restore(self, state: dict) -> None:
        """Resume at the checkpoint's stage: results, masks, algorithm state, step count; at a stage start
        the weights and RNG, inside a fit its snapshot (restored by the fit itself, after the hooks' begin)."""
        self.results, self.steps_done = state["results"], int(state.get("steps_done", 0))
        if self.algo is not None:
            self.algo.load_state_dict(to_device(state["algo"], self.device))   # saved on the CPU
        if state["masks"] is not None:
            self.masks = MaskSet()
            self.masks.load_state_dict(state["masks"])
            self.masks.to(self.device)
        if state["fit"] is None:
            self.model.load_state_dict(state["model"])
            set_rng_state(state["rng"], self.workload.train_loader)
        self.fit_resume = state["fit"]


def _merge(results: dict, out: dict) -> None:
    for k, v in out.items():
        if k == "seconds":
            secs = results.setdefault("seconds", {})
            for name, sec in v.items():
                secs[name] = secs.get(name, 0.0) + sec
        elif k in ("metrics", "history") and isinstance(v, dict):
            results.setdefault(k, {}).update(v)
        else:
            results[k] = v


def _open_store(out: Path, resolved: dict, resume: bool, log) -> tuple[StateStore, dict | None]:
    """The run state in ``out/state``: refused without ``resume``, or when the recipe differs."""
    store = StateStore(out / STATE_DIR)
    if not store.exists():
        if resume:
            log(f"nothing to resume in {out}; starting a fresh run")
        return store, None
    if not resume:
        raise ResumeError(f"{out} holds an unfinished run ({len(store.checkpoints())} checkpoint(s) in "
                          f"{store.root}); pass --resume to continue it, or pick another --out")
    latest = store.load_latest(warn=log)
    assert latest is not None, "store.exists(): there is a checkpoint"
    state, meta, path = latest
    diff = _recipe_diff(resolved, state["recipe"])
    if diff:
        raise ResumeError(f"cannot resume {out}: the recipe differs from the one it was started with: "
                          + "; ".join(diff[:8]) + " — rerun with the original recipe or pick another --out")
    log(f"resuming from {path} (stage {state['stage']}, step {meta.get('step', 0)})")
    state["results"].setdefault("resumed", []).append({"stage": state["stage"], "step": meta.get("step", 0),
                                                       "checkpoint": str(path)})
    return store, state


def open_run(recipe: Recipe, out_dir, *, resolved: dict | None = None, resume: bool = False,
             checkpoint_every: int | None = None, log: Callable[[str], None] = print,
             spec: PruneSpec | None = None, overwrite: bool = False) -> tuple[RunContext, dict | None]:
    """Start (or reopen) a run: device and threads, state store, seeded workload (model built, data read),
    ``model.checkpoint`` loaded, validated spec and algorithm — and only then the output folder with the
    resolved ``recipe.yaml`` (a recipe that fails any of these leaves nothing behind).  Returns the context and the checkpoint to resume (or None)."""
    device = run_device(recipe)
    D.init_from_env(device)
    is_main = D.rank() == 0
    if not is_main:
        log = lambda *_a, **_k: None  # noqa: E731
    out = Path(out_dir)
    resolved = resolved if resolved is not None else to_dict(recipe)
    every = int(recipe.checkpoint_every if checkpoint_every is None else checkpoint_every)
    if every < 0:
        raise RecipeError(f"checkpoint_every: {every} is out of range (must be >= 0)")
    if overwrite and resume:
        raise RecipeError("--overwrite and --resume exclude each other")
    check_out_dir(out, resume=resume, overwrite=overwrite)
    store, state = (StateStore(out / STATE_DIR), None) if overwrite else _open_store(out, resolved, resume, log)
    seed_everything(recipe.seed)
    wl = build_workload(recipe)
    if recipe.model.checkpoint:                 # strictly (names, shapes, checksums), before the folder exists
        log(f"loaded dense weights from {load_weights(wl.model, recipe.model.checkpoint)}")
    wl.train_loader = _resumable_loader(wl.train_loader, recipe.seed)
    spec, algo = validate_recipe(recipe, wl, spec)
    for row in group_table(spec, wl.model):
        if row["status"] != "pruned":
            log(f"group {row['name']} ({row['count']} {row['kind']}) left dense: {row['reason']}")
    algo.calibration_loader = wl.train_loader   # post-training algorithms (wanda, sparsegpt, ...) sample it
    algo.calibration = recipe.calibration       # ... as the recipe's calibration section says
    wl.model.to(device)                         # the teacher, masks and algorithm state follow it
    D.barrier()
    created = False
    if is_main:                                 # validated: only now does the output folder appear
        if overwrite:
            clear_out_dir(out)
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "recipe.yaml", yaml.safe_dump(resolved, sort_keys=False))
    try:
        ctx = RunContext(recipe, resolved, wl, spec, algo, out, log, {}, store, every=every, is_main=is_main,
                         device=device, runtime=Runtime(recipe.precision, recipe.log.progress_every_s,
                                                        recipe.log.progress_every_steps), created=created)
        ctx.test_hooks = _extra_hooks(recipe, ctx)
    except BaseException:
        discard_failed_start(out, created)
        raise
    return ctx, state


def _empty_tree(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and all(_empty_tree(c) for c in path.iterdir())


def discard_failed_start(out: Path, created: bool) -> None:
    """After a failure: remove ``out`` if this run created it and it holds nothing but ``recipe.yaml`` and
    empty folders — a run that fails to start leaves no folder behind.  A folder that existed before the
    run, or one holding anything the run wrote (checkpoints, dense weights, logs, results), is kept."""
    if created and out.is_dir() and all(c.name == "recipe.yaml" or _empty_tree(c) for c in out.iterdir()):
        shutil.rmtree(out, ignore_errors=True)


def _run_each(ctx: RunContext, stages: list[Stage], state: dict | None) -> None:
    names = [s.name for s in stages]
    start = names.index(state["stage"]) if state is not None else 0
    for i, st in enumerate(stages):
        ctx.stage = st.name
        if i < start:
            st.skip(ctx)
            continue
        if i == start and state is not None:
            ctx.restore(state)
        elif st.trains and i > 0:
            ctx.save()
        try:
            _merge(ctx.results, st.run(ctx) or {})
        except NonFiniteLoss as e:
            last = ctx.store.checkpoints()
            where = (f"the last good checkpoint is {last[-1]} (read it with prunekit.io.checkpoint.load_state)"
                     if last else "no checkpoint had been written yet")
            raise NonFiniteLoss(f"{e}. Stopped; {where}") from None


def run_stages(ctx: RunContext, stages: list[Stage], state: dict | None, *,
               results_file: str = "results.json") -> dict:
    """Run ``stages`` in order; on a resume skip those finished before the checkpoint's stage and restore it.
    A stage that trains is preceded by a checkpoint (except the first).  At the end: ``seconds.total``,
    ``out/results_file``, and the run state is removed.  A run that fails before writing anything but
    ``recipe.yaml`` removes the folder it created (:func:`discard_failed_start`)."""
    t_start = time.perf_counter()
    try:
        _run_each(ctx, stages, state)
    except BaseException:
        if ctx.is_main:
            discard_failed_start(ctx.out, ctx.created)
        raise
    for h in ctx.test_hooks:
        getattr(h, "close", lambda: None)()
    ctx.results.setdefault("seconds", {})["total"] = (ctx.results.get("seconds", {}).get("total", 0.0)
                                                      + time.perf_counter() - t_start)
    if ctx.is_main:
        atomic_write_json(ctx.out / results_file, ctx.results)
        shutil.rmtree(ctx.store.root, ignore_errors=True)   # finished: the run state is no longer needed
    D.barrier()
    return ctx.results


class Report(Stage):
    """The pipeline's numbers (sparsity, compression, per-layer table, FLOPs, …) and the final checkpoint."""

    name = "report"

    def run(self, ctx: RunContext) -> dict:
        recipe, model, masks, metric = ctx.recipe, ctx.model, ctx.masks, ctx.task.metric
        assert masks is not None, "the report stage runs after hard-pruning"
        res = ctx.results
        summary = model_summary(model, masks, to_device(ctx.workload.example_input, ctx.device))
        for layer in summary["layers"]:
            layer["structure"] = masks.structures.get(layer["name"], layer["structure"])
        out = {k: summary[k] for k in summary}
        final = res["metrics"]["final"]
        out.update({"score": final[metric], "dense_score": res["metrics"]["dense"][metric],
                    "score_after_hard_prune": res["metrics"]["after_hard_prune"][metric],
                    "retrain_selection": "best of the hard-pruned entry weights and each retraining epoch (dev metric)",
                    "algorithm": recipe.algorithm.name, "structure": recipe.prune.structure,
                    "target_sparsity": recipe.prune.sparsity, "machine": machine_info(ctx.device),
                    "precision": recipe.precision,
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "algorithm_state_keys": sorted(ctx.algo.state_dict())})
        gst = cast(GroupStructure, ctx.spec.st) if ctx.spec.st.coupled else None
        if gst is None and getattr(ctx.algo, "uses_groups", None) and getattr(ctx.algo.params, "structure", None):
            gst = cast(GroupStructure, parse_structure(ctx.algo.params.structure))   # heads_neurons: the alias's group kinds
        if gst is not None:
            out["structure"] = str(gst)
            out["group_kinds"] = list(gst.kinds)
            if ctx.spec.st.coupled:
                out["groups"] = group_table(ctx.spec, model)
            out.update(_graph_macs(model, masks, ctx.workload.example_input, ctx.log))
        if D.is_distributed():
            out["distributed"] = _rank_digests(ctx)
        if ctx.is_main:
            save_checkpoint(ctx.out, model, masks, recipe=ctx.resolved,
                            extra={"stage": "final", "metric": metric, "score": final[metric]})
        if "qcodes" in ctx.cache:
            out["quant"] = _quant_artefact(ctx)
        return out


def _quant_artefact(ctx: RunContext) -> dict:
    """``out/model.pkq`` (bit-packed codes, scales, positions, the rest raw; checked to reload bit for bit) and
    its byte breakdown and compression figures (docs/quantization.md)."""
    q = ctx.recipe.quant
    state = {k: v.detach().cpu() for k, v in ctx.model.state_dict().items()}
    path = ctx.out / "model.pkq"
    if ctx.is_main:
        rep = save_artefact(path, state, ctx.cache["qcodes"], entropy=q.entropy)
    else:
        rep = artefact_report(encode_artefact(state, ctx.cache["qcodes"], q.entropy))
    ctx.log(f"quantized artefact {path}: {rep['file_bytes']} bytes; weight data {rep['weight_data_compression']}×, "
            f"whole artefact {rep['whole_artefact_compression']}×")
    return {"scheme": q.scheme, "overrides": dict(q.overrides), "method": q.method, "schedule": list(q.schedule),
            "artefact": "model.pkq", **rep}


def _graph_macs(model: nn.Module, masks: MaskSet, example_input, log) -> dict:
    """MACs from the graph before and after compaction (on CPU copies; the run's model is untouched),
    or a note when the model does not trace or does not compact."""
    try:
        cpu = copy.deepcopy(model).cpu().eval()
        res = surgery.compact(cpu, masks.copy().to("cpu"), to_device(example_input, torch.device("cpu")),
                              inplace=False)
    except (TraceError, surgery.CompactionError) as e:
        log(f"MACs from the graph: not available ({str(e).splitlines()[0][:200]})")
        return {"macs": {"note": str(e).splitlines()[0][:300]}}
    assert res.macs_before is not None   # count_macs (the default) sets both
    return {"macs": {"dense": res.macs_before, "compacted": res.macs_after,
                     "reduction": res.macs_before / max(res.macs_after or 1, 1)},
            "params_compacted": {"before": res.params_before, "after": res.params_after}}


def _rank_digests(ctx: RunContext) -> dict:
    _, algo_tensors = flatten_state(ctx.algo.state_dict())
    assert ctx.masks is not None, "digests are taken after hard-pruning"
    digest = D.tensor_digest({**{f"model.{k}": v for k, v in ctx.model.state_dict().items()},
                              **{f"mask.{k}": v for k, v in ctx.masks.items()},
                              **{f"algo.{k}": v for k, v in algo_tensors.items()}})
    same, digests = D.all_equal(digest)
    if not same:
        ctx.log(f"warning: ranks ended with different weights/masks/algorithm state: {digests}")
    return {"world_size": D.world_size(), "backend": str(torch.distributed.get_backend()),
            "ranks_identical": same, "digests": digests}


def pipeline_stages(recipe: Recipe, algo) -> list[Stage]:
    """dense → the algorithm's search → hard-prune → retrain → report.  The dense weights are kept (the
    teacher) when anything distils."""
    keep = bool(recipe.distill) or callable(getattr(algo, "set_teacher", None))
    if recipe.quant.scheme is not None:
        return [Dense(keep=keep), Search(), HardPrune(), Retrain(final=False), Quantize(), Report()]
    return [Dense(keep=keep), Search(), HardPrune(), Retrain(), Report()]


def run_pipeline(recipe: Recipe, out_dir: str | Path, *, log: Callable[[str], None] = print, resume: bool = False,
                 checkpoint_every: int | None = None, overwrite: bool = False) -> dict:
    """Run the recipe end to end; returns the results dict (also written to ``out_dir/results.json``).

    The run checkpoints its whole state into ``out_dir/state/`` after every epoch and every
    ``checkpoint_every`` optimizer steps (argument, else ``recipe.checkpoint_every``; 0 = epochs only)
    and at each stage boundary.  With ``resume=True`` it continues from the newest good checkpoint
    (falling back to the previous one if the newest is corrupt) and ends with the same result as an
    uninterrupted run.  Without ``resume``, an ``out_dir`` holding an unfinished run is an error.
    Under ``torchrun`` (``WORLD_SIZE`` > 1) it trains data-parallel; only rank 0 writes files.
    A folder holding a finished run is refused unless ``overwrite`` (which clears it after validation)."""
    ctx, state = open_run(recipe, out_dir, resume=resume, checkpoint_every=checkpoint_every, log=log,
                          overwrite=overwrite)
    ctx.results = {"name": recipe.name, "metric": ctx.task.metric, "metrics": {}, "seconds": {}, "history": {},
                   "workload": ctx.workload.info}
    return run_stages(ctx, pipeline_stages(recipe, ctx.algo), state)
