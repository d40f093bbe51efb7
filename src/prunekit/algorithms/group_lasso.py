"""Reweighted group lasso, then hard-prune by group norm.

Li et al., "Efficient Transformer-based Large Scale Language Representations using Hardware-friendly
Block Structured Pruning", Findings of EMNLP 2020 (block-based reweighted group lasso), with the
reweighting of Candès, Wakin & Boyd, "Enhancing Sparsity by Reweighted ℓ1 Minimization" (2008).

During the search phase the loss gets the penalty::

    λ Σ_layers Σ_g α_g ‖W_g‖₂                   (groups g = the structure's partition of each layer)

and every ``reweight_every`` optimizer steps (0 = at each epoch end) the weights are reset to::

    α_g ← 1 / (‖W_g‖₂ + ε)

(α_g = 1 at the start unless ``reweight_at_start``), so groups that are already small are pushed
harder towards zero.  Groups come from :meth:`Structure.partition`, for every structure: rows,
columns, R×C blocks, the M-runs of N:M, the tiles (kernels) of pattern; ``unstructured`` groups are
single weights, so the penalty is the reweighted ℓ1 ``λ Σ α_i |w_i|``.  ‖·‖₂ is evaluated as ``sqrt(Σ w² + δ²)`` with a tiny ``δ``
(``smooth``) so the gradient is finite at 0 (``λ α_g W_g / ‖W_g‖``).  At the end the weights are
hard-pruned to the target by group L2 norm (:func:`prunekit.core.plan.compute_masks`) and retrained.

Group structures (``channels``, ``heads``, ``neurons``, ``heads+neurons``, …): the penalty groups are the
coupled *units*: ``‖W_u‖₂`` is the norm over all of unit ``u``'s coupled weight slices (every tensor
whose rows/columns it owns), so a head's query/key/value rows and output columns shrink together.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.algorithms.base import Algorithm, register
from prunekit.algorithms.hooks import TrainContext
from prunekit.core.errors import RecipeError
from prunekit.core.groups import CoupledGroup
from prunekit.core.masks import MaskSet
from prunekit.core.plan import PruneSpec, compute_masks, target_plan
from prunekit.core.structures import Structure
from prunekit.core.targets import find_targets

__all__ = ["GroupLasso", "group_lasso_penalty", "reweight"]


def _norms(st: Structure, w: Tensor, smooth: float) -> Tensor:
    """``sqrt(‖W_g‖² + δ²)`` over the structure's partition (``δ = 0``: :meth:`Structure.group_norms`)."""
    return st.group_norms(w, smooth)


def group_lasso_penalty(st: Structure, w: Tensor, alpha: Tensor, lam: float, smooth: float = 0.0) -> Tensor:
    """``λ Σ_g α_g ‖W_g‖₂`` for one weight (``alpha`` has one entry per group)."""
    return lam * (alpha * _norms(st, w, smooth)).sum()


def unit_norms(g: CoupledGroup, params: Mapping[str, Tensor], smooth: float = 0.0) -> Tensor:
    """``(count,)`` differentiable ``sqrt(Σ w² + δ²)`` of every unit of ``g`` over its slices of ``params``."""
    tot: Tensor | None = None
    for s in g.slices:
        if s.tensor not in params:
            continue
        start, stop = s.span(g.count)
        part = params[s.tensor].narrow(s.dim, start, stop - start).movedim(s.dim, 0).reshape(g.count, -1)
        sq = part.pow(2).sum(1)
        tot = sq if tot is None else tot + sq
    assert tot is not None, f"coupled group {g.name} has no slice among the parameters"
    return (tot + smooth * smooth).clamp_min(0).sqrt()


def reweight(st: Structure, w: Tensor, eps: float) -> Tensor:
    """``α_g = 1 / (‖W_g‖₂ + ε)`` (Candès et al. 2008)."""
    return 1.0 / (st.group_norms(w.detach()) + eps)


@register
class GroupLasso(Algorithm["GroupLasso.Params"]):
    """Reweighted group lasso (Li et al. 2020); see the module docstring."""

    name = "group_lasso"
    has_search = True

    @dataclass
    class Params:
        lam: float = 1e-5               # λ
        eps: float = 1e-3               # ε in α_g = 1/(‖W_g‖ + ε)
        reweight_every: int = 0         # optimizer steps between reweightings; 0 = each epoch end
        reweight_at_start: bool = True  # α from the dense weights (else α = 1 until the first reset)
        smooth: float = 1e-8            # δ in sqrt(Σw² + δ²)

        def __post_init__(self) -> None:
            if not self.lam >= 0:
                raise RecipeError(f"algorithm.params.lam must be >= 0, got {self.lam}")
            if not self.eps > 0:
                raise RecipeError(f"algorithm.params.eps must be > 0, got {self.eps}")
            if self.reweight_every < 0:
                raise RecipeError(f"algorithm.params.reweight_every must be >= 0, got {self.reweight_every}")
            if self.smooth < 0:
                raise RecipeError(f"algorithm.params.smooth must be >= 0, got {self.smooth}")

    def __init__(self, params: GroupLasso.Params, spec: PruneSpec):
        super().__init__(params, spec)
        self.alpha: dict[str, Tensor] = {}
        self.reweights = 0
        self._params: dict[str, nn.Parameter] = {}
        self._structs: dict[str, Structure] = {}
        self._groups: list[CoupledGroup] = []

    def begin(self, ctx: TrainContext) -> None:
        plan = target_plan(ctx.model, self.spec)
        params = dict(ctx.model.named_parameters())
        self._params = {n: params[n] for n in plan}
        if self.spec.st.coupled:
            self._groups = [g for g, _, _ in self.spec.group_plan(find_targets(ctx.model, self.spec.targets))[0]]
            if not self.alpha:
                if self.params.reweight_at_start:
                    self._reweight()
                else:
                    self.alpha = {g.name: torch.ones(g.count, device=next(iter(self._params.values())).device)
                                  for g in self._groups}
            return
        self._structs = {n: st for n, (st, _) in plan.items()}
        if not self.alpha:
            if self.params.reweight_at_start:
                self._reweight()
            else:
                self.alpha = {n: torch.ones(self._structs[n].num_groups(p.shape), device=p.device) for n, p in self._params.items()}

    @torch.no_grad()
    def _reweight(self) -> None:
        if self._groups:
            self.alpha = {g.name: 1.0 / (unit_norms(g, self._params) + self.params.eps) for g in self._groups}
            self.reweights += 1
            return
        self.alpha = {n: reweight(self._structs[n], p, self.params.eps) for n, p in self._params.items()}
        self.reweights += 1

    def penalty(self) -> Tensor | None:
        """None when there is no target."""
        tot: Tensor | None = None
        if self._groups:
            for g in self._groups:
                un = unit_norms(g, self._params, self.params.smooth)
                t = self.params.lam * (self.alpha[g.name].to(device=un.device, dtype=un.dtype) * un).sum()
                tot = t if tot is None else tot + t
            return tot
        for n, p in self._params.items():
            t = group_lasso_penalty(self._structs[n], p, self.alpha[n].to(device=p.device, dtype=p.dtype), self.params.lam, self.params.smooth)
            tot = t if tot is None else tot + t
        return tot

    def extra_loss(self, ctx: TrainContext, batch: Any, outputs: Any) -> Tensor | None:
        return self.penalty() if self.params.lam > 0 else None

    def after_step(self, ctx: TrainContext) -> None:
        if self.params.reweight_every and ctx.step % self.params.reweight_every == 0:
            self._reweight()

    def epoch_end(self, ctx: TrainContext) -> None:
        if not self.params.reweight_every:
            self._reweight()

    def final_masks(self, model: nn.Module) -> MaskSet:
        params = dict(model.named_parameters())
        names = target_plan(model, self.spec)
        return compute_masks(model, self.spec, importance={n: params[n].detach() for n in names})

    def state_dict(self) -> dict[str, Any]:
        return {"reweights": self.reweights, "alpha": {n: a.clone() for n, a in self.alpha.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reweights = int(state["reweights"])
        self.alpha = {n: a.clone() for n, a in state["alpha"].items()}
