"""The one-call API: masks for a tensor, masks for a model.

>>> import torch, prunekit
>>> w = torch.tensor([[1., -4., 2., 0.5]])
>>> prunekit.mask_for(w, "unstructured", 0.5)
tensor([[False,  True,  True, False]])
"""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.core.masks import MaskSet
from prunekit.core.scoring import Score, ScoreFn, resolve_score, select_keep_global
from prunekit.core.structures import Structure, Transposed, parse_structure
from prunekit.core.targets import TargetSpec, find_targets, hf_conv1d

__all__ = ["mask_for", "PruneSpec", "compute_masks", "global_masks", "scaled_sparsity", "prune", "validate_overrides"]


def mask_for(weight: Tensor, structure: str | Structure, sparsity: float,
             score: str | ScoreFn | Tensor | Score = "l2") -> Tensor:
    """Keep-mask (``torch.bool``, True = kept) of ``weight`` for ``structure`` at ``sparsity``.

    ``score``: ``"l1"``, ``"l2"``, ``"magnitude"``, a callable on the ``(G, S)`` group partition, or an
    element-wise importance tensor of the weight's shape.  For ``unstructured`` every score is |w|."""
    st = parse_structure(structure)
    return st.mask(weight.detach(), sparsity, score)


def scaled_sparsity(layer_sparsity: float, spec_sparsity: float, sparsity: float) -> float:
    """The one override-scaling rule: a layer at ``layer_sparsity`` under a spec at ``spec_sparsity``,
    when the whole spec is moved to ``sparsity`` (schedules, shared-weight levels): proportionally
    (capped below 1); with ``spec_sparsity == 0`` every layer gets ``sparsity``."""
    if spec_sparsity > 0:
        return min(float(layer_sparsity) * float(sparsity) / float(spec_sparsity), 0.999999)
    return float(sparsity)


def _check_fraction(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{key}: {value} is not a finite number")
    if not (0.0 <= value < 1.0):
        raise ValueError(f"{key}: {value} is out of range (must be >= 0 and < 1)")


def validate_overrides(overrides: dict[str, Any]) -> None:
    """Check ``{pattern: sparsity | {sparsity, structure}}``; ``ValueError`` naming ``overrides[pattern]...``.

    The one validator for per-layer overrides: recipes (:mod:`prunekit.pipelines.recipe`) and :class:`PruneSpec` use it."""
    if not isinstance(overrides, dict):
        raise ValueError(f"overrides: expected a mapping of name pattern → sparsity, got {overrides!r}")
    for pat, ov in overrides.items():
        key = f"overrides[{pat!r}]"
        if not isinstance(pat, str):
            raise ValueError(f"{key}: the pattern must be a string")
        if isinstance(ov, dict):
            bad = set(ov) - {"sparsity", "structure"}
            if bad:
                raise ValueError(f"{key}: unknown keys {sorted(map(str, bad))}; valid: sparsity, structure")
            if "sparsity" in ov:
                _check_fraction(f"{key}.sparsity", ov["sparsity"])
            if "structure" in ov:
                try:
                    parse_structure(ov["structure"])
                except ValueError as e:
                    raise ValueError(f"{key}.structure: {e}") from None
        else:
            _check_fraction(key, ov)


@dataclass
class PruneSpec:
    """What to prune and how much.

    * ``structure``: a structure string or object, used for every target unless overridden.
    * ``sparsity``: fraction of zeros per targeted layer (layer scope) or over all targets (global).
    * ``scope``: ``"layer"`` — the same ratio in every targeted layer (default); ``"global"`` — one
      ranking over all targets' groups (scores must be comparable across layers).
    * ``overrides``: ``{name_pattern: sparsity}`` or ``{name_pattern: {sparsity:, structure:}}`` per layer;
      the first matching pattern wins; patterns are fnmatch on the parameter name.
    """

    structure: str | Structure = "unstructured"
    sparsity: float = 0.5
    score: str | ScoreFn | Score = "l2"
    scope: str = "layer"
    targets: TargetSpec = field(default_factory=TargetSpec)
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.structure = parse_structure(self.structure)
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise ValueError(f"prune.sparsity must be a number in [0, 1); got {self.sparsity!r}")
        if not (0.0 <= float(self.sparsity) < 1.0):
            raise ValueError(f"prune.sparsity must be in [0, 1); got {self.sparsity}")
        if self.scope not in ("layer", "global"):
            raise ValueError(f"prune.scope must be 'layer' or 'global'; got {self.scope!r}")
        resolve_score(self.score)
        try:
            validate_overrides(self.overrides)
        except ValueError as e:
            raise ValueError(f"prune.{e}") from None

    def layer_plan(self, names: Iterable[str] | Mapping[str, nn.Module], sparsity: float | None = None) -> dict[str, tuple[Structure, float]]:
        """``{param_name: (structure, sparsity)}`` after overrides; ``sparsity`` moves the whole spec
        there (overrides scaled by :func:`scaled_sparsity`).  ``names``: parameter names, or the
        ``{name: module}`` of :func:`find_targets` — then an HF ``Conv1D`` weight (stored ``(in, out)``)
        gets its structure as :class:`Transposed`, so rows stay outputs and N:M runs along the input."""
        plan: dict[str, tuple[Structure, float]] = {}
        conv1d = hf_conv1d() if isinstance(names, Mapping) else None
        transposed: set[str] = set()
        if conv1d is not None and isinstance(names, Mapping):
            transposed = {n for n, m in names.items() if isinstance(m, conv1d)}
        used: set[str] = set()
        for n in names:
            st, sp = parse_structure(self.structure), float(self.sparsity)
            for pat, ov in self.overrides.items():
                if fnmatch.fnmatchcase(n, pat) or fnmatch.fnmatchcase(n.removesuffix(".weight"), pat):
                    used.add(pat)
                    if isinstance(ov, dict):
                        st = parse_structure(ov.get("structure", st))
                        sp = float(ov.get("sparsity", sp))
                    else:
                        sp = float(ov)
                    break
            st = Transposed(st) if n in transposed else st
            plan[n] = (st, sp if sparsity is None else scaled_sparsity(sp, self.sparsity, sparsity))
        unused = set(self.overrides) - used
        if unused:
            raise ValueError(f"prune.overrides patterns {sorted(unused)} match no targeted parameter; "
                             f"targets: {list(names)[:20]}")
        return plan

    def at(self, sparsity: float) -> PruneSpec:
        """This spec moved to ``sparsity``, its overrides' sparsities scaled by :func:`scaled_sparsity`."""
        ov: dict[str, Any] = {}
        for pat, o in self.overrides.items():
            if isinstance(o, dict):
                ov[pat] = ({**o, "sparsity": scaled_sparsity(o["sparsity"], self.sparsity, sparsity)}
                           if "sparsity" in o else dict(o))
            else:
                ov[pat] = scaled_sparsity(o, self.sparsity, sparsity)
        return PruneSpec(self.structure, float(sparsity), self.score, self.scope, self.targets, ov)


def global_masks(plan: dict[str, tuple[Structure, float]], weights: dict[str, Tensor], sparsity: float,
                 score: str | ScoreFn | Score = "l2", importance: dict[str, Tensor] | None = None,
                 base: MaskSet | None = None) -> MaskSet:
    """Global scope: one ranking over the groups of every planned tensor (one whole-group structure
    for all), ``round(sparsity * weights)`` weights pruned overall; ``base`` masks stay kept."""
    sts = {str(st) for st, _ in plan.values()}
    st = next(iter(plan.values()))[0]
    if len(sts) != 1 or not st.selects_groups:
        raise ValueError("global scope needs one group structure (unstructured/row/column/block) for all targets")
    imp = importance or {}
    scores, sizes = [], []
    for n in plan:
        sc = st.scores(weights[n], imp.get(n, score))
        if base is not None:
            sc = sc.masked_fill(st.partition(base[n].to(torch.uint8)).sum(1) > 0, math.inf)
        scores.append(sc)
        sizes.append(st.valid(weights[n].shape).sum(1))
    masks = MaskSet()
    for n, keep in zip(plan, select_keep_global(scores, sizes, sparsity)):
        shape = weights[n].shape
        m = st.unpartition(st.valid(shape) & keep[:, None], shape).bool()
        if base is not None and bool((base[n] & ~m).any()):
            raise ValueError(f"global sparsity {sparsity} keeps fewer weights than the sparser level; levels must get denser")
        masks.set(n, m, str(st))
    return masks


def compute_masks(model: nn.Module, spec: PruneSpec, sparsity: float | None = None,
                  importance: dict[str, Tensor] | None = None) -> MaskSet:
    """Masks for every target of ``spec`` (``sparsity`` overrides ``spec.sparsity``, scaling overrides
    proportionally — used by schedules).  Pure: the model is not modified."""
    targets = find_targets(model, spec.targets)
    params = {n: p.detach() for n, p in model.named_parameters()}
    plan = spec.layer_plan(targets, sparsity)
    imp = importance or {}
    if spec.scope == "global":
        gsp = float(sparsity if sparsity is not None else spec.sparsity)
        return global_masks(plan, params, gsp, spec.score, imp)
    masks = MaskSet()
    for n, (st, sp) in plan.items():
        masks.set(n, st.mask(params[n], sp, imp.get(n, spec.score)), str(st))
    return masks


def prune(model: nn.Module, structure: str | Structure = "unstructured", sparsity: float = 0.5, *,
          score: str | ScoreFn | Score = "l2", scope: str = "layer", targets: TargetSpec | dict[str, Any] | None = None,
          overrides: dict[str, Any] | None = None, apply: bool = True) -> MaskSet:
    """Prune ``model`` in one call and return its :class:`MaskSet` (weights zeroed if ``apply``).

    Hard-prune the following training with ``masks.attach(model, optimizer)``."""
    if isinstance(targets, dict):
        targets = TargetSpec(**targets)
    spec = PruneSpec(structure, sparsity, score, scope, targets or TargetSpec(), overrides or {})
    masks = compute_masks(model, spec)
    if apply:
        masks.apply(model)
    return masks
