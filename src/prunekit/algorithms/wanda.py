"""Wanda (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models", ICLR 2024):
prune by ``|W_ij| · ‖X_j‖₂`` (weight magnitude times the L2 norm of input feature ``j`` over the
calibration tokens), with no weight update.

* ``unstructured``: compared *per output row* — every row keeps the same number of weights
  (``round(sparsity · cols)`` pruned per row), as in the paper;
* ``nm:N:M``: the N largest scores of every M consecutive inputs of a row;
* every other structure: the structure's own partition and selection with the score as element
  importance (grouped by the L2 norm).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from prunekit.algorithms.base import register
from prunekit.algorithms.calibration import LayerStats, PostTraining, PostTrainingParams
from prunekit.core.errors import RecipeError
from prunekit.core.structures import Structure, Unstructured, parse_structure

__all__ = ["Wanda", "wanda_mask", "wanda_scores"]


def wanda_scores(W: Tensor, col_norms: Tensor) -> Tensor:
    """``|W_ij| · ‖X_j‖₂`` for an ``(out, in)`` matrix and the per-input norms ``(in,)``."""
    if col_norms.shape != (W.shape[1],):
        raise RecipeError(f"input norms of shape {tuple(col_norms.shape)} do not match {W.shape[1]} weight columns")
    return W.detach().abs().float() * col_norms.float().to(W.device)[None, :]


def wanda_mask(W: Tensor, col_norms: Tensor, structure: str | Structure = "unstructured",
               sparsity: float = 0.5, shape: Sequence[int] | None = None) -> Tensor:
    """Keep-mask of the ``(out, in)`` matrix ``W`` (``shape``: the weight's own shape for the structure)."""
    st = parse_structure(structure)
    shape = tuple(shape or W.shape)
    st.check_shape(shape)
    if not 0.0 <= float(sparsity) < 1.0:
        raise RecipeError(f"sparsity must be in [0, 1), got {sparsity}")
    score = wanda_scores(W, col_norms)
    if isinstance(st, Unstructured):
        k = int(round(float(sparsity) * W.shape[1]))
        keep = torch.ones_like(score, dtype=torch.bool)
        if k > 0:
            keep.scatter_(1, torch.argsort(score, dim=1, stable=True)[:, :k], False)
        return keep
    return st.mask(W.reshape(shape), sparsity, score=score.reshape(shape)).reshape(W.shape)


@register
class Wanda(PostTraining["Wanda.Params"]):
    """Wanda post-training pruning (no search phase, no weight update)."""

    name = "wanda"
    hessian = False

    @dataclass
    class Params(PostTrainingParams):
        pass

    def prune_matrix(self, W: Tensor, stats: LayerStats, structure: Structure, sparsity: float,
                     shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        keep = wanda_mask(W, stats.col_norms, structure, sparsity, shape)
        return W * keep, keep
