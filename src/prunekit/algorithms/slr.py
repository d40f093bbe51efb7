"""SLR: Surrogate Lagrangian Relaxation pruning.

Gurevin, Bragin, Ding, Zhou, Pepin, Li, Miao, "Enabling Retrain-free Deep Neural Network Pruning using
Surrogate Lagrangian Relaxation", IJCAI 2021 (arXiv 2012.10079).

Same decomposition as ADMM (``W_i = Z_i``, ``Z_i ∈ S_i``) with the *unscaled* multipliers Λ and the
augmented Lagrangian (paper eq. 3)::

    L_ρ(W, Z, Λ) = f(W) + Σ_i g_i(Z_i) + Σ_i tr[Λ_iᵀ (W_i − Z_i)] + Σ_i ρ/2 ‖W_i − Z_i‖²_F

(``g_i`` = indicator of the constraint set, 0 for every feasible Z).  One SLR iteration k, run every
``update_every`` optimizer steps (0 = at each epoch end), after the W-sub-problem has been advanced by
SGD on ``f(W) + Σ tr[Λᵀ(W − Z)] + ρ/2‖W − Z‖²`` (the ``extra_loss``; gradient ``Λ + ρ(W − Z)``):

1. *W-step surrogate optimality condition* (eq. 5)::

       L_ρ(W^k, Z^{k−1}, Λ^k) < L_ρ(W^{k−1}, Z^{k−1}, Λ^k)

   If it holds, the multipliers move along the surrogate subgradient ``W^k − Z^{k−1}`` (eq. 6)::

       Λ^{k+½} = Λ^k + s^k (W^k − Z^{k−1})

2. *Z-step* (eq. 9): ``Z^k = Π_S(W^k + Λ^{k+½}/ρ)`` (the exact minimiser of L_ρ over Z), then the
   condition ``L_ρ(W^k, Z^k, Λ^{k+½}) < L_ρ(W^k, Z^{k−1}, Λ^{k+½})`` (eq. 10) gates the second
   multiplier step ``Λ^{k+1} = Λ^{k+½} + s^{k+½} (W^k − Z^k)`` (eq. 11).

Step sizes (eqs. 7-8), for each multiplier update j = 1, 2, … (both half-steps count)::

    s_j = α_j · s_{j−1} · ‖g_{j−1}‖ / ‖g_j‖,     α_j = 1 − 1 / (M · j^(1 − 1/j^r)),   M > 1, 0 < r < 1

with ``g_j`` the surrogate subgradient used by update j (``g_0 = W^0 − Z^0``) and ``s_0`` = ``s0``
(default ρ, so the first step matches ADMM's ``Λ += ρ(W − Z)``).  A multiplier step is skipped when
its condition fails or when ``‖g_j‖ = 0``.

How the conditions are evaluated here: ``f`` is the task loss on one fixed *probe batch* (the first
training batch, evaluated in ``eval()`` mode without gradients) so that both sides of eq. 5 see the
same data; ``L_ρ(W^{k−1}, Z^{k−1}, Λ^k)`` is the value recorded at the end of the previous iteration.
ρ follows the same optional schedule as ADMM (``rho_growth``, ``rho_max``; default constant).
Hard-pruning at the end (``final_masks`` = Π_S(W)) is where SLR claims its advantage: the runner
records the accuracy right after it (``score_after_hard_prune``), before retraining.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from prunekit.algorithms.admm import _check_rho, _Splitting
from prunekit.algorithms.base import register
from prunekit.algorithms.hooks import TrainContext
from prunekit.core.errors import RecipeError
from prunekit.core.plan import PruneSpec

__all__ = ["SLR", "slr_alpha", "slr_step_size"]


def slr_alpha(j: int, M: float, r: float) -> float:
    """``α_j = 1 − 1 / (M · j^(1 − 1/j^r))`` (Gurevin et al. 2021, eq. 8; Bragin et al. 2015)."""
    if j < 1:
        raise RecipeError(f"SLR step index starts at 1, got {j}")
    alpha: float = 1.0 - 1.0 / (M * j ** (1.0 - 1.0 / j ** r))
    return alpha


def slr_step_size(s_prev: float, j: int, M: float, r: float, g_prev_norm: float, g_norm: float) -> float:
    """``s_j = α_j s_{j−1} ‖g_{j−1}‖ / ‖g_j‖`` (eq. 7)."""
    if g_norm <= 0:
        raise RecipeError("SLR step size needs a nonzero subgradient norm ‖g_j‖")
    return slr_alpha(j, M, r) * s_prev * g_prev_norm / g_norm


@register
class SLR(_Splitting["SLR.Params"]):
    """Surrogate Lagrangian Relaxation pruning (Gurevin et al. 2021); see the module docstring."""

    name = "slr"

    @dataclass
    class Params:
        rho: float = 0.1            # quadratic penalty ρ
        rho_growth: float = 1.0
        rho_max: float = 1.0
        s0: float | None = None     # initial step size s_0 (default ρ)
        M: float = 300.0            # α_j = 1 − 1/(M j^(1−1/j^r)),  M > 1
        r: float = 0.1              # 0 < r < 1
        update_every: int = 0       # optimizer steps between SLR iterations; 0 = each epoch end

        def __post_init__(self) -> None:
            _check_rho(self.rho, self.rho_growth, self.rho_max)
            if not self.M > 1:
                raise RecipeError(f"algorithm.params.M must be > 1, got {self.M}")
            if not 0 < self.r < 1:
                raise RecipeError(f"algorithm.params.r must be in (0, 1), got {self.r}")
            if self.s0 is not None and not self.s0 > 0:
                raise RecipeError(f"algorithm.params.s0 must be > 0, got {self.s0}")
            if self.update_every < 0:
                raise RecipeError(f"algorithm.params.update_every must be >= 0, got {self.update_every}")

    def __init__(self, params: SLR.Params, spec: PruneSpec):
        super().__init__(params, spec)
        self.Lam: dict[str, Tensor] = {}
        self.s = float(params.s0 if params.s0 is not None else params.rho)
        self.j = 0                      # multiplier updates done
        self.g_prev_norm = 0.0          # ‖g_{j−1}‖
        self.L_prev: float | None = None   # L_ρ(W^{k−1}, Z^{k−1}, Λ^k)
        self.iterations = 0
        self.accepted = {"w_step": 0, "z_step": 0}
        self._probe: Any = None   # the first training batch (any type the task takes)

    # -- Lagrangian pieces -------------------------------------------------------------------------
    def _coupling(self, W: Mapping[str, Tensor], Z: Mapping[str, Tensor], Lam: Mapping[str, Tensor]) -> float:
        """``Σ tr[Λᵀ(W − Z)] + ρ/2 ‖W − Z‖²`` (the Z-dependent part of L_ρ, indicator = 0)."""
        tot = 0.0
        for n in W:
            d = W[n] - Z[n]
            tot += float((Lam[n] * d).sum()) + 0.5 * self.rho * float(d.pow(2).sum())
        return tot

    @torch.no_grad()
    def _f(self, ctx: TrainContext) -> float:
        was = ctx.model.training
        ctx.model.eval()
        try:
            loss, _ = ctx.task.step(ctx.model, self._probe)
        finally:
            ctx.model.train(was)
        return float(loss)

    @staticmethod
    def _norm(W: Mapping[str, Tensor], Z: Mapping[str, Tensor]) -> float:
        return math.sqrt(sum(float((W[n] - Z[n]).pow(2).sum()) for n in W))

    def _multiplier_step(self, g: dict[str, Tensor], g_norm: float) -> bool:
        if g_norm <= 0:
            return False
        self.j += 1
        self.s = slr_step_size(self.s, self.j, self.params.M, self.params.r, self.g_prev_norm or g_norm, g_norm)
        for n in self.Lam:
            self.Lam[n] += self.s * g[n]
        self.g_prev_norm = g_norm
        return True

    # -- hooks --------------------------------------------------------------------------------------
    def begin(self, ctx: TrainContext) -> None:
        self._bind(ctx.model)
        if not self.Z:
            with torch.no_grad():
                W = {n: p.detach().clone() for n, p in self._params.items()}
                self.Z = self._project(ctx.model, W)
                self.Lam = {n: torch.zeros_like(p) for n, p in self._params.items()}
                self.g_prev_norm = self._norm(W, self.Z)

    def extra_loss(self, ctx: TrainContext, batch: Any, outputs: Any) -> Tensor | None:
        if self._probe is None:
            self._probe = batch
            if self.L_prev is None:     # L_ρ(W^0, Z^0, Λ^0) before the first optimizer step
                with torch.no_grad():
                    W = {n: p.detach() for n, p in self._params.items()}
                    self.L_prev = self._f(ctx) + self._coupling(W, self.Z, self.Lam)
        tot: Tensor | None = None
        for n, w in self._params.items():
            d = w - self.Z[n]
            t = (self.Lam[n] * d).sum() + 0.5 * self.rho * d.pow(2).sum()
            tot = t if tot is None else tot + t
        return tot

    @torch.no_grad()
    def update(self, ctx: TrainContext) -> None:
        if self._probe is None:
            return
        W = {n: p.detach() for n, p in self._params.items()}
        f = self._f(ctx)
        # 1. W-step condition (eq. 5) → Λ^{k+½} = Λ^k + s (W^k − Z^{k−1})
        L_cur = f + self._coupling(W, self.Z, self.Lam)
        if self.L_prev is None or L_cur < self.L_prev:
            g = {n: W[n] - self.Z[n] for n in W}
            if self._multiplier_step(g, self._norm(W, self.Z)):
                self.accepted["w_step"] += 1
        # 2. Z-step (eq. 9) and its condition (eq. 10) → Λ^{k+1} = Λ^{k+½} + s (W^k − Z^k)
        Z_old = self.Z
        Z_new = self._project(ctx.model, {n: W[n] + self.Lam[n] / self.rho for n in W})
        self.Z = Z_new
        if self._coupling(W, Z_new, self.Lam) < self._coupling(W, Z_old, self.Lam):
            g = {n: W[n] - Z_new[n] for n in W}
            if self._multiplier_step(g, self._norm(W, Z_new)):
                self.accepted["z_step"] += 1
        self.L_prev = f + self._coupling(W, self.Z, self.Lam)
        self._grow_rho()
        self.iterations += 1
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"rho": self.rho, "s": self.s, "j": self.j, "g_prev_norm": self.g_prev_norm,
                "L_prev": self.L_prev if self.L_prev is not None else float("nan"),
                "iterations": self.iterations, "updates": self.updates,
                "accepted_w_step": self.accepted["w_step"], "accepted_z_step": self.accepted["z_step"],
                "Z": {n: z.clone() for n, z in self.Z.items()}, "Lam": {n: v.clone() for n, v in self.Lam.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rho, self.s, self.j = float(state["rho"]), float(state["s"]), int(state["j"])
        self.g_prev_norm = float(state["g_prev_norm"])
        lp = float(state["L_prev"])
        self.L_prev = None if math.isnan(lp) else lp
        self.iterations, self.updates = int(state["iterations"]), int(state["updates"])
        self.accepted = {"w_step": int(state["accepted_w_step"]), "z_step": int(state["accepted_z_step"])}
        self.Z = {n: z.clone() for n, z in state["Z"].items()}
        self.Lam = {n: v.clone() for n, v in state["Lam"].items()}
