"""Nested masks for shared-weight multi-sparsity models: K levels, sparsest first, each a superset of the previous."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from prunekit.core.errors import RecipeError
from prunekit.core.masks import MaskSet
from prunekit.core.plan import PruneSpec, global_masks
from prunekit.core.structures import Structure, parse_structure
from prunekit.core.targets import find_targets


# =============================================================================================
# Nested masks
# =============================================================================================
class NestedMasks:
    """K nested :class:`MaskSet` levels, **sparsest first**: ``levels[k] ⊆ levels[k+1]`` for every mask.

    Construction checks that every level has the same names and shapes and that the invariant holds,
    raising ``ValueError`` naming the first offending parameter and level otherwise."""

    def __init__(self, levels: Sequence[MaskSet]):
        if len(levels) < 1:
            raise RecipeError("NestedMasks needs at least one level")
        self.levels: list[MaskSet] = [lv.copy() for lv in levels]
        self.check()

    # -- invariant ----------------------------------------------------------------------------
    def check(self) -> None:
        names = self.levels[0].names()
        for k, lv in enumerate(self.levels[1:], 1):
            if lv.names() != names and set(lv.names()) != set(names):
                raise RecipeError(f"level {k} masks {sorted(set(lv.names()) ^ set(names))[:5]} differ from level 0's names")
            for n in names:
                a, b = self.levels[k - 1][n], lv[n]
                if a.shape != b.shape:
                    raise RecipeError(f"{n}: level {k - 1} mask shape {tuple(a.shape)} != level {k} {tuple(b.shape)}")
                bad = int((a & ~b).sum())
                if bad:
                    raise RecipeError(f"masks are not nested: {n} keeps {bad} weights at level {k - 1} (sparser) "
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
    def from_level_maps(cls, maps: dict[str, Tensor], K: int, structures: dict[str, str] | None = None) -> NestedMasks:
        return cls([MaskSet({n: m <= k for n, m in maps.items()}, structures) for k in range(K)])

    def state_dict(self) -> dict[str, Any]:
        return {"levels": [lv.state_dict() for lv in self.levels]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        lvs = []
        for s in state["levels"]:
            ms = MaskSet()
            ms.load_state_dict(s)
            lvs.append(ms)
        self.levels = lvs
        self.check()


# -- nested selection: the structure's own selection with a must-keep base ------------------------------
def nested_mask_for(w: Tensor, structure: str | Structure, sparsity: float, base: Tensor | None = None,
                    score: Any = "l2") -> Tensor:
    """Keep-mask of ``w`` at ``sparsity`` that contains ``base`` (the sparser level's mask): the
    structure's selection with ``base`` as must-keep entries (:meth:`Structure.mask`)."""
    return parse_structure(structure).mask(w.detach(), sparsity, score, base=base)


def level_plan(spec: PruneSpec, names: list[str], sparsity: float) -> dict[str, tuple[Structure, float]]:
    """``{name: (structure, sparsity)}`` at a level's sparsity (:meth:`PruneSpec.layer_plan`)."""
    return spec.layer_plan(names, sparsity)


def nested_masks(model: nn.Module, spec: PruneSpec, sparsities: Sequence[float], *,
                 base: MaskSet | None = None, weights: dict[str, Tensor] | None = None) -> NestedMasks:
    """Nested masks at ``sparsities`` (any order; sorted sparsest first) for the targets of ``spec``.

    ``base``: the sparsest level's masks when they come from elsewhere (an algorithm's ``final_masks``);
    then ``sparsities[0]`` (the sparsest) is that level's nominal sparsity and the denser levels nest
    around it.  ``weights``: the weights to score (default: the model's current ones)."""
    levels = sorted_levels(sparsities)
    targets = find_targets(model, spec.targets)
    params = {n: p.detach() for n, p in model.named_parameters()}
    if weights:
        params.update({n: t.detach() for n, t in weights.items()})
    out: list[MaskSet] = []
    prev: MaskSet | None = base
    for i, s in enumerate(levels):
        if i == 0 and base is not None:
            out.append(base.copy())
            continue
        plan = spec.layer_plan(targets, s)
        if spec.scope == "global":
            ms = global_masks(plan, params, s, spec.score, base=prev)
        else:
            ms = MaskSet()
            for n, (st, sp) in plan.items():
                ms.set(n, nested_mask_for(params[n], st, sp, None if prev is None else prev[n], spec.score), str(st))
        out.append(ms)
        prev = ms
    return NestedMasks(out)


def sorted_levels(sparsities: Sequence[float]) -> list[float]:
    """Level sparsities sparsest first; duplicates and values outside [0, 1) are errors."""
    lv = [float(s) for s in sparsities]
    if not lv:
        raise RecipeError("need at least one sparsity level")
    for s in lv:
        if not (0.0 <= s < 1.0) or math.isnan(s):
            raise RecipeError(f"level sparsity must be in [0, 1) (fraction of zeros); got {s}")
    if len(set(lv)) != len(lv):
        raise RecipeError(f"level sparsities must be distinct; got {lv}")
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


def _spec_at(spec: PruneSpec, sparsity: float) -> PruneSpec:
    """``spec`` with its sparsity (and overrides, proportionally) set to ``sparsity`` (:meth:`PruneSpec.at`)."""
    return spec.at(sparsity)
