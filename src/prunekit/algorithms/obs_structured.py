"""OBS-style structured post-training pruning of coupled groups with least-squares reconstruction.

A structured group (an FFN neuron, an attention head, an input column of a Linear, an input channel of a
Conv2d) is a set of *input columns* of one consuming layer (the FFN down projection, the attention
output projection, the layer itself) plus, for neurons and heads, the rows of the producing layers
(``prunekit.graph.families.coupled_groups``).  Removing group ``G`` from the consumer ``W`` (input Hessian ``H = 2/n X Xᵀ``)
and re-fitting the kept columns costs (Optimal Brain Surgeon, layer-wise)::

    ΔL_G = Σ_rows  w_G · ([H⁻¹]_GG)⁻¹ · w_Gᵀ

Groups are removed in a few rounds (``rounds``, default 8), lowest ``ΔL`` first; after each round ``W`` and
``H⁻¹`` get the exact joint OBS update of the removed set ``S`` (``W −= W_S [H⁻¹]_SS⁻¹ [H⁻¹]_S,:``,
``H⁻¹ −= [H⁻¹]_:,S [H⁻¹]_SS⁻¹ [H⁻¹]_S,:``) so later rounds see the compensated weights; one group per round is
the greedy OBS of the original formulation (``O(n_prune · d²)``: minutes per MiniLM FFN layer), a few rounds
cost a few ``d²|S|`` products (Kwon et al. 2022 select by a similar saliency, then reconstruct).  Finally the kept
columns ``K`` are re-fitted by least squares, ``W' = argmin ‖W X − W' X_K‖² = W H_:,K (H_KK + λI)⁻¹``
(``λ = percdamp · mean diag H``).  The producers' pruned rows are zeroed (masks), so the pruned units carry
no signal.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.algorithms.base import register
from prunekit.algorithms.calibration import (
    CONV_TYPES,
    LayerStats,
    PostTraining,
    PostTrainingParams,
    is_hf_conv1d,
    matrix_to_param,
    run_blockwise,
    set_weight_matrix,
    weight_matrix,
)
from prunekit.core.errors import RecipeError
from prunekit.core.groups import CoupledGroup
from prunekit.core.masks import MaskSet
from prunekit.core.targets import find_targets
from prunekit.graph.families import coupled_groups

__all__ = ["OBSStructured", "least_squares_refit", "obs_group_prune", "obs_group_saliency"]

KINDS = ("heads", "neurons", "heads+neurons", "columns")


def _damped(H: Tensor, percdamp: float) -> Tensor:
    H = H.double().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    return H + float(percdamp) * float(H.diagonal().mean()) * torch.eye(H.shape[0], dtype=H.dtype)


def _group_saliency(W: Tensor, Hinv: Tensor, idx: Tensor) -> Tensor:
    """OBS loss of removing each group of columns ``idx`` (``(m, size)`` column indices)."""
    m, size = idx.shape
    Wg = W[:, idx.reshape(-1)].reshape(W.shape[0], m, size).permute(1, 0, 2)    # (m, rows, size)
    B = Hinv[idx[:, :, None], idx[:, None, :]]                                # (m, size, size)
    if size == 1:
        return Wg.pow(2).sum((1, 2)) / B.reshape(m)
    X: Tensor = torch.linalg.solve(B, Wg.transpose(1, 2))                     # (m, size, rows)
    return (Wg * X.transpose(1, 2)).sum((1, 2))


def obs_group_saliency(W: Tensor, Hinv: Tensor, count: int, size: int) -> Tensor:
    """``(count,)`` OBS loss of removing each group of ``size`` consecutive columns (see module doc)."""
    return _group_saliency(W, Hinv, torch.arange(count * size).reshape(count, size))


def least_squares_refit(W: Tensor, H: Tensor, keep_cols: Tensor, percdamp: float = 0.01) -> Tensor:
    """``W H_:,K (H_KK + λI)⁻¹`` on the kept columns ``K``, zeros elsewhere."""
    Hd = _damped(H, percdamp)
    K = keep_cols.nonzero().squeeze(1)
    out = torch.zeros_like(W, dtype=torch.float64)
    if K.numel():
        rhs = (W.double() @ H.double()[:, K]).t()                              # (|K|, rows)
        out[:, K] = torch.linalg.solve(Hd[K][:, K], rhs).t()
    return out.to(W.dtype)


@torch.no_grad()
def obs_group_prune(W: Tensor, H: Tensor, count: int, size: int, n_prune: int, percdamp: float = 0.01,
                    rounds: int = 8) -> tuple[Tensor, Tensor]:
    """Remove ``n_prune`` of the ``count`` column groups of ``W`` (``rows × count·size``); returns the
    least-squares re-fitted weights and the ``(count,)`` group keep-mask.

    The groups go in ``rounds`` batches of (nearly) equal size: each round scores the remaining groups
    by their OBS loss on the current (compensated) ``W`` and ``H⁻¹``, removes the lowest together and applies
    the joint OBS update of that set ``S`` (``W −= W_S [H⁻¹]_SS⁻¹ [H⁻¹]_S,:``, same for ``H⁻¹``, which leaves
    ``H⁻¹`` equal to the inverse of the kept block).  ``rounds=1`` is a single-shot selection; ``rounds >=
    n_prune`` removes one group at a time (greedy OBS).  Cost: ``rounds`` updates of ``O(d² |S|)``."""
    if count * size != W.shape[1]:
        raise RecipeError(f"{count} groups of {size} columns do not tile {W.shape[1]} columns")
    if not 0 <= n_prune <= count:
        raise RecipeError(f"cannot prune {n_prune} of {count} groups")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise RecipeError(f"rounds must be a positive integer, got {rounds!r}")
    Hinv = torch.linalg.inv(_damped(H, percdamp))
    Wc = W.double().clone()
    removed = torch.zeros(count, dtype=torch.bool)
    groups = torch.arange(count * size).reshape(count, size)
    rounds = min(rounds, max(n_prune, 1))
    for r in range(rounds):
        k = (n_prune * (r + 1)) // rounds - (n_prune * r) // rounds
        if k == 0:
            continue
        alive = (~removed).nonzero().squeeze(1)
        sal = _group_saliency(Wc, Hinv, groups[alive])
        pick = alive[torch.argsort(sal, stable=True)[:k]]
        S = groups[pick].reshape(-1)
        Binv = torch.linalg.inv(Hinv[S][:, S])
        HS = Hinv[S, :]
        Wc -= (Wc[:, S] @ Binv) @ HS
        Hinv -= Hinv[:, S] @ (Binv @ HS)
        Wc[:, S] = 0.0
        removed[pick] = True
    keep = ~removed
    return least_squares_refit(W.float(), H, keep.repeat_interleave(size), percdamp), keep


@register
class OBSStructured(PostTraining["OBSStructured.Params"]):
    """``obs_structured``: heads / FFN neurons of HF encoders (``kinds: heads+neurons``) or the input
    columns (conv: input channels) of every target (``kinds: columns``), removed by OBS saliency with
    least-squares reconstruction of the consuming layer.  ``head_sparsity`` / ``neuron_sparsity`` default
    to ``prune.sparsity`` (fraction of groups removed in every layer)."""

    name = "obs_structured"
    hessian = True

    @dataclass
    class Params(PostTrainingParams):
        kinds: str = "heads+neurons"
        head_sparsity: float | None = None
        neuron_sparsity: float | None = None
        percdamp: float = 0.01
        rounds: int = 8                   # selection rounds per layer (1: single-shot; >= groups: greedy)

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.kinds not in KINDS:
                raise RecipeError(f"algorithm.params.kinds must be one of {list(KINDS)}, got {self.kinds!r}")
            for k in ("head_sparsity", "neuron_sparsity"):
                v = getattr(self, k)
                if v is not None and not 0 <= v < 1:
                    raise RecipeError(f"algorithm.params.{k} must be in [0, 1), got {v}")
            if not 0 <= self.percdamp < 1:
                raise RecipeError(f"algorithm.params.percdamp must be in [0, 1), got {self.percdamp}")
            if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
                raise RecipeError(f"algorithm.params.rounds must be a positive integer, got {self.rounds!r}")
            if self.allocation != "uniform":
                raise RecipeError("algorithm.params.allocation: obs_structured supports only 'uniform'")

    def _sparsity(self, kind: str) -> float:
        v = self.params.head_sparsity if kind == "heads" else self.params.neuron_sparsity
        return float(self.spec.sparsity if v is None else v)

    def final_masks(self, model: nn.Module) -> MaskSet:
        batches = self.calibration_batches()
        masks = MaskSet()
        if self.params.kinds == "columns":
            self._columns(model, batches, masks)
        else:
            self._coupled(model, batches, masks)
        return masks

    def _columns(self, model: nn.Module, batches: list[Any], masks: MaskSet) -> None:
        targets = find_targets(model, self.spec.targets)
        sp = float(self.spec.sparsity)

        def prune_block(mods: dict[str, nn.Module], stats: dict[str, LayerStats]) -> None:
            for name, mod in mods.items():
                W = weight_matrix(mod)
                size = math.prod(mod.kernel_size) if isinstance(mod, CONV_TYPES) else 1   # conv: input channels
                count = W.shape[1] // size
                W_new, keep = obs_group_prune(W, stats[name].H, count, size, int(round(sp * count)),
                                              self.params.percdamp, self.params.rounds)
                cols = keep.repeat_interleave(size)[None, :].expand_as(W)
                set_weight_matrix(mod, W_new * cols)
                masks.set(name, matrix_to_param(mod, cols).bool(), "column")

        run_blockwise(model, batches, targets, prune_block)

    def _coupled(self, model: nn.Module, batches: list[Any], masks: MaskSet) -> None:
        kinds = tuple(k for k in ("heads", "neurons") if k in self.params.kinds)
        groups = [g for g in coupled_groups(model, kinds) if self._sparsity(g.kind) > 0]
        params = dict(model.named_parameters())
        modules = dict(model.named_modules())
        consumers: dict[str, list[CoupledGroup]] = {}
        for g in groups:
            name = next(s.tensor for s in g.slices if s.dim == 1)
            consumers.setdefault(name, []).append(g)
        targets = {n: modules[n.removesuffix(".weight")] for n in consumers}

        def prune_block(mods: dict[str, nn.Module], stats: dict[str, LayerStats]) -> None:
            for name, mod in mods.items():
                for g in consumers[name]:
                    self._prune_group(g, mod, stats[name], params, masks)

        run_blockwise(model, batches, targets, prune_block)

    @torch.no_grad()
    def _prune_group(self, g: CoupledGroup, mod: nn.Module, stats: LayerStats, params: dict[str, nn.Parameter],
                     masks: MaskSet) -> None:
        if is_hf_conv1d(mod):
            raise RecipeError("obs_structured heads/neurons support encoder Linear layers only")
        W = weight_matrix(mod)
        n_prune = int(round(self._sparsity(g.kind) * g.count))
        W_new, keep = obs_group_prune(W, stats.H, g.count, next(s.width for s in g.slices if s.dim == 1), n_prune, self.params.percdamp,
                                      self.params.rounds)
        set_weight_matrix(mod, W_new)
        for pname, m in g.element_masks(keep, {n: params[n].shape for n in g.tensors}).items():
            params[pname].mul_(m.to(params[pname].dtype))
            masks.set(pname, m, g.kind)
