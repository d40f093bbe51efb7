"""Training hooks for shared-weight levels: freeze the sparser levels' weights, train levels jointly."""
from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.algorithms.hooks import Hook, TrainContext
from prunekit.core.errors import RecipeError
from prunekit.core.nested import NestedMasks


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
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._grad_state: list[bool] = []

    def freeze(self) -> FreezeShared:
        self._grad_state = [p.requires_grad for p in self.frozen_params]
        for p in self.frozen_params:
            p.requires_grad_(False)
        for n, p in self.params.items():
            mult = self.trainable[n].to(p.dtype)
            self._handles.append(p.register_hook(lambda g, m=mult: g * m))  # type: ignore[no-untyped-call]
        return self

    @torch.no_grad()
    def after_step(self, ctx: TrainContext | None = None) -> None:
        for n, p in self.params.items():
            p.copy_(torch.where(self.trainable[n], p, self.saved[n]))

    def state_dict(self) -> dict[str, Any]:
        """The values every frozen element is held at (a resume restores them after ``begin``)."""
        return {"saved": {n: v.clone() for n, v in self.saved.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for n, v in state["saved"].items():
            self.saved[n].copy_(v)

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

    def forward(self, *args: Any, **kwargs: Any) -> Any:
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
            raise RecipeError(f"joint schedule {schedule!r} is not one of {list(self.SCHEDULES)}")
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

    def begin(self, ctx: TrainContext) -> None:
        self.view.level = self._pick(0)

    def extra_loss(self, ctx: TrainContext, batch: Any, outputs: Any) -> Tensor | None:
        self.counts[self.view.level] += 1
        if self.schedule != "all":
            return None
        total: Tensor | None = None
        for k in range(self.K - 1):
            self.view.level = k
            loss, _ = ctx.task.step(ctx.model, batch)
            total = loss if total is None else total + loss
            self.counts[k] += 1
        self.view.level = self.K - 1
        return total

    def after_step(self, ctx: TrainContext) -> None:
        self.view.level = self._pick(ctx.step)

    def epoch_end(self, ctx: TrainContext) -> None:
        self.view.level = self.eval_level   # fit evaluates after the epoch-end hooks

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {"level": self.view.level, "counts": list(self.counts), "rng": torch.tensor(internal, dtype=torch.int64),
                "rng_version": version, "rng_gauss": gauss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.view.level = int(state["level"])
        self.counts = [int(c) for c in state["counts"]]
        self.rng.setstate((int(state["rng_version"]), tuple(int(x) for x in state["rng"].tolist()),
                           state["rng_gauss"]))
