"""Group scores and selection, as pure functions.

A *score* maps a ``(G, S)`` partition (see :mod:`prunekit.core.structures`) to ``(G,)`` importances.
Built in: ``l1`` (sum of |w|), ``l2`` (Euclidean norm), ``magnitude`` (= ``l1``; for single-weight
groups every score is |w|).  Any callable with the same signature can be registered or passed.

Selection prunes ``round(sparsity * G)`` groups with the lowest scores — the count rule of
``torch.nn.utils.prune`` (Python's ``round``, i.e. ties to even).  Ties between equal scores are broken
deterministically: the group with the lower index is pruned first (stable sort).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from prunekit.core.errors import RecipeError
from prunekit.core.registry import Registry

ScoreFn = Callable[[Tensor], Tensor]

__all__ = ["Score", "SCORES", "register_score", "resolve_score", "group_scores", "num_to_prune", "select_keep",
           "select_keep_global", "select_groups"]


@dataclass(frozen=True)
class Score:
    """A named group score ``(G, S) → (G,)`` with its one-line description.

    ``power``: how the score of a group of ``k`` equal weights grows with ``k`` (``∝ k^(1/power)``):
    1 for sums (``l1``), 2 for Euclidean norms (``l2``).  It is what makes partial (edge) groups
    comparable with full ones: see :func:`group_scores`."""

    name: str
    fn: ScoreFn
    power: float = 1.0
    help: str = ""

    def __call__(self, groups: Tensor) -> Tensor:
        return self.fn(groups)


def _l1(g: Tensor) -> Tensor:
    return g.abs().sum(1)


def _l2(g: Tensor) -> Tensor:
    return g.float().pow(2).sum(1).sqrt()


SCORES: Registry[Score] = Registry("score")
SCORES.add("l1", Score("l1", _l1, 1.0, "sum of |w| over the group"))
SCORES.add("l2", Score("l2", _l2, 2.0, "Euclidean norm of the group"))
SCORES.add("magnitude", Score("magnitude", _l1, 1.0, "= l1 (for single weights every score is |w|)"))


def register_score(name: str, fn: ScoreFn, *, power: float = 1.0, help: str = "") -> Score:
    """Add a named score (``(G,S) → (G,)``) usable from recipes as ``prune.score: NAME``."""
    return SCORES.add(name, Score(name, fn, power, help))


def resolve_score(score: str | ScoreFn | Score) -> Score:
    """A :class:`Score` from a registered name, a :class:`Score`, or a bare callable (``power`` 1)."""
    if isinstance(score, Score):
        return score
    if callable(score):
        return Score(getattr(score, "__name__", "custom"), score, 1.0)
    if not isinstance(score, str):
        raise RecipeError(f"unknown score {score!r}; valid: {SCORES.names()} or a callable")
    try:
        return SCORES.get(score)
    except ValueError:
        raise RecipeError(f"unknown score {score!r}; valid: {SCORES.names()} or a callable") from None


def group_scores(groups: Tensor, score: Score | ScoreFn, sizes: Tensor | None = None) -> Tensor:
    """``(G,)`` scores of a zero-padded ``(G, S)`` partition.

    ``sizes`` ``(G,)``: real weights per group.  A partial group (size ``k < S``) is scored **per real
    weight**: its raw score is multiplied by ``(S/k)^(1/power)``, i.e. it gets the score a full group of
    the same mean ``|w|`` (l1) or the same root-mean-square (l2) would get.  Full groups keep their raw
    score, so nothing changes where every group is full."""
    sc = resolve_score(score)
    if groups.shape[1] == 1 and sc.fn in (_l1, _l2):  # single-weight groups: every norm is |w|
        return groups.reshape(-1).abs().float()
    out = sc(groups)
    if out.shape != (groups.shape[0],):
        raise RecipeError(f"score returned shape {tuple(out.shape)}, expected ({groups.shape[0]},)")
    out = out.float()
    if sizes is not None:
        S = groups.shape[1]
        part = (sizes < S) & (sizes > 0)
        if bool(part.any()):
            f = (S / sizes.clamp_min(1).float()).pow(1.0 / sc.power)
            out = torch.where(part, out * f, out)
    return out


def num_to_prune(sparsity: float, n: int) -> int:
    """``round(sparsity * n)`` as ``torch.nn.utils.prune`` computes it."""
    return int(round(float(sparsity) * n))


def select_keep(scores: Tensor, sparsity: float) -> Tensor:
    """Bool mask of ``scores``' shape: False for the ``round(sparsity*G)`` lowest scores.

    Linear time: the k-th smallest score is found with ``torch.kthvalue``; everything below it is
    pruned, and among scores equal to it the lowest indices are pruned first (deterministic ties)."""
    return _prune_lowest(scores.reshape(-1), num_to_prune(sparsity, scores.numel())).reshape(scores.shape)


def _prune_lowest(flat: Tensor, k: int) -> Tensor:
    """Keep-mask of a 1-D tensor with its ``k`` lowest entries pruned (lowest index first on ties)."""
    n = flat.numel()
    if k <= 0:
        return torch.ones(n, dtype=torch.bool)
    if k >= n:
        return torch.zeros(n, dtype=torch.bool)
    thr = torch.kthvalue(flat, k).values
    keep = flat > thr
    eq = (flat == thr).nonzero().squeeze(1)
    need = k - int((flat < thr).sum())
    keep[eq[need:]] = True
    return keep


def select_keep_global(scores: list[Tensor], sizes: list[Tensor], sparsity: float) -> list[Tensor]:
    """Global scope: one ranking over the groups of several tensors.

    ``sizes[i]`` holds the number of real weights in each group of tensor ``i``; groups are pruned in
    increasing score order until ``round(sparsity * total_weights)`` weights are gone (a group is never
    split).  Scores should be comparable across tensors (e.g. ``l2`` divided by sqrt(group size) is
    not applied automatically: pass a normalising score if layers differ in scale)."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    sz = torch.cat([z.reshape(-1).long() for z in sizes])
    target = num_to_prune(sparsity, int(sz.sum()))
    if sz.numel() and bool((sz == sz[0]).all()):
        # equal group sizes (unstructured, or one block shape that divides every layer): linear-time threshold
        keep = _prune_lowest(flat, target // max(int(sz[0]), 1))
    else:
        order = torch.argsort(flat, stable=True)
        cum = torch.cumsum(sz[order], 0)
        n = int(torch.searchsorted(cum, torch.tensor(target), right=True).item())
        keep = torch.ones_like(flat, dtype=torch.bool)
        keep[order[:n]] = False
    out, i = [], 0
    for s in scores:
        out.append(keep[i:i + s.numel()].reshape(s.shape))
        i += s.numel()
    return out


def select_groups(scores: Tensor, sizes: Tensor, sparsity: float) -> Tensor:
    """``(G,)`` keep-decision for one tensor's groups.

    Every group full (equal ``sizes``): prune the ``round(sparsity*G)`` lowest scores (the count rule of
    ``torch.nn.utils.prune``).  Groups of different sizes (partial edge blocks): prune lowest-score first
    while at most ``round(sparsity * Σ sizes)`` weights are gone (:func:`select_keep_global` on one
    tensor), so the element sparsity is the requested one within one group's share."""
    sizes = sizes.reshape(-1)
    if sizes.numel() == 0 or bool((sizes == sizes[0]).all()):
        return select_keep(scores, sparsity)
    return select_keep_global([scores], [sizes], sparsity)[0]
