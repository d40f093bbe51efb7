"""OWL layer-wise sparsity (Yin et al., "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce
for Pruning LLMs to High Sparsity", ICML 2024).

Layers with many *outliers* are pruned less.  For layer ``l`` with element scores ``A`` (Wanda's
``|W|·‖X‖`` by default; any score works) the outlier ratio is ``D_l = mean(A > M · mean(A))``.  The ratios
are min-max normalised to ``n_l ∈ [0, 1]`` and centred on their parameter-weighted mean ``c``; the layer's
sparsity is ``s_l = target − λ · (n_l − c)``.  Hence ``|s_l − target| ≤ λ`` and the parameter-weighted
mean of ``s_l`` is exactly the target (the global sparsity is unchanged).
"""
from __future__ import annotations

import torch
from torch import Tensor

from prunekit.core.errors import RecipeError

__all__ = ["outlier_ratio", "owl_allocation"]


def outlier_ratio(score: Tensor, m: float = 5.0) -> float:
    """Fraction of ``score`` entries above ``m`` times the mean score."""
    s = score.detach().float()
    return float((s > m * s.mean()).float().mean())


def owl_allocation(scores: dict[str, Tensor], target: float, m: float = 5.0, lam: float = 0.08,
                   sizes: dict[str, int] | None = None) -> dict[str, float]:
    """``{name: sparsity}`` from per-layer element ``scores`` (see the module doc).  ``sizes``: parameter
    counts for the weighted mean (default: the scores' sizes)."""
    if not 0.0 <= target < 1.0:
        raise RecipeError(f"OWL target sparsity must be in [0, 1), got {target}")
    if not 0.0 <= lam < 1.0:
        raise RecipeError(f"owl_lambda must be in [0, 1), got {lam}")
    if target - lam < 0.0 or target + lam >= 1.0:
        raise RecipeError(f"owl_lambda={lam} moves the target {target} outside [0, 1); use a smaller owl_lambda")
    if not scores:
        raise RecipeError("OWL needs at least one layer")
    names = list(scores)
    d = torch.tensor([outlier_ratio(scores[n], m) for n in names], dtype=torch.float64)
    p = torch.tensor([float((sizes or {}).get(n, scores[n].numel())) for n in names], dtype=torch.float64)
    span = float(d.max() - d.min())
    norm = (d - d.min()) / span if span > 0 else torch.zeros_like(d)
    centred = norm - (norm * p).sum() / p.sum()
    sp = target - lam * centred
    return {n: float(s) for n, s in zip(names, sp)}
