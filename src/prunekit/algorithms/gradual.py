"""Gradual magnitude pruning with the cubic schedule of Zhu & Gupta (ICLR-W 2018).

During the search phase the sparsity follows :func:`prunekit.core.schedules.cubic_sparsity` from
``initial_sparsity`` to the recipe's target, pruning every ``frequency`` steps between ``begin`` and
``end`` (fractions of the phase's steps).  Training in between is hard-pruned; masks only shrink.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from prunekit.algorithms.base import Algorithm, full_masks, register
from prunekit.algorithms.hooks import TrainContext
from prunekit.core.errors import RecipeError
from prunekit.core.masks import MaskSet
from prunekit.core.plan import PruneSpec, compute_masks
from prunekit.core.schedules import cubic_sparsity


@register
class Gradual(Algorithm["Gradual.Params"]):
    name = "gradual"
    has_search = True

    @dataclass
    class Params:
        initial_sparsity: float = 0.0
        begin: float = 0.0      # fraction of the search phase's steps
        end: float = 0.75
        frequency: int = 0      # steps between pruning steps; 0 = about 10 steps over the ramp

        def __post_init__(self) -> None:
            if not (0 <= self.initial_sparsity < 1):
                raise RecipeError(f"initial_sparsity must be in [0, 1), got {self.initial_sparsity}")
            if not (0 <= self.begin <= self.end <= 1):
                raise RecipeError(f"need 0 <= begin <= end <= 1, got begin={self.begin} end={self.end}")
            if self.frequency < 0:
                raise RecipeError("frequency must be >= 0")

    def __init__(self, params: Gradual.Params, spec: PruneSpec):
        super().__init__(params, spec)
        self.current = 0.0
        self.masks: MaskSet | None = None

    def masks_during_search(self, model: nn.Module) -> MaskSet:
        self.masks = full_masks(model, self.spec)
        return self.masks

    def _bounds(self, total: int) -> tuple[int, int, int]:
        b, e = int(self.params.begin * total), max(int(self.params.end * total), 1)
        f = self.params.frequency or max(1, (e - b) // 10)
        return b, e, f

    def begin(self, ctx: TrainContext) -> None:
        self._prune_to(ctx, cubic_sparsity(0, self.spec.sparsity, self.params.initial_sparsity, *self._bounds(ctx.total_steps)))

    def after_step(self, ctx: TrainContext) -> None:
        s = cubic_sparsity(ctx.step, self.spec.sparsity, self.params.initial_sparsity, *self._bounds(ctx.total_steps))
        if s > self.current + 1e-12:
            self._prune_to(ctx, s)

    def _prune_to(self, ctx: TrainContext, s: float) -> None:
        if s <= 0:
            return
        new = compute_masks(ctx.model, self.spec, sparsity=s)
        assert ctx.masks is not None, "gradual prunes the masks from masks_during_search"
        for n, m in new.items():
            ctx.masks.update(n, m, new.structures.get(n))
        if ctx.hard_prune is not None:
            ctx.hard_prune.refresh()
        self.current = s

    def final_masks(self, model: nn.Module) -> MaskSet:
        final = compute_masks(model, self.spec)
        if self.masks is not None:
            for n, m in final.items():
                self.masks.update(n, m, final.structures.get(n))
            return self.masks.copy()
        return final

    def state_dict(self) -> dict[str, Any]:
        return {"current": self.current}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.current = float(state["current"])
