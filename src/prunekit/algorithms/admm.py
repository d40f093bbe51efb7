"""ADMM weight pruning and its progressive variant.

**ADMM** — Zhang et al., "A Systematic DNN Weight Pruning Framework using Alternating Direction Method
of Multipliers", ECCV 2018.  Pruning is the constrained problem ``min f(W)  s.t.  W_i ∈ S_i`` (S_i = the
weights of layer i that have the layer's structure at its sparsity).  With a copy ``Z_i = W_i`` and the
scaled dual ``U_i`` the augmented Lagrangian splits into two sub-problems that alternate:

    W-step (SGD, every training step):  min_W  f(W) + Σ_i ρ/2 ‖W_i − Z_i + U_i‖²_F      (paper eq. 6)
    Z-step (every ``update_every`` steps, or at each epoch end):
                                         Z_i ← Π_{S_i}(W_i + U_i)                         (eq. 7-8)
    dual:                                U_i ← U_i + W_i − Z_i                            (eq. 5)
    penalty:                             ρ ← min(ρ · rho_growth, rho_max)

**Joint pruning and quantization** (ADMM-NN, Ren et al., ASPLOS 2019): with a quantization spec
(:attr:`_Splitting.quant`, recipe ``quant:``) the Z-step projects onto "pruned *and* quantized": the
pruning projection above, then each kept weight onto its layer's grid
(:class:`prunekit.core.quant.ConstraintSet`; kept weights the grid sends to 0 are pruned in Z).  A
progressive bits schedule (``quant.schedule``, e.g. 8 → 4 → 3 → 2 bits) cuts the phase into equal stages
by optimizer step; the duals ``U`` are carried over from one stage to the next.

``Π_S`` is the Euclidean projection onto the structure's constraint set: keep the groups of largest
L2 norm (unstructured: the largest |w|; N:M: the N largest of every M; pattern: the pattern of largest
energy per kernel, plus connectivity pruning).  Per layer it is :meth:`Structure.project` of ``W + U``
at the layer's planned sparsity (:func:`project_weights`; per-layer overrides scale as everywhere);
under the global scope the one global ranking (:func:`prunekit.core.plan.global_masks`) with ``W + U``
as the importance.  When ρ changes, ``U`` (= Λ/ρ) is rescaled by ``ρ_old/ρ_new`` so the unscaled
multiplier Λ is unchanged (Boyd et al. 2011, §3.4.1; ``rescale_dual: false`` keeps U as is, as the
paper's code does).  The search phase ends with ``final_masks`` = Π_S(W) (or Π_S(W + U) with
``final_with_u``); the runner then hard-prunes and retrains.

**Progressive ADMM** — Ye et al., "Progressive Weight Pruning of Deep Neural Networks using ADMM",
2018/2019 (arXiv 1810.07378).  ``targets: [s_1 < s_2 < … < s_n]`` (``s_n`` = ``prune.sparsity``): the
search phase is cut into n equal stages; stage j runs ADMM towards ``s_j`` from the previous stage's
weights, then hard-prunes to ``Π_{S(s_j)}(W)``.  Masks of earlier stages stay in force (hard-pruned:
weights, gradients and post-step re-masking) during the later stages; at every stage start
``Z = Π(W)``, ``U = 0`` and ρ is reset to its initial value.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor, nn

from prunekit.algorithms.base import Algorithm, full_masks, register
from prunekit.algorithms.hooks import TrainContext
from prunekit.core.errors import RecipeError
from prunekit.core.masks import MaskSet
from prunekit.core.plan import PruneSpec, compute_masks, target_plan
from prunekit.core.quant import QuantSpec
from prunekit.core.targets import find_targets

__all__ = ["ADMM", "ProgressiveADMM", "admm_penalty", "project_masks", "project_weights"]


def admm_penalty(weights: Mapping[str, Tensor], Z: Mapping[str, Tensor], U: Mapping[str, Tensor], rho: float) -> Tensor:
    """``Σ_i ρ/2 ‖W_i − Z_i + U_i‖²_F``; its gradient w.r.t. ``W_i`` is ``ρ (W_i − Z_i + U_i)``."""
    total: Tensor | None = None
    for n, w in weights.items():
        t = (w - Z[n] + U[n]).pow(2).sum()
        total = t if total is None else total + t
    if total is None:
        raise RecipeError("ADMM has no target weights")
    return 0.5 * rho * total


def project_masks(model: nn.Module, spec: PruneSpec, values: dict[str, Tensor], sparsity: float | None = None) -> MaskSet:
    """Masks of the Euclidean projection ``Π_S(values)`` for every target of ``spec``.

    The projection keeps the groups with the largest L2 norm of ``values`` (element-wise importance
    → grouped L2), which is the closest point of the constraint set; ``sparsity`` overrides the spec's
    (overrides scale proportionally, as in :func:`compute_masks`)."""
    return compute_masks(model, spec, sparsity=sparsity, importance=values)


def project_weights(model: nn.Module, spec: PruneSpec, values: dict[str, Tensor], sparsity: float | None = None) -> dict[str, Tensor]:
    """``Π_S(values)``: each layer's :meth:`Structure.project` at its planned sparsity (layer scope), or
    ``values`` masked by the global ranking of ``values`` (global scope)."""
    if spec.scope == "global" or spec.st.coupled:
        ms = project_masks(model, spec, values, sparsity)
        return {n: v * ms[n].to(v.dtype) for n, v in values.items()}
    targets = {n: m for n, m in find_targets(model, spec.targets).items() if n in values}
    plan = spec.layer_plan(targets, sparsity)
    return {n: st.project(values[n], sp) for n, (st, sp) in plan.items()}


def _check_rho(rho: float, growth: float, rho_max: float) -> None:
    if not rho > 0:
        raise RecipeError(f"algorithm.params.rho must be > 0, got {rho}")
    if not growth >= 1:
        raise RecipeError(f"algorithm.params.rho_growth must be >= 1, got {growth}")
    if not rho_max >= rho:
        raise RecipeError(f"algorithm.params.rho_max ({rho_max}) must be >= rho ({rho})")


class _SplittingParams(Protocol):
    """What :class:`_Splitting` reads from its algorithm's params."""

    rho: float
    rho_growth: float
    rho_max: float
    update_every: int


P = TypeVar("P", bound=_SplittingParams)


class _Splitting(Algorithm[P]):
    """Shared parts of ADMM-type algorithms: target parameters, projection, ρ schedule, update timing."""

    has_search = True

    def __init__(self, params: P, spec: PruneSpec):
        super().__init__(params, spec)
        self.Z: dict[str, Tensor] = {}
        self.rho = float(params.rho)
        self.updates = 0                 # Z-updates done
        self.masks: MaskSet | None = None
        self._params: dict[str, nn.Parameter] = {}
        self.quant: QuantSpec | None = None   # joint pruning + quantization (ADMM-NN) when set
        self.quant_stage = 0                  # stage of quant.schedule (a function of the step)

    # -- helpers ---------------------------------------------------------------------------------
    def _bind(self, model: nn.Module) -> dict[str, nn.Parameter]:
        names = list(target_plan(model, self.spec))
        params = dict(model.named_parameters())
        self._params = {n: params[n] for n in names}
        return self._params

    def _sparsity_now(self) -> float | None:
        return None  # = spec.sparsity

    def _project(self, model: nn.Module, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """``Π_S(values)`` (previous hard-prune masks, if any, stay in force)."""
        if self.masks is not None:
            values = {n: v * self.masks[n].to(v.dtype) for n, v in values.items()}
        z = project_weights(model, self.spec, values, self._sparsity_now())
        if self.quant is not None:
            for n, cs in self.quant.layer_plan(z, self.quant_stage).items():
                z[n] = cs.project(z[n], z[n] != 0)[0]
        return z

    def _grow_rho(self) -> float:
        old = self.rho
        self.rho = min(self.rho * self.params.rho_growth, self.params.rho_max)
        return old

    def after_step(self, ctx: TrainContext) -> None:
        if self.quant is not None and ctx.total_steps:
            self.quant_stage = self.quant.stage_at(ctx.step / ctx.total_steps)
        if self.params.update_every and ctx.step % self.params.update_every == 0:
            self.update(ctx)

    def epoch_end(self, ctx: TrainContext) -> None:
        if not self.params.update_every:
            self.update(ctx)

    def update(self, ctx: TrainContext) -> None:
        raise NotImplementedError

    def final_masks(self, model: nn.Module) -> MaskSet:
        if not self._params:
            self._bind(model)
        with torch.no_grad():
            values = {n: self._final_values(n, p) for n, p in self._params.items()}
            if self.masks is not None:
                values = {n: v * self.masks[n].to(v.dtype) for n, v in values.items()}
        final = project_masks(model, self.spec, values)
        if self.masks is None:
            return final
        out = self.masks.copy()
        for n, m in final.items():
            out.update(n, m, final.structures.get(n))
        return out

    def _final_values(self, name: str, p: Tensor) -> Tensor:
        return p.detach().clone()


@register
class ADMM(_Splitting["ADMM.Params"]):
    """ADMM pruning (Zhang et al., ECCV 2018); see the module docstring for the formulas."""

    name = "admm"

    @dataclass
    class Params:
        rho: float = 1e-3           # initial penalty ρ
        rho_growth: float = 1.0     # ρ ← min(ρ·rho_growth, rho_max) after each Z/U update
        rho_max: float = 1.0
        update_every: int = 0       # optimizer steps between Z/U updates; 0 = at each epoch end
        final_with_u: bool = False  # final masks = Π(W + U) instead of Π(W)
        rescale_dual: bool = True   # keep Λ = ρU fixed when ρ changes (U ← U·ρ_old/ρ_new)

        def __post_init__(self) -> None:
            _check_rho(self.rho, self.rho_growth, self.rho_max)
            if self.update_every < 0:
                raise RecipeError(f"algorithm.params.update_every must be >= 0, got {self.update_every}")

    def __init__(self, params: ADMM.Params, spec: PruneSpec):
        super().__init__(params, spec)
        self.U: dict[str, Tensor] = {}

    def _init_split(self, model: nn.Module) -> None:
        with torch.no_grad():
            self.Z = self._project(model, {n: p.detach().clone() for n, p in self._params.items()})
            self.U = {n: torch.zeros_like(p) for n, p in self._params.items()}

    def begin(self, ctx: TrainContext) -> None:
        self._bind(ctx.model)
        if not self.Z:                      # fresh start (a resumed state keeps its Z, U)
            self._init_split(ctx.model)

    def extra_loss(self, ctx: TrainContext, batch: Any, outputs: Any) -> Tensor:
        return admm_penalty(self._params, self.Z, self.U, self.rho)

    @torch.no_grad()
    def update(self, ctx: TrainContext) -> None:
        """One Z-step and dual step: ``Z = Π(W + U)``, ``U += W − Z``, then the ρ schedule."""
        W = {n: p.detach() for n, p in self._params.items()}
        self.Z = self._project(ctx.model, {n: W[n] + self.U[n] for n in W})
        for n in W:
            self.U[n] += W[n] - self.Z[n]
        old = self._grow_rho()
        if self.params.rescale_dual and self.rho != old:
            for n in self.U:
                self.U[n] *= old / self.rho
        self.updates += 1

    def _final_values(self, name: str, p: Tensor) -> Tensor:
        v = p.detach().clone()
        return v + self.U[name] if self.params.final_with_u and name in self.U else v

    def state_dict(self) -> dict[str, Any]:
        return {"rho": self.rho, "updates": self.updates,
                "Z": {n: z.clone() for n, z in self.Z.items()}, "U": {n: u.clone() for n, u in self.U.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rho = float(state["rho"])
        self.updates = int(state["updates"])
        self.Z = {n: z.clone() for n, z in state["Z"].items()}
        self.U = {n: u.clone() for n, u in state["U"].items()}


@register
class ProgressiveADMM(ADMM):
    """Progressive ADMM (Ye et al. 2019): ADMM towards ``targets[0]``, hard-prune, ADMM towards
    ``targets[1]`` from there, …; see the module docstring."""

    name = "admm_progressive"

    @dataclass
    class Params(ADMM.Params):
        targets: list[float] = field(default_factory=list)   # increasing; the last = prune.sparsity

        def __post_init__(self) -> None:
            super().__post_init__()
            for i, t in enumerate(self.targets):
                if not (0 < t < 1):
                    raise RecipeError(f"algorithm.params.targets[{i}] = {t} must be in (0, 1)")
            if any(b <= a for a, b in zip(self.targets, self.targets[1:])):
                raise RecipeError(f"algorithm.params.targets must increase strictly, got {self.targets}")

    params: Params

    def __init__(self, params: ProgressiveADMM.Params, spec: PruneSpec):
        super().__init__(params, spec)
        targets = list(params.targets) or [float(spec.sparsity)]
        if abs(targets[-1] - float(spec.sparsity)) > 1e-9:
            raise RecipeError(f"algorithm.params.targets must end at prune.sparsity ({spec.sparsity}); "
                             f"got {targets}")
        self.targets = targets
        self.stage = 0

    def _sparsity_now(self) -> float:
        return self.targets[self.stage]

    def masks_during_search(self, model: nn.Module) -> MaskSet:
        if self.masks is None:              # a resumed state brings its own masks
            self.masks = full_masks(model, self.spec)
        return self.masks

    def _stage_end(self, total_steps: int, stage: int) -> int:
        return round((stage + 1) * total_steps / len(self.targets))

    def after_step(self, ctx: TrainContext) -> None:
        super().after_step(ctx)
        if self.stage < len(self.targets) - 1 and ctx.step >= self._stage_end(ctx.total_steps, self.stage):
            self.next_stage(ctx)

    @torch.no_grad()
    def next_stage(self, ctx: TrainContext) -> None:
        """Hard-prune to the current stage's target, then start ADMM towards the next one."""
        masks = self.masks
        assert masks is not None, "masks_during_search runs before the first step"
        vals = {n: self._final_values(n, p) * masks[n].to(p.dtype) for n, p in self._params.items()}
        stage_masks = project_masks(ctx.model, self.spec, vals, self._sparsity_now())
        for n, m in stage_masks.items():
            masks.update(n, m, stage_masks.structures.get(n))
        if ctx.hard_prune is not None:
            ctx.hard_prune.refresh()
        else:
            masks.apply(ctx.model)
        self.stage += 1
        self.rho = float(self.params.rho)
        self._init_split(ctx.model)

    def state_dict(self) -> dict[str, Any]:
        s = super().state_dict()
        s["stage"] = self.stage
        if self.masks is not None:
            s["masks"] = self.masks.state_dict()["masks"]
        return s

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.stage = int(state["stage"])
        if "masks" in state:
            if self.masks is None:
                self.masks = MaskSet()
            for n, m in state["masks"].items():
                self.masks.set(n, m)
