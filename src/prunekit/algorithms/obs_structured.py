"""OBS-style structured post-training pruning of coupled groups with least-squares reconstruction.

A structured group (an FFN neuron, an attention head, a GQA KV group, an input column of a Linear, an input
channel of a Conv2d) is a set of *input columns* of one consuming layer (the FFN down projection, the
attention output projection, the layer itself) plus, for neurons, heads and KV groups, the rows of the
producing layers.  Those groups are the model's coupled groups from its traced graph
(:func:`prunekit.graph.coupled_groups` on the first calibration batch — the same groups pruning, group
structures and compaction use), so BERT-family encoders, GPT-2 (HF ``Conv1D``: the consumer's *rows*),
Llama/Qwen2 (KV groups, gated MLPs) and any traceable model work alike, and the result compacts.  Removing group ``G`` from the consumer ``W`` (input Hessian ``H = 2/n X Xᵀ``)
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
    MakePruneBlock,
    PostTraining,
    PostTrainingParams,
    PruneBlock,
    is_hf_conv1d,
    matrix_to_param,
    model_inputs,
    run_blockwise,
    set_weight_matrix,
    weight_matrix,
)
from prunekit.core.errors import RecipeError
from prunekit.core.groups import CoupledGroup, Slice, units_to_prune
from prunekit.core.masks import MaskSet
from prunekit.core.structures import Column, Transposed
from prunekit.core.targets import find_targets
from prunekit.graph import coupled_groups

__all__ = ["OBSStructured", "least_squares_refit", "obs_group_prune", "obs_group_saliency", "consumer_slice"]

KINDS = ("heads", "neurons", "heads+neurons", "columns")


def _damped(H: Tensor, percdamp: float) -> Tensor:
    H = H.double().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    return H + float(percdamp) * float(H.diagonal().mean()) * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)


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
    return _group_saliency(W, Hinv, torch.arange(count * size, device=W.device).reshape(count, size))


def least_squares_refit(W: Tensor, H: Tensor, keep_cols: Tensor, percdamp: float = 0.01) -> Tensor:
    """``W H_:,K (H_KK + λI)⁻¹`` on the kept columns ``K``, zeros elsewhere."""
    H = H.to(W.device)
    Hd = _damped(H, percdamp)
    K = keep_cols.to(W.device).nonzero().squeeze(1)
    out = torch.zeros_like(W, dtype=torch.float64)
    if K.numel():
        rhs = (W.double() @ H.double()[:, K]).t()                              # (|K|, rows)
        out[:, K] = torch.linalg.solve(Hd[K][:, K], rhs).t()
    return out.to(W.dtype)


@torch.no_grad()
def obs_group_prune(W: Tensor, H: Tensor, count: int, size: int, n_prune: int, percdamp: float = 0.01,
                    rounds: int = 8, offset: int = 0) -> tuple[Tensor, Tensor]:
    """Remove ``n_prune`` of the ``count`` column groups of ``W`` (group ``g`` = columns ``offset + g·size``
    to ``offset + (g+1)·size``; other columns are kept); returns the least-squares re-fitted weights and
    the ``(count,)`` group keep-mask.

    The groups go in ``rounds`` batches of (nearly) equal size: each round scores the remaining groups
    by their OBS loss on the current (compensated) ``W`` and ``H⁻¹``, removes the lowest together and applies
    the joint OBS update of that set ``S`` (``W −= W_S [H⁻¹]_SS⁻¹ [H⁻¹]_S,:``, same for ``H⁻¹``, which leaves
    ``H⁻¹`` equal to the inverse of the kept block).  ``rounds=1`` is a single-shot selection; ``rounds >=
    n_prune`` removes one group at a time (greedy OBS).  Cost: ``rounds`` updates of ``O(d² |S|)``."""
    if offset < 0 or offset + count * size > W.shape[1]:
        raise RecipeError(f"{count} groups of {size} columns at offset {offset} do not fit {W.shape[1]} columns")
    if not 0 <= n_prune <= count:
        raise RecipeError(f"cannot prune {n_prune} of {count} groups")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise RecipeError(f"rounds must be a positive integer, got {rounds!r}")
    H = H.to(W.device)                                    # statistics may live on CPU while the block is on a GPU
    Hinv = torch.linalg.inv(_damped(H, percdamp))
    Wc = W.double().clone()
    removed = torch.zeros(count, dtype=torch.bool, device=W.device)
    groups = offset + torch.arange(count * size, device=W.device).reshape(count, size)
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
    cols = torch.ones(W.shape[1], dtype=torch.bool)
    cols[offset:offset + count * size] = keep.repeat_interleave(size)
    return least_squares_refit(W.float(), H, cols, percdamp), keep


@register
class OBSStructured(PostTraining["OBSStructured.Params"]):
    """``obs_structured``: attention heads (GQA models: KV groups) / FFN neurons from the traced graph
    (``kinds: heads+neurons``; groups whose producing layer is a target) or the input columns (conv: input
    channels) of every target (``kinds: columns``), removed by OBS saliency with least-squares
    reconstruction of the consuming layer.  ``head_sparsity`` (heads and KV groups) / ``neuron_sparsity``
    default to ``prune.sparsity`` (fraction of groups removed in every layer, ``round(sparsity * count)``;
    a count that rounds to zero warns)."""

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
        v = self.params.neuron_sparsity if kind == "neurons" else self.params.head_sparsity
        return float(self.spec.sparsity if v is None else v)

    def final_masks(self, model: nn.Module) -> MaskSet:
        batches = self.calibration_batches()
        masks = MaskSet()
        targets, make_prune_block = self.block_pruner(model, batches)
        run_blockwise(model, batches, targets, make_prune_block(masks))
        return masks

    def block_pruner(self, model: nn.Module, batches: list[Any]) -> tuple[dict[str, nn.Module], MakePruneBlock]:
        """As :meth:`PostTraining.block_pruner` (heads/neurons need the traced graph of the whole model, so only
        ``kinds: columns`` runs offloaded)."""
        if self.params.kinds == "columns":
            return find_targets(model, self.spec.targets), self._columns
        return self._coupled(model, batches)

    def _columns(self, masks: MaskSet) -> PruneBlock:
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
                masks.set(name, matrix_to_param(mod, cols).bool(), str(Transposed(Column()) if is_hf_conv1d(mod) else Column()))
        return prune_block

    def _coupled(self, model: nn.Module, batches: list[Any]) -> tuple[dict[str, nn.Module], MakePruneBlock]:
        modules = dict(model.named_modules())
        consumers: dict[str, list[tuple[CoupledGroup, Slice, int]]] = {}
        for g, n_prune in self._groups(model, batches).items():
            name, s = consumer_slice(g, modules)
            consumers.setdefault(name, []).append((g, s, n_prune))
        targets = {n: modules[n.removesuffix(".weight")] for n in consumers}

        def make(masks: MaskSet) -> PruneBlock:
            def prune_block(mods: dict[str, nn.Module], stats: dict[str, LayerStats]) -> None:
                params = dict(model.named_parameters())
                for name, mod in mods.items():
                    for g, s, n_prune in consumers[name]:
                        self._prune_group(g, s, n_prune, mod, stats[name], params, masks)
            return prune_block
        return targets, make

    def _groups(self, model: nn.Module, batches: list[Any]) -> dict[CoupledGroup, int]:
        """The removable coupled groups of the asked kinds from the model's traced graph (on the first
        calibration batch) whose producing layer is a target, with the units to prune in each."""
        kinds = (("heads", "kv_groups") if "heads" in self.params.kinds else ()) + \
            (("neurons",) if "neurons" in self.params.kinds else ())
        found = coupled_groups(model, model_inputs(batches[0]), kinds)
        names = set(self.targets(model))
        planned = [(g, self._sparsity(g.kind)) for g in found
                   if g.removable and any(f"{m}.weight" in names for m in g.producers)]
        if not planned:
            raise RecipeError(f"obs_structured: no removable {'/'.join(kinds)} groups with a producing layer among "
                              f"prune.targets in the traced {type(model).__name__} (groups found: "
                              f"{[g.name for g in found][:8]})")
        counts = units_to_prune([(g, sp) for g, sp in planned if sp > 0])
        return {g: counts[g.name] for g, sp in planned if sp > 0}

    @torch.no_grad()
    def _prune_group(self, g: CoupledGroup, s: Slice, n_prune: int, mod: nn.Module, stats: LayerStats,
                     params: dict[str, nn.Parameter], masks: MaskSet) -> None:
        W = weight_matrix(mod)                  # (out, in): the group's units are input columns
        W_new, keep = obs_group_prune(W, stats.H, g.count, s.width, n_prune, self.params.percdamp,
                                      self.params.rounds, s.offset)
        set_weight_matrix(mod, W_new)
        weights = [t for t in g.tensors if t in params and params[t].dim() >= 2]   # as compute_masks: biases ride along
        for pname, m in g.element_masks(keep, {n: params[n].shape for n in weights}).items():
            params[pname].mul_(m.to(params[pname].dtype))
            old = masks.structures.get(pname)
            masks.update(pname, m, g.kind if old in (None, g.kind) else f"{old}+{g.kind}")


def consumer_slice(g: CoupledGroup, modules: dict[str, nn.Module]) -> tuple[str, Slice]:
    """``(weight name, slice)`` of the one layer that reads ``g``'s units as its input features (a Linear's
    columns, an HF Conv1D's rows: the attention output / FFN down projection) — the layer OBS re-fits."""
    found = []
    for s in g.slices:
        mod_name, _, attr = s.tensor.rpartition(".")
        mod = modules.get(mod_name)
        if attr == "weight" and ((isinstance(mod, nn.Linear) and s.dim == 1) or
                                 (mod is not None and is_hf_conv1d(mod) and s.dim == 0)):
            found.append((s.tensor, s))
    if len(found) != 1:
        raise RecipeError(f"obs_structured: group {g.name} is read by {len(found)} Linear/Conv1D layers "
                          f"({[t for t, _ in found]}); OBS re-fits exactly one consuming layer")
    return found[0]
