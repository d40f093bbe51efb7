"""Shared-weights multi-sparsity models: nested masks, one weight set, switch levels by rewriting the difference.

A device that switches between models of different sparsity (as its energy changes) keeps **one** weight
set and K **nested** masks ``M_0 ⊆ M_1 ⊆ … ⊆ M_{K-1}`` (level 0 = sparsest).  Level ``k``'s weights are
``W · M_k``, so every weight kept by a sparser level is kept, with the same value, by every denser level
— the construction of the reference work::

    W_high   = W · M_h
    W_medium = W · M_hm + W_high         (M_hm = weights added by the medium level)
    W_low    = W · M_l  + W_medium       (the denser level adds weights, never changes shared ones)

Pieces (all plain data keyed by parameter name, like :class:`~prunekit.masks.MaskSet`):

* :class:`NestedMasks` — K :class:`MaskSet` levels, sparsest first, with the invariant checked;
  :func:`nested_masks` builds them from one weight set by nested selection per structure.
* Training: :func:`train_sequential` (train the sparsest level with any registered algorithm, freeze it,
  train only the added weights of the next level, …) and :func:`train_joint` (one weight set, one level
  per step cycled/sampled — or all levels summed — each level's loss on its own mask; a
  :class:`JointLevels` hook inside :func:`prunekit.train.fit`).
* One artifact: :func:`save_shared` writes one ``.safetensors`` file — the densest level's weights, every
  level's mask as a bit-packed *level map* and a JSON manifest in the safetensors header;
  :func:`load_level` loads any level; :class:`SharedWeightsModel` switches a loaded model between levels
  **in place**, writing only the elements that differ (and counting the bytes written).
* Switching cost: :func:`switch_cost` / :func:`switch_table` — bytes of the patch a device writes (changed
  values + an index of the changed positions in the cheapest of :mod:`prunekit.storage`'s bitmask / CSR /
  relative encodings, or a dense rewrite of the layer when that is cheaper) against rewriting the whole
  model; :func:`breakeven_report` gives the sparsity below which storing indices costs more than it saves.

Nesting per structure (the sparser level's mask first, each denser level adds groups chosen among the
remaining ones, by the same score):

* ``unstructured | row | column | block:RxC`` — groups of the sparser level are forced kept, the rest are
  ranked by the structure's group score (layer or global scope), so a denser level adds whole groups;
* ``nm:N:M`` — the structure names the *sparsest* level (N kept of M); a denser level at sparsity ``s``
  keeps ``M - round(s·M)`` of every M, a superset of the sparser level's entries in each run:
  ``nm:1:4`` at levels 0.75/0.5/0.25 gives 1:4 ⊂ 2:4 ⊂ 3:4;
* ``pattern…`` — each tile keeps the best pattern (from the structure's pattern set) that *contains* the
  sparser level's pattern of that tile; when the set has no such superset the tile keeps its sparser
  pattern plus its largest remaining entries (the set is extended for that tile); with connectivity pruning (``+conn`` or no fixed ``keep``) whole tiles that
  the sparser level dropped are the ones added back or dropped, lowest energy first.

Parameters that are not pruned (biases, norms) are shared by all levels: sequential training freezes them
after the sparsest level, joint training trains them for all levels at once.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from . import storage
from .checkpoint import CheckpointError, _atomic_replace, state_dict_for_save
from .masks import MaskSet
from .pruner import PruneSpec
from .scoring import select_keep, select_keep_global
from .structures import NM, Pattern, Structure, connectivity_prune, parse_structure
from .targets import find_targets
from .train import Hook, TrainContext, fit

__all__ = [
    "NestedMasks", "nested_masks", "nested_mask_for", "level_plan", "shared_weights",
    "FreezeShared", "JointLevels", "LevelView", "train_sequential", "train_joint",
    "save_shared", "read_shared", "load_level", "SharedWeightsModel", "SharedFormatError",
    "switch_cost", "switch_table", "patch_bytes", "breakeven_report", "SWITCH_ENCODINGS",
]

FORMAT = "prunekit-shared/1"
SWITCH_ENCODINGS = ("bitmask", "csr", "relative")


class SharedFormatError(CheckpointError):
    """A shared-weights artifact is missing, corrupt, or does not fit the model."""


# =============================================================================================
# Nested masks
# =============================================================================================
class NestedMasks:
    """K nested :class:`MaskSet` levels, **sparsest first**: ``levels[k] ⊆ levels[k+1]`` for every mask.

    Construction checks that every level has the same names and shapes and that the invariant holds,
    raising ``ValueError`` naming the first offending parameter and level otherwise."""

    def __init__(self, levels: Sequence[MaskSet]):
        if len(levels) < 1:
            raise ValueError("NestedMasks needs at least one level")
        self.levels: list[MaskSet] = [lv.copy() for lv in levels]
        self.check()

    # -- invariant ----------------------------------------------------------------------------
    def check(self) -> None:
        names = self.levels[0].names()
        for k, lv in enumerate(self.levels[1:], 1):
            if lv.names() != names and set(lv.names()) != set(names):
                raise ValueError(f"level {k} masks {sorted(set(lv.names()) ^ set(names))[:5]} differ from level 0's names")
            for n in names:
                a, b = self.levels[k - 1][n], lv[n]
                if a.shape != b.shape:
                    raise ValueError(f"{n}: level {k - 1} mask shape {tuple(a.shape)} != level {k} {tuple(b.shape)}")
                bad = int((a & ~b).sum())
                if bad:
                    raise ValueError(f"masks are not nested: {n} keeps {bad} weights at level {k - 1} (sparser) "
                                     f"that level {k} (denser) drops; levels must be sparsest first")

    # -- access -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.levels)

    def __getitem__(self, k: int) -> MaskSet:
        return self.levels[self._idx(k)]

    def _idx(self, k: int) -> int:
        if not isinstance(k, (int, np.integer)) or not (-len(self.levels) <= int(k) < len(self.levels)):
            raise IndexError(f"level {k!r} out of range: this model has levels 0..{len(self.levels) - 1} (0 = sparsest)")
        return int(k) % len(self.levels)

    def names(self) -> list[str]:
        return self.levels[0].names()

    @property
    def densest(self) -> MaskSet:
        return self.levels[-1]

    def sparsities(self) -> list[float]:
        return [lv.sparsity() for lv in self.levels]

    def added(self, k: int) -> MaskSet:
        """Weights level ``k`` adds to level ``k-1`` (level 0: all its weights)."""
        k = self._idx(k)
        if k == 0:
            return self.levels[0].copy()
        prev, cur = self.levels[k - 1], self.levels[k]
        return MaskSet({n: cur[n] & ~prev[n] for n in cur}, cur.structures)

    def level_map(self, name: str) -> Tensor:
        """uint8 tensor: the sparsest level keeping each element (``K`` = kept by none).  The nested masks
        in one array: ``mask_k = level_map <= k``."""
        K = len(self.levels)
        out = torch.full(self.levels[0][name].shape, K, dtype=torch.uint8)
        for k in reversed(range(K)):
            out[self.levels[k][name]] = k
        return out

    @classmethod
    def from_level_maps(cls, maps: dict[str, Tensor], K: int, structures: dict[str, str] | None = None) -> "NestedMasks":
        return cls([MaskSet({n: m <= k for n, m in maps.items()}, structures) for k in range(K)])

    def state_dict(self) -> dict:
        return {"levels": [lv.state_dict() for lv in self.levels]}

    def load_state_dict(self, state: dict) -> None:
        lvs = []
        for s in state["levels"]:
            ms = MaskSet()
            ms.load_state_dict(s)
            lvs.append(ms)
        self.levels = lvs
        self.check()


# -- nested selection per structure ---------------------------------------------------------------
def nested_mask_for(w: Tensor, structure: "str | Structure", sparsity: float, base: Tensor | None = None,
                    score: Any = "l2") -> Tensor:
    """Keep-mask of ``w`` at ``sparsity`` that contains ``base`` (the sparser level's mask): the base's
    groups are forced kept, the rest chosen by ``score`` among the remaining ones (see module docstring)."""
    st = parse_structure(structure)
    st.check_shape(w.shape)
    w = w.detach()
    if base is None:
        return st.mask(w, sparsity, score)
    base = base.bool()
    if base.shape != w.shape:
        raise ValueError(f"base mask shape {tuple(base.shape)} != weight shape {tuple(w.shape)}")
    if isinstance(st, NM):
        imp = w.abs().double()
        imp[base] = math.inf
        k = st.keep_per_group(sparsity)
        have = st.partition(base.float()).sum(1).max().item() if base.numel() else 0
        if have > k:
            raise ValueError(f"{st}: the sparser level keeps {int(have)} of {st.m} in some run, level at sparsity "
                             f"{sparsity} keeps only {k}: give levels sparsest first with decreasing sparsity")
        m = st.mask(w, sparsity, imp)
    elif isinstance(st, Pattern):
        m = _nested_pattern(st, w, sparsity, base)
    else:
        scores = st.scores(w, score).clone()
        bg = st.partition(base.float()).sum(1) > 0
        scores[bg] = math.inf
        keep = select_keep(scores, sparsity)
        if bool((bg & ~keep).any()):
            raise ValueError(f"{st}: sparsity {sparsity} keeps fewer groups ({int(keep.sum())}) than the sparser "
                             f"level ({int(bg.sum())}); give levels sparsest first with decreasing sparsity")
        m = st.unpartition(st.valid(w.shape) & keep[:, None], w.shape).bool()
    if bool((base & ~m).any()):
        raise ValueError(f"{st}: cannot nest sparsity {sparsity} around the sparser level's mask "
                         f"(base sparsity {1 - base.float().mean().item():.4f}); is the level denser?")
    return m


def _nested_pattern(st: Pattern, w: Tensor, sparsity: float, base: Tensor) -> Tensor:
    keep = st.keep_for(w.shape, sparsity)
    pats = st.pattern_set(w, keep)                            # (P, T) bool
    g2 = st.partition(w.float()).pow(2)                       # (G, T)
    valid = st.valid(w.shape)
    b = st.partition(base.float()) > 0                        # (G, T) base entries
    if int(b.sum(1).max()) > keep:
        raise ValueError(f"{st}: the sparser level keeps more than {keep} entries in a tile; levels must get denser")
    contains = (b.float() @ pats.float().t()) == b.sum(1, keepdim=True).float()   # (G, P) pattern ⊇ base tile
    energy = (g2 @ pats.float().t()).masked_fill(~contains, -1.0)
    best = torch.argmax(energy, 1)
    ok = contains.any(1)
    km = pats[best] & valid
    # fallback: no superset pattern in the set → base entries + largest remaining entries (set extended)
    if bool((~ok).any()):
        rows = torch.nonzero(~ok).flatten()
        sc = torch.where(b[rows], torch.full_like(g2[rows], math.inf), g2[rows])
        sc = torch.where(valid[rows], sc, torch.full_like(sc, -1.0))
        order = torch.argsort(-sc, 1, stable=True)[:, :keep]
        fb = torch.zeros_like(b[rows]).scatter_(1, order, True) & valid[rows]
        km[rows] = fb
    if st.conn or st.keep is None:
        connectivity_prune(km, g2, valid, sparsity, protected=b.any(1))  # never drop a base tile
    return st.unpartition(km, w.shape).bool()


def level_plan(spec: PruneSpec, names: list[str], sparsity: float) -> dict[str, tuple[Structure, float]]:
    """``{name: (structure, sparsity)}`` at a level's sparsity, overrides scaled as
    :func:`prunekit.pruner.compute_masks` scales them."""
    plan = spec.layer_plan(names)
    if spec.sparsity > 0:
        f = float(sparsity) / float(spec.sparsity)
        return {n: (st, min(sp * f, 0.999999)) for n, (st, sp) in plan.items()}
    return {n: (st, float(sparsity)) for n, (st, _) in plan.items()}


def nested_masks(model: nn.Module, spec: PruneSpec, sparsities: Sequence[float], *,
                 base: MaskSet | None = None, weights: dict[str, Tensor] | None = None) -> NestedMasks:
    """Nested masks at ``sparsities`` (any order; sorted sparsest first) for the targets of ``spec``.

    ``base``: the sparsest level's masks when they come from elsewhere (an algorithm's ``final_masks``);
    then ``sparsities[0]`` (the sparsest) is that level's nominal sparsity and the denser levels nest
    around it.  ``weights``: the weights to score (default: the model's current ones)."""
    levels = sorted_levels(sparsities)
    targets = list(find_targets(model, spec.targets))
    params = {n: p.detach() for n, p in model.named_parameters()}
    if weights:
        params.update({n: t.detach() for n, t in weights.items()})
    out: list[MaskSet] = []
    prev: MaskSet | None = base
    for i, s in enumerate(levels):
        if i == 0 and base is not None:
            out.append(base.copy())
            continue
        plan = level_plan(spec, targets, s)
        ms = MaskSet()
        if spec.scope == "global":
            sts = {str(st) for st, _ in plan.values()}
            st = next(iter(plan.values()))[0]
            if len(sts) != 1 or isinstance(st, (NM, Pattern)):
                raise ValueError("global scope needs one group structure (unstructured/row/column/block) for all targets")
            scores, sizes = [], []
            for n in plan:
                sc = st.scores(params[n], spec.score).clone()
                if prev is not None:
                    sc[st.partition(prev[n].float()).sum(1) > 0] = math.inf
                scores.append(sc)
                sizes.append(st.valid(params[n].shape).sum(1))
            keeps = select_keep_global(scores, sizes, s)
            for n, keep in zip(plan, keeps):
                m = st.unpartition(st.valid(params[n].shape) & keep[:, None], params[n].shape).bool()
                if prev is not None and bool((prev[n] & ~m).any()):
                    raise ValueError(f"global sparsity {s} keeps fewer weights than the sparser level; levels must get denser")
                ms.set(n, m, str(st))
        else:
            for n, (st, sp) in plan.items():
                ms.set(n, nested_mask_for(params[n], st, sp, None if prev is None else prev[n], spec.score), str(st))
        out.append(ms)
        prev = ms
    return NestedMasks(out)


def sorted_levels(sparsities: Sequence[float]) -> list[float]:
    """Level sparsities sparsest first; duplicates and values outside [0, 1) are errors."""
    lv = [float(s) for s in sparsities]
    if not lv:
        raise ValueError("need at least one sparsity level")
    for s in lv:
        if not (0.0 <= s < 1.0) or math.isnan(s):
            raise ValueError(f"level sparsity must be in [0, 1) (fraction of zeros); got {s}")
    if len(set(lv)) != len(lv):
        raise ValueError(f"level sparsities must be distinct; got {lv}")
    return sorted(lv, reverse=True)


@torch.no_grad()
def shared_weights(dense: dict[str, Tensor], nested: NestedMasks, level_weights: Sequence[dict[str, Tensor]] | None = None) -> list[dict[str, Tensor]]:
    """The reference construction: ``W_0 = W·M_0``; ``W_k = W·(M_k \\ M_{k-1}) + W_{k-1}``.

    ``dense`` = ``W`` (name → tensor) for the masked parameters; returns one dict per level."""
    out: list[dict[str, Tensor]] = []
    for k in range(len(nested)):
        add = nested.added(k)
        cur = {}
        for n in nested.names():
            w = dense[n] * add[n].to(dense[n].dtype)
            cur[n] = w if k == 0 else torch.where(add[n], w, out[-1][n])
        out.append(cur)
    return out


# =============================================================================================
# Training
# =============================================================================================
class FreezeShared(Hook):
    """Hook: only the positions in ``trainable`` (name → bool mask) change; every other element of those
    parameters is restored bit for bit after each optimizer step (weight decay and momentum would move
    it), and its gradient is zeroed.  Parameters in ``frozen_params`` get ``requires_grad=False`` while
    the hook is live (pass the hook to :func:`fit`, which builds the optimizer after ``begin``…  so call
    :meth:`freeze` *before* ``fit``; :meth:`release` after)."""

    def __init__(self, model: nn.Module, trainable: dict[str, Tensor], frozen_params: Sequence[str] = ()):
        self.model = model
        params = dict(model.named_parameters())
        self.trainable = {n: trainable[n].bool() for n in trainable}
        self.saved = {n: params[n].detach().clone() for n in trainable}
        self.params = {n: params[n] for n in trainable}
        self.frozen_params = [params[n] for n in frozen_params]
        self._handles: list = []
        self._grad_state: list[bool] = []

    def freeze(self) -> "FreezeShared":
        self._grad_state = [p.requires_grad for p in self.frozen_params]
        for p in self.frozen_params:
            p.requires_grad_(False)
        for n, p in self.params.items():
            mult = self.trainable[n].to(p.dtype)
            self._handles.append(p.register_hook(lambda g, m=mult: g * m))
        return self

    @torch.no_grad()
    def after_step(self, ctx: TrainContext | None = None) -> None:
        for n, p in self.params.items():
            p.copy_(torch.where(self.trainable[n], p, self.saved[n]))

    def release(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p, g in zip(self.frozen_params, self._grad_state):
            p.requires_grad_(g)


class LevelView(nn.Module):
    """``inner`` seen at one level: ``forward`` calls ``inner`` with every masked weight multiplied by the
    current level's mask (:func:`torch.func.functional_call`), so gradients reach only that level's
    weights.  Parameter names get the prefix ``inner.``."""

    def __init__(self, inner: nn.Module, nested: NestedMasks, level: int = -1):
        super().__init__()
        self.inner = inner
        self.nested = nested
        self.level = nested._idx(level)
        self._mult = [{n: m.float() for n, m in lv.items()} for lv in nested.levels]

    def forward(self, *args, **kwargs):
        params = dict(self.inner.named_parameters())
        mult = self._mult[self.level]
        sub = {n: params[n] * mult[n].to(params[n].dtype) for n in mult}
        return torch.func.functional_call(self.inner, sub, args, kwargs, strict=False)


class JointLevels(Hook):
    """Hook for joint training of nested levels on one weight set inside :func:`fit` on a :class:`LevelView`.

    ``schedule``: ``cycle`` (level ``step % K`` for each step), ``sample`` (uniform random level per step),
    ``all`` (the view runs the densest level; the other levels' losses are added by :meth:`extra_loss`, so
    each step sums every level's loss on its own mask).  Evaluation during ``fit`` runs at
    ``eval_level`` (default: the sparsest, the hardest one)."""

    SCHEDULES = ("cycle", "sample", "all")

    def __init__(self, view: LevelView, schedule: str = "cycle", eval_level: int = 0, seed: int = 0):
        if schedule not in self.SCHEDULES:
            raise ValueError(f"joint schedule {schedule!r} is not one of {list(self.SCHEDULES)}")
        self.view, self.schedule, self.eval_level = view, schedule, view.nested._idx(eval_level)
        self.K = len(view.nested)
        self.rng = random.Random(seed)
        self.counts = [0] * self.K

    def _pick(self, step: int) -> int:
        if self.schedule == "cycle":
            return step % self.K
        if self.schedule == "sample":
            return self.rng.randrange(self.K)
        return self.K - 1

    def begin(self, ctx):
        self.view.level = self._pick(0)

    def extra_loss(self, ctx, batch, outputs):
        self.counts[self.view.level] += 1
        if self.schedule != "all":
            return None
        total = None
        for k in range(self.K - 1):
            self.view.level = k
            loss, _ = ctx.task.step(ctx.model, batch)
            total = loss if total is None else total + loss
            self.counts[k] += 1
        self.view.level = self.K - 1
        return total

    def after_step(self, ctx):
        self.view.level = self._pick(ctx.step)

    def epoch_end(self, ctx):
        self.view.level = self.eval_level   # fit evaluates after the epoch-end hooks


def _evaluate_levels(model, task, loader, nested: NestedMasks, dense_values: dict[str, Tensor]) -> list[dict]:
    """Evaluate each level by loading it in place (weights = dense_values · M_k)."""
    swm = SharedWeightsModel(model, nested, dense_values, level=len(nested) - 1)
    out = []
    for k in range(len(nested)):
        swm.switch(k)
        out.append(task.evaluate(model, loader))
    swm.switch(len(nested) - 1)
    return out


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
        from .algorithms import get_algorithm_class  # noqa: PLC0415
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


def _spec_at(spec: PruneSpec, sparsity: float) -> PruneSpec:
    """``spec`` with its sparsity (and overrides, proportionally) set to ``sparsity``."""
    f = float(sparsity) / float(spec.sparsity) if spec.sparsity > 0 else None
    ov = {}
    for pat, o in spec.overrides.items():
        s = o.get("sparsity") if isinstance(o, dict) else o
        if s is not None and f is not None:
            s = min(float(s) * f, 0.999999)
        ov[pat] = ({**o, "sparsity": s} if "sparsity" in o else dict(o)) if isinstance(o, dict) else s
    return PruneSpec(spec.structure, float(sparsity), spec.score, spec.scope, spec.targets, ov)


# =============================================================================================
# One artifact
# =============================================================================================
def _pack_levels(m: Tensor, bits: int) -> Tensor:
    """uint8 level map → bit-packed uint8 (``bits`` per element, LSB first)."""
    v = m.reshape(-1).numpy().astype(np.uint8)[:, None]
    planes = (v >> np.arange(bits, dtype=np.uint8)) & 1
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def _unpack_levels(packed: Tensor, bits: int, shape) -> Tensor:
    n = math.prod(shape)
    planes = np.unpackbits(packed.numpy(), count=n * bits, bitorder="little").reshape(n, bits)
    v = (planes.astype(np.uint8) << np.arange(bits, dtype=np.uint8)).sum(1, dtype=np.uint8)
    return torch.from_numpy(v).reshape(tuple(shape))


def save_shared(path: str | os.PathLike, model: nn.Module, nested: NestedMasks, *,
                levels_info: Sequence[dict] | None = None, extra: dict | None = None) -> dict:
    """Write the one-file artifact: the model's state dict (it must hold the **densest** level), each masked
    parameter's nested masks as one bit-packed level map (``ceil(log2(K+1))`` bits per weight, under
    ``"__levels__.<name>"``), and the JSON manifest in the safetensors header (key ``prunekit``).
    Returns the manifest."""
    path = Path(path)
    K = len(nested)
    bits = max(1, int(K).bit_length())
    tensors, aliases = state_dict_for_save(model)
    params = dict(model.named_parameters())
    for n in nested.names():
        if n not in tensors:
            raise ValueError(f"masked parameter {n!r} is not in the model's state dict")
        outside = params[n].detach() * (~nested.densest[n]).to(params[n].dtype)
        if bool(outside.ne(0).any()):
            raise ValueError(f"{n}: the model has nonzero weights outside the densest level's mask; "
                             "load the densest level before saving")
    packed = {f"__levels__.{n}": _pack_levels(nested.level_map(n), bits) for n in nested.names()}
    manifest = {
        "format": FORMAT,
        "model_class": type(model).__name__,
        "num_levels": K,
        "level_bits": bits,
        "levels": list(levels_info) if levels_info else [{"level": k} for k in range(K)],
        "measured_sparsity": nested.sparsities(),
        "masks": {n: {"shape": list(m.shape), "structure": nested.densest.structures.get(n)}
                  for n, m in nested.densest.items()},
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in tensors.items()},
        "aliases": aliases,
        "extra": extra or {},
    }
    all_t = {**tensors, **packed}
    _atomic_replace(path, lambda tmp: save_file(all_t, tmp, metadata={"format": FORMAT, "prunekit": json.dumps(manifest)}))
    return manifest


def read_shared(path: str | os.PathLike) -> tuple[dict[str, Tensor], NestedMasks, dict]:
    """Read the artifact: ``(densest state dict, nested masks, manifest)``."""
    p = Path(path)
    if not p.is_file():
        raise SharedFormatError(f"no shared-weights artifact at {p}")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or "prunekit" not in meta:
                raise SharedFormatError(f"{p} is not a prunekit shared-weights artifact "
                                        f"(format {meta.get('format')!r}, expected {FORMAT!r})")
            manifest = json.loads(meta["prunekit"])
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise SharedFormatError(f"cannot read shared-weights artifact {p}: {e}") from None
    K, bits = int(manifest["num_levels"]), int(manifest["level_bits"])
    maps, state = {}, {}
    for k, v in raw.items():
        if k.startswith("__levels__."):
            continue
        state[k] = v
    for k, src in manifest.get("aliases", {}).items():
        state[k] = state[src]
    for n, info in manifest["masks"].items():
        key = f"__levels__.{n}"
        if key not in raw:
            raise SharedFormatError(f"{p} lacks the level map of {n!r} listed in its manifest")
        maps[n] = _unpack_levels(raw[key], bits, info["shape"])
    nested = NestedMasks.from_level_maps(maps, K, {n: i.get("structure") for n, i in manifest["masks"].items()})
    return state, nested, manifest


def load_level(path: str | os.PathLike, level: int, model: nn.Module) -> "SharedWeightsModel":
    """Load level ``level`` (0 = sparsest) of the artifact at ``path`` into ``model`` in place; returns the
    :class:`SharedWeightsModel` that can :meth:`~SharedWeightsModel.switch` it."""
    from .checkpoint import load_into  # noqa: PLC0415
    state, nested, manifest = read_shared(path)
    try:
        load_into(model, state, source=str(path))
    except CheckpointError as e:
        raise SharedFormatError(str(e)) from None
    params = dict(model.named_parameters())
    dense_values = {n: params[n].detach().clone() for n in nested.names()}
    swm = SharedWeightsModel(model, nested, dense_values, level=len(nested) - 1, manifest=manifest)
    swm.switch(level)
    swm.bytes_written = 0
    return swm


@dataclass
class SwitchRecord:
    src: int
    dst: int
    elements_written: int
    bytes_written: int
    seconds: float


class SharedWeightsModel:
    """A model plus its nested masks and the densest level's values, switchable between levels in place.

    :meth:`switch` writes only the elements that differ between the current and the target level (the
    added values when going denser, zeros when going sparser), through the parameters' storage (their
    identity is unchanged, so an optimizer or compiled graph stays valid), and counts the bytes written."""

    def __init__(self, model: nn.Module, nested: NestedMasks, dense_values: dict[str, Tensor], level: int,
                 manifest: dict | None = None):
        self.model, self.nested, self.manifest = model, nested, manifest or {}
        nested.densest.check_model(model)
        self.values = {n: dense_values[n].detach() for n in nested.names()}
        self.level = nested._idx(level)
        self.bytes_written = 0
        self.log: list[SwitchRecord] = []
        self._params = dict(model.named_parameters())

    @torch.no_grad()
    def switch(self, level: int) -> SwitchRecord:
        dst = self.nested._idx(level)
        src = self.level
        t0 = time.perf_counter()
        n_el = n_bytes = 0
        if dst != src:
            lo, hi = min(src, dst), max(src, dst)
            for n in self.nested.names():
                diff = (self.nested[hi][n] & ~self.nested[lo][n]).reshape(-1)
                idx = torch.nonzero(diff).flatten()
                if idx.numel() == 0:
                    continue
                flat = self._params[n].data.view(-1)
                if dst > src:
                    flat[idx] = self.values[n].reshape(-1)[idx]
                else:
                    flat[idx] = 0
                n_el += idx.numel()
                n_bytes += idx.numel() * flat.element_size()
        rec = SwitchRecord(src, dst, n_el, n_bytes, time.perf_counter() - t0)
        self.level = dst
        self.bytes_written += n_bytes
        self.log.append(rec)
        return rec


# =============================================================================================
# Switching cost
# =============================================================================================
def patch_bytes(changed: Tensor, n_values: int, dtype: torch.dtype,
                encodings: Sequence[str] = SWITCH_ENCODINGS) -> dict:
    """Bytes of a patch writing ``n_values`` values at the ``changed`` positions of one tensor: the index
    of the changed positions in the cheapest of ``encodings`` (:mod:`prunekit.storage`; index cost =
    the encoding's ``overhead_bytes``, i.e. everything but the true values) + ``n_values × itemsize``,
    or a dense rewrite of the tensor when that is smaller.  Returns ``{bytes, encoding, index_bytes,
    value_bytes, dense_bytes}``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    dense = changed.numel() * itemsize
    vb = int(n_values) * itemsize
    if not bool(changed.any()):
        return {"bytes": 0, "encoding": "none", "index_bytes": 0, "value_bytes": 0, "dense_bytes": dense}
    probe = torch.zeros(changed.shape, dtype=dtype)
    probe[changed] = 1
    best = None
    for e in encodings:
        if not storage.is_applicable(probe, e):
            continue
        enc = storage.encode(probe, e)
        cand = (enc.overhead_bytes + vb, e, enc.overhead_bytes)
        if best is None or cand[0] < best[0]:
            best = cand
    if best is None or best[0] >= dense:
        return {"bytes": dense, "encoding": "dense", "index_bytes": 0, "value_bytes": dense, "dense_bytes": dense}
    return {"bytes": best[0], "encoding": best[1], "index_bytes": best[2], "value_bytes": vb, "dense_bytes": dense}


def switch_cost(nested: NestedMasks, src: int, dst: int, dtypes: dict[str, torch.dtype] | None = None, *,
                other_bytes: int = 0, encodings: Sequence[str] = SWITCH_ENCODINGS) -> dict:
    """Bytes a device writes to go from level ``src`` to ``dst``, per masked tensor the cheapest of (index of
    the changed positions + the new values) and a dense rewrite of that tensor.  Going denser writes the
    added values; going sparser writes only the index (the device writes the zeros itself).

    ``full_rewrite_bytes`` = every masked tensor dense + ``other_bytes`` (the unpruned parameters, which
    a full rewrite also writes but a switch never changes: they are shared)."""
    s, d = nested._idx(src), nested._idx(dst)
    lo, hi = min(s, d), max(s, d)
    total = index = values = dense = 0
    per: dict[str, dict] = {}
    changed_el = 0
    for n in nested.names():
        dt = (dtypes or {}).get(n, torch.float32)
        ch = nested[hi][n] & ~nested[lo][n]
        nv = int(ch.sum()) if d > s else 0
        pb = patch_bytes(ch, nv, dt, encodings)
        per[n] = pb
        total += pb["bytes"]
        index += pb["index_bytes"]
        values += pb["value_bytes"]
        dense += pb["dense_bytes"]
        changed_el += int(ch.sum())
    return {"from": s, "to": d, "switch_bytes": total, "index_bytes": index, "value_bytes": values,
            "changed_elements": changed_el, "full_rewrite_bytes": dense + int(other_bytes),
            "ratio_vs_full": total / max(dense + int(other_bytes), 1),
            "encodings": {n: p["encoding"] for n, p in per.items()}}


def switch_table(nested: NestedMasks, dtypes: dict[str, torch.dtype] | None = None, *, other_bytes: int = 0) -> list[dict]:
    """:func:`switch_cost` for every ordered pair of distinct levels."""
    K = len(nested)
    return [switch_cost(nested, a, b, dtypes, other_bytes=other_bytes) for a in range(K) for b in range(K) if a != b]


def breakeven_report(model: nn.Module, nested: NestedMasks) -> dict:
    """Where indices stop paying, per masked tensor and overall (from :func:`prunekit.storage.breakeven_sparsity`):

    * ``model_breakeven_sparsity`` — a level's tensor stored sparsely (cheapest of bitmask / CSR) is
      smaller than dense only above this sparsity; below it the index costs more than the zeros save;
    * ``switch_max_changed_fraction`` — a switch patch (index + values of the changed positions) beats
      rewriting the tensor only while fewer than this fraction of its elements change (a patch is a
      sparse tensor whose sparsity is 1 − changed fraction, so the same breakeven applies)."""
    params = dict(model.named_parameters())
    per = {}
    n_total = 0
    acc = 0.0
    for n in nested.names():
        p = params[n]
        bm = storage.breakeven_sparsity(p.numel(), p.dtype, "bitmask")
        csr = storage.breakeven_sparsity(tuple(p.shape), p.dtype, "csr")
        best = min(bm, csr)
        per[n] = {"bitmask": bm, "csr": csr, "breakeven_sparsity": best,
                  "level_sparsity": [lv.sparsity(n) for lv in nested.levels]}
        n_total += p.numel()
        acc += best * p.numel()
    overall = acc / max(n_total, 1)
    return {"model_breakeven_sparsity": overall, "switch_max_changed_fraction": 1.0 - overall, "per_tensor": per,
            "note": "below the breakeven sparsity a sparse encoding (indices + nonzero values) is larger than "
                    "the dense tensor; a switch patch changing more than 1 - breakeven of a tensor is written "
                    "as a dense rewrite of that tensor instead"}


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
        from .config import RecipeError  # noqa: PLC0415
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
    from .config import from_dict  # noqa: PLC0415
    raw = dict(recipe.extra.get("shared") or {})
    if levels is not None:
        raw["levels"] = list(levels)
    if mode is not None:
        raw["mode"] = mode
    if schedule is not None:
        raw["schedule"] = schedule
    return from_dict(SharedConfig, raw, "extra.shared")


def _phase_over(recipe, base: str, over: dict, key: str):
    import dataclasses as _dc  # noqa: PLC0415
    from .config import TrainConfig, from_dict  # noqa: PLC0415
    cfg = _dc.asdict(recipe.phase(base))
    from .config import RecipeError  # noqa: PLC0415
    bad = set(over) - set(cfg)
    if bad:
        raise RecipeError(f"unknown key(s) {sorted(f'{key}.{k}' for k in bad)}; valid: {sorted(cfg)}")
    cfg.update(over)
    return from_dict(TrainConfig, cfg, key)


@torch.no_grad()
def forward_latency_ms(model: nn.Module, example, batch: int = 1, repeats: int = 20) -> float:
    """Median wall time (ms) of one forward pass on ``example`` repeated to ``batch`` rows."""
    if isinstance(example, dict):
        inp = {k: v.repeat(batch, *([1] * (v.dim() - 1))) if isinstance(v, Tensor) else v for k, v in example.items()}
        call = lambda: model(**inp)  # noqa: E731
    else:
        inp = example.repeat(batch, *([1] * (example.dim() - 1)))
        call = lambda: model(inp)  # noqa: E731
    was = model.training
    model.eval()
    for _ in range(3):
        call()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        ts.append(time.perf_counter() - t0)
    model.train(was)
    return 1000.0 * float(np.median(ts))


def run_shared(recipe, out_dir: str | os.PathLike, *, levels: Sequence[float] | None = None, mode: str | None = None,
               schedule: str | None = None, log: Callable[[str], None] = print) -> dict:
    """dense (train or ``model.checkpoint``) → nested levels (sequential or joint) → per-level evaluation,
    switch-cost table, breakeven → ``out_dir/shared.safetensors`` (the one artifact), ``results.json``,
    ``recipe.yaml``.  Returns the results dict."""
    import yaml  # noqa: PLC0415
    from datetime import datetime, timezone  # noqa: PLC0415
    from .algorithms import get_algorithm_class  # noqa: PLC0415
    from .checkpoint import atomic_write_json, atomic_write_text, load_checkpoint, save_checkpoint  # noqa: PLC0415
    from .config import from_dict, to_dict  # noqa: PLC0415
    from .runner import _machine, build_workload, validate_recipe  # noqa: PLC0415
    from .train import seed_everything  # noqa: PLC0415

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
            import copy  # noqa: PLC0415
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
