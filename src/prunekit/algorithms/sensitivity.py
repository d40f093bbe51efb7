"""Per-layer pruning sensitivity and a budget allocation from it.

:func:`layer_sensitivity` prunes each target layer *alone* (every other layer dense) at each sparsity of
a sweep, with the recipe's structure and score and no retraining, and records the metric drop
``dense score − pruned score`` on the eval set.  :func:`allocate_budget` turns the curves into per-layer
sparsities whose parameter-weighted mean is exactly a global ``budget``, equalising the drop:

    for a drop level τ, layer i gets s_i(τ) = the largest sparsity whose (monotone, piecewise-linear)
    drop curve stays ≤ τ; τ is found by bisection so that Σ n_i s_i(τ) / Σ n_i = budget.

This is the usual "sensitivity analysis" of Han et al. (2015, *Learning both Weights and Connections*,
§4: "we prune each layer alone and plot accuracy against the pruned fraction") with an equal-drop
allocation in the spirit of AMC/NetAdapt's layer-wise budgets.  The drop curve is made monotone
(running maximum over the sweep, starting from (0, 0)), so noise cannot give a layer *less* sparsity
for a larger tolerated drop; where a curve is flat at the chosen level, the layers on that flat part are
blended linearly so the budget is met exactly.

:func:`overrides_yaml` writes the result as a recipe snippet (``prune: {overrides: {name: sparsity}}``)
that :func:`prunekit.pipelines.recipe.parse_recipe` accepts.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from prunekit.core.errors import RecipeError
from prunekit.core.plan import PruneSpec
from prunekit.core.targets import find_targets

__all__ = ["Sensitivity", "layer_sensitivity", "allocate_budget", "overall_sparsity", "overrides_yaml",
           "parse_sparsities", "DEFAULT_SPARSITIES"]

DEFAULT_SPARSITIES = (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95)


@dataclass
class Sensitivity:
    """Result of :func:`layer_sensitivity`: ``curves[layer] = [(sparsity, drop), ...]`` over ``sparsities``."""

    metric: str
    dense_score: float
    sparsities: list[float]
    curves: dict[str, list[tuple[float, float]]]
    numel: dict[str, int]
    structures: dict[str, str]
    scores: dict[str, list[float]] = field(default_factory=dict)   # raw pruned scores, same order

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["curves"] = {k: [list(p) for p in v] for k, v in self.curves.items()}
        return d


def parse_sparsities(text: str) -> list[float]:
    """``"0.1,0.3,0.5"`` → sorted unique floats, each in (0, 1)."""
    try:
        vals = [float(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise RecipeError(f"--sparsities expects comma-separated numbers like 0.1,0.5,0.9; got {text!r}") from None
    if not vals:
        raise RecipeError("--sparsities is empty")
    bad = [v for v in vals if not 0.0 < v < 1.0]
    if bad:
        raise RecipeError(f"--sparsities values must be in (0, 1); got {bad}")
    return sorted(set(vals))


@torch.no_grad()
def layer_sensitivity(model: nn.Module, evaluate: Callable[[nn.Module], float | dict[str, float]], spec: PruneSpec,
                      sparsities: Iterable[float] = DEFAULT_SPARSITIES, *,
                      metric: str | None = None, log: Callable[[str], object] | None = None) -> Sensitivity:
    """Prune each target of ``spec`` alone at each of ``sparsities`` (its structure and score from ``spec``,
    overrides' structures included) and evaluate; weights are restored after each layer.

    ``evaluate(model) -> float`` (higher is better) or ``-> dict`` (then ``metric`` names the key)."""
    sparsities = [float(s) for s in sparsities]
    if not sparsities or any(not 0.0 < s < 1.0 for s in sparsities):
        raise RecipeError(f"sparsities must be a non-empty list of values in (0, 1); got {sparsities}")
    sparsities = sorted(set(sparsities))

    def score() -> float:
        v = evaluate(model)
        if isinstance(v, dict):
            if metric is None or metric not in v:
                raise RecipeError(f"evaluate returned {sorted(v)}; pass metric= one of them")
            v = v[metric]
        return float(v)

    params = dict(model.named_parameters())
    plan = spec.layer_plan(find_targets(model, spec.targets))
    dense = score()
    curves, scores, numel, structs = {}, {}, {}, {}
    for name, (st, _) in plan.items():
        w = params[name]
        orig = w.detach().clone()
        st.check_shape(w.shape)
        pts, raw = [], []
        try:
            for sp in sparsities:
                m = st.mask(orig, sp, spec.score)
                w.copy_(orig * m.to(orig.dtype))
                s = score()
                pts.append((sp, dense - s))
                raw.append(s)
        finally:
            w.copy_(orig)
        curves[name], scores[name] = pts, raw
        numel[name], structs[name] = w.numel(), str(st)
        if log:
            log(f"{name}: " + ", ".join(f"{100 * sp:.0f}%→{d:+.4f}" for sp, d in pts))
    return Sensitivity(metric or "metric", dense, sparsities, curves, numel, structs, scores)


def _monotone(pts: Iterable[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    xs = np.array([0.0] + [p[0] for p in sorted(pts)])
    ys = np.array([0.0] + [p[1] for p in sorted(pts)])
    return xs, np.maximum.accumulate(np.maximum(ys, 0.0))


def _max_sparsity_within(xs: np.ndarray, ys: np.ndarray, tau: float) -> float:
    """Largest x in [0, xs[-1]] with the piecewise-linear, non-decreasing curve ≤ tau."""
    if tau < 0:
        return 0.0
    if ys[-1] <= tau:
        return float(xs[-1])
    k = int(np.argmax(ys > tau))           # first point above tau (k ≥ 1 since ys[0] = 0 ≤ tau)
    x0, x1, y0, y1 = xs[k - 1], xs[k], ys[k - 1], ys[k]
    return float(x0 + (x1 - x0) * (tau - y0) / (y1 - y0)) if y1 > y0 else float(x0)


def overall_sparsity(ratios: dict[str, float], numel: dict[str, int]) -> float:
    """Parameter-weighted mean sparsity of ``ratios`` (the targeted sparsity they give)."""
    total = sum(numel[n] for n in ratios)
    return sum(ratios[n] * numel[n] for n in ratios) / total


def allocate_budget(sens: Sensitivity, budget: float, *, iters: int = 100) -> dict[str, float]:
    """Per-layer sparsities with parameter-weighted mean exactly ``budget``, equalising the metric drop
    (see the module docstring).  ``budget`` must be in (0, max sweep sparsity]."""
    if not 0.0 < budget < 1.0:
        raise RecipeError(f"budget must be in (0, 1); got {budget}")
    curves = {n: _monotone(p) for n, p in sens.curves.items()}
    numel = sens.numel

    def at(tau: float) -> dict[str, float]:
        return {n: _max_sparsity_within(xs, ys, tau) for n, (xs, ys) in curves.items()}

    top = max(float(ys[-1]) for _, ys in curves.values())
    cap = overall_sparsity(at(top), numel)
    if budget > cap + 1e-12:
        raise RecipeError(f"budget {budget} exceeds what the sweep covers ({cap:.4f} with every layer at its "
                         f"largest swept sparsity {max(sens.sparsities)}); add larger --sparsities")
    lo, hi = -1e-12, top
    for _ in range(iters):             # invariant: overall(at(lo)) < budget ≤ overall(at(hi))
        mid = 0.5 * (lo + hi)
        if overall_sparsity(at(mid), numel) >= budget:
            hi = mid
        else:
            lo = mid
    below, above = at(lo), at(hi)
    t_lo, t_hi = overall_sparsity(below, numel), overall_sparsity(above, numel)
    a = 0.0 if t_hi - t_lo <= 1e-15 else (budget - t_lo) / (t_hi - t_lo)
    a = min(max(a, 0.0), 1.0)
    return {n: below[n] + a * (above[n] - below[n]) for n in curves}


def overrides_yaml(ratios: dict[str, float], *, budget: float | None = None, sens: Sensitivity | None = None,
                   digits: int = 4) -> str:
    """A recipe snippet ``prune: {sparsity: budget, overrides: {param: sparsity}}``; paste it into a recipe
    (or merge it) — :func:`prunekit.pipelines.recipe.parse_recipe` accepts it.  Ratios are clipped to [0, 0.9999]."""
    ov = {n: round(min(max(float(s), 0.0), 0.9999), digits) for n, s in ratios.items()}
    head = ["# per-layer sparsities from `prunekit sensitivity` (equal metric drop)"]
    if budget is not None and sens is not None:
        head.append(f"# budget {budget}: overall targeted sparsity {overall_sparsity(ov, sens.numel):.4f}; "
                    f"dense {sens.metric} {sens.dense_score:.4f}")
    body: dict[str, Any] = {"prune": {"overrides": ov}}
    if budget is not None:
        body["prune"] = {"sparsity": float(budget), "overrides": ov}
    text: str = yaml.safe_dump(body, sort_keys=False)
    return "\n".join(head) + "\n" + text
