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
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch
from torch import Tensor, nn

from prunekit.core.errors import RecipeError
from prunekit.core.groups import CoupledGroup, units_to_prune
from prunekit.core.masks import MaskSet
from prunekit.core.scoring import Score, ScoreFn, _prune_lowest, group_scores, resolve_score, select_keep_global
from prunekit.core.structures import GroupStructure, Structure, Transposed, parse_structure
from prunekit.core.targets import TargetSpec, find_targets, hf_conv1d

__all__ = ["mask_for", "PruneSpec", "compute_masks", "global_masks", "scaled_sparsity", "prune", "validate_overrides",
           "target_plan", "group_masks", "kept_count"]


def mask_for(weight: Tensor, structure: str | Structure, sparsity: float,
             score: str | ScoreFn | Score | Tensor = "l2") -> Tensor:
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
        raise RecipeError(f"{key}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise RecipeError(f"{key}: {value} is not a finite number")
    if not (0.0 <= value < 1.0):
        raise RecipeError(f"{key}: {value} is out of range (must be >= 0 and < 1)")


def validate_overrides(overrides: dict[str, Any]) -> None:
    """Check ``{pattern: sparsity | {sparsity, structure}}``; ``ValueError`` naming ``overrides[pattern]...``.

    The one validator for per-layer overrides: recipes (:mod:`prunekit.pipelines.recipe`) and :class:`PruneSpec` use it."""
    if not isinstance(overrides, dict):
        raise RecipeError(f"overrides: expected a mapping of name pattern → sparsity, got {overrides!r}")
    for pat, ov in overrides.items():
        key = f"overrides[{pat!r}]"
        if not isinstance(pat, str):
            raise RecipeError(f"{key}: the pattern must be a string")
        if isinstance(ov, dict):
            bad = set(ov) - {"sparsity", "structure"}
            if bad:
                raise RecipeError(f"{key}: unknown keys {sorted(map(str, bad))}; valid: sparsity, structure")
            if "sparsity" in ov:
                _check_fraction(f"{key}.sparsity", ov["sparsity"])
            if "structure" in ov:
                try:
                    parse_structure(ov["structure"])
                except ValueError as e:
                    raise RecipeError(f"{key}.structure: {e}") from None
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
      the first matching pattern wins; patterns are fnmatch on the parameter name (group structures: on
      the group name, e.g. ``heads:*.layer.0.*``, with or without its ``kind:`` prefix).

    Group structures (``channels``, ``heads``, ``kv_groups``, ``neurons``, ``heads+neurons``; see
    :class:`~prunekit.core.structures.GroupStructure`) also use:

    * ``groups``: the model's coupled groups (:func:`prunekit.graph.coupled_groups`);
    * ``min_keep``: units kept at least in every group (default 1);
    * ``multiple_of``: kept counts rounded to a multiple of this (e.g. 8 for tensor cores);
    * ``uniform``: every group of a kind keeps the same count (global scope: the mean of the ranking's);
    * ``ignore``: group name patterns left dense.  Groups with ``removable=False`` are never pruned.
    """

    structure: str | Structure = "unstructured"
    sparsity: float = 0.5
    score: str | ScoreFn | Score = "l2"
    scope: str = "layer"
    targets: TargetSpec = field(default_factory=TargetSpec)
    overrides: dict[str, Any] = field(default_factory=dict)
    groups: list[CoupledGroup] | None = field(default=None, repr=False, compare=False)
    min_keep: int = 1
    multiple_of: int = 1
    uniform: bool = False
    ignore: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.structure = parse_structure(self.structure)
        for k, lo in (("min_keep", 1), ("multiple_of", 1)):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"prune.{k} must be an integer >= {lo}; got {v!r}")
        if not isinstance(self.uniform, bool):
            raise ValueError(f"prune.uniform must be true or false; got {self.uniform!r}")
        if isinstance(self.ignore, str) or not all(isinstance(p, str) for p in self.ignore):
            raise ValueError(f"prune.ignore must be a list of group name patterns; got {self.ignore!r}")
        self.ignore = list(self.ignore)
        if not self.st.coupled and (self.min_keep != 1 or self.multiple_of != 1 or self.uniform or self.ignore):
            raise ValueError(f"prune.min_keep/multiple_of/uniform/ignore apply to group structures "
                             f"(channels, heads, kv_groups, neurons), not {self.structure}")
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise RecipeError(f"prune.sparsity must be a number in [0, 1); got {self.sparsity!r}")
        if not (0.0 <= float(self.sparsity) < 1.0):
            raise RecipeError(f"prune.sparsity must be in [0, 1); got {self.sparsity}")
        if self.scope not in ("layer", "global"):
            raise RecipeError(f"prune.scope must be 'layer' or 'global'; got {self.scope!r}")
        resolve_score(self.score)
        try:
            validate_overrides(self.overrides)
        except ValueError as e:
            raise RecipeError(f"prune.{e}") from None

    @property
    def st(self) -> Structure:
        """``structure`` as a :class:`Structure` (``__post_init__`` parses a string; this is that object)."""
        return parse_structure(self.structure)

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
            st, sp = self.st, float(self.sparsity)
            for pat, ov in self.overrides.items():
                if fnmatch.fnmatchcase(n, pat) or fnmatch.fnmatchcase(n.removesuffix(".weight"), pat):
                    used.add(pat)
                    if isinstance(ov, dict):
                        st = parse_structure(ov.get("structure", st))
                        sp = float(ov.get("sparsity", sp))
                    else:
                        sp = float(ov)
                    break
            st = Transposed(st) if n in transposed and not isinstance(st, Transposed) else st
            plan[n] = (st, sp if sparsity is None else scaled_sparsity(sp, self.sparsity, sparsity))
        unused = set(self.overrides) - used
        if unused:
            raise RecipeError(f"prune.overrides patterns {sorted(unused)} match no targeted parameter; "
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
        return replace(self, sparsity=float(sparsity), overrides=ov)

    # -- group structures ------------------------------------------------------------------------
    def _group_override(self, g: CoupledGroup) -> tuple[str | None, float]:
        for pat, ov in self.overrides.items():
            if _group_match(g, pat):
                if isinstance(ov, dict):
                    if "structure" in ov:
                        raise ValueError(f"prune.overrides[{pat!r}]: a group structure's overrides set only sparsity")
                    return pat, float(ov.get("sparsity", self.sparsity))
                return pat, float(ov)
        return None, float(self.sparsity)

    def group_plan(self, target_names: Iterable[str] | None = None, sparsity: float | None = None
                   ) -> tuple[list[tuple[CoupledGroup, float, bool]], dict[str, str]]:
        """Group structures: ``([(group, sparsity, overridden)], {skipped group: why})`` for the groups of
        the structure's kinds; skipped: not removable (with the graph's reason), ``ignore`` d, or (with
        ``target_names``, parameter names) no producing layer among the targets."""
        if not self.st.coupled:
            raise ValueError(f"{self.structure} is not a group structure")
        if self.groups is None:
            raise ValueError(f"structure {self.structure} needs the model's coupled groups: PruneSpec(groups="
                             "prunekit.graph.coupled_groups(model, example_inputs)), or prunekit.prune(model, "
                             f"'{self.structure}', sparsity, example_inputs=...)")
        kinds = cast(GroupStructure, self.st).kinds
        names = set(target_names) if target_names is not None else None
        plan: list[tuple[CoupledGroup, float, bool]] = []
        skipped: dict[str, str] = {}
        used: set[str] = set()
        for g in self.groups:
            if g.kind not in kinds:
                continue
            if not g.removable:
                skipped[g.name] = f"not removable: {g.reason}"
                continue
            if any(_group_match(g, p) for p in self.ignore):
                skipped[g.name] = "ignored (prune.ignore)"
                continue
            if names is not None and g.producers and not any(f"{m}.weight" in names for m in g.producers):
                skipped[g.name] = _NOT_TARGETED
                continue
            pat, sp = self._group_override(g)
            if pat is not None:
                used.add(pat)
            plan.append((g, sp if sparsity is None else scaled_sparsity(sp, self.sparsity, sparsity), pat is not None))
        outside = [n for n, why in skipped.items() if why == _NOT_TARGETED]
        if not plan and outside:
            raise RecipeError(f"prune.targets include={self.targets.include} exclude={self.targets.exclude} hold no "
                              f"producing layer of any {'/'.join(kinds)} group, so nothing would be pruned; groups: "
                              f"{outside[:10]}{' …' if len(outside) > 10 else ''}")
        unused = set(self.overrides) - used
        if unused:
            raise ValueError(f"prune.overrides patterns {sorted(unused)} match no prunable group; groups: "
                             f"{[g.name for g, _, _ in plan][:20]}")
        return plan, skipped


_NOT_TARGETED = "no producing layer among prune.targets"


def _group_match(g: CoupledGroup, pattern: str) -> bool:
    bare = g.name.split(":", 1)[1] if ":" in g.name else g.name
    return fnmatch.fnmatchcase(g.name, pattern) or fnmatch.fnmatchcase(bare, pattern)


def kept_count(count: int, kept: int, min_keep: int = 1, multiple_of: int = 1) -> int:
    """Units a group of ``count`` keeps when selection wants ``kept``: rounded to the nearest multiple of
    ``multiple_of`` (at least one multiple), at least ``min_keep``, at most ``count``."""
    k = int(kept)
    if multiple_of > 1:
        k = max(multiple_of, int(round(k / multiple_of)) * multiple_of)
    return int(min(count, max(k, min_keep, 1)))


def _masked_tensors(g: CoupledGroup, params: Mapping[str, Tensor]) -> list[str]:
    """The tensors of ``g`` that get masks: its parameters of 2+ dims (Linear/Conv/embedding weights);
    biases, norm parameters and buffers ride along (compaction removes them with the unit)."""
    return [t for t in g.tensors if t in params and params[t].dim() >= 2]


def _group_scores(g: CoupledGroup, params: Mapping[str, Tensor], importance: Mapping[str, Tensor],
                  score: str | ScoreFn | Score) -> Tensor:
    names = _masked_tensors(g, params)
    src = {n: (importance[n] if n in importance else params[n]).detach() for n in names}
    sc = resolve_score("l2") if any(n in importance for n in names) else resolve_score(score)
    return group_scores(g.partition(src, only=names), sc)


def group_masks(spec: PruneSpec, params: Mapping[str, Tensor], sparsity: float | None = None,
                importance: Mapping[str, Tensor] | None = None, target_names: Iterable[str] | None = None) -> MaskSet:
    """Masks of a group structure (see :class:`PruneSpec`): every unit scored with ``spec.score`` over
    all its coupled weight slices (:meth:`CoupledGroup.partition`; element-wise ``importance`` → l2),
    selected per group (layer scope; overrides by group name) or by one ranking per kind over all
    groups (global scope; overridden groups stay per group), counts adjusted by ``min_keep`` /
    ``multiple_of`` / ``uniform``, then :meth:`CoupledGroup.element_masks`."""
    imp = dict(importance or {})
    plan, _ = spec.group_plan(target_names, sparsity)
    scores = {g.name: _group_scores(g, params, imp, spec.score) for g, _, _ in plan}
    want: dict[str, int] = {}
    ranked = [(g, sp) for g, sp, ov in plan if spec.scope == "global" and not ov]
    local = [(g, sp) for g, sp, ov in plan if not (spec.scope == "global" and not ov)]
    pruned = units_to_prune(local)
    want.update({g.name: g.count - pruned[g.name] for g, _ in local})
    gsp = float(spec.sparsity if sparsity is None else sparsity)
    for kind in dict.fromkeys(g.kind for g, _ in ranked):
        gs = [g for g, _ in ranked if g.kind == kind]
        flat = torch.cat([scores[g.name] for g in gs])
        keep = _prune_lowest(flat, int(round(gsp * flat.numel())))
        i = 0
        for g in gs:
            want[g.name] = int(keep[i:i + g.count].sum())
            i += g.count
    if spec.uniform:
        for kind in dict.fromkeys(g.kind for g, _, _ in plan):
            gs = [g for g, _, _ in plan if g.kind == kind]
            mean = int(round(sum(want[g.name] for g in gs) / len(gs)))
            for g in gs:
                want[g.name] = mean
    masks = MaskSet()
    for g, _, _ in plan:
        k = kept_count(g.count, want[g.name], spec.min_keep, spec.multiple_of)
        keep = _prune_lowest(scores[g.name], g.count - k)
        names = _masked_tensors(g, params)
        for n, m in g.element_masks(keep, {n: tuple(params[n].shape) for n in names}).items():
            m = m.to(params[n].device)
            if n in masks:
                masks.set(n, masks[n] & m, _kinds(masks.structures.get(n), g.kind))
            else:
                masks.set(n, m, g.kind)
    return masks


def _kinds(old: str | None, kind: str) -> str:
    ks = list(dict.fromkeys((old.split("+") if old else []) + [kind]))
    return "+".join(ks)


def target_plan(model: nn.Module, spec: PruneSpec, sparsity: float | None = None) -> dict[str, tuple[Structure, float]]:
    """``{tensor: (structure, sparsity)}`` of every tensor ``spec`` masks in ``model``: the targets'
    :meth:`PruneSpec.layer_plan`, or for a group structure the weights of its prunable groups."""
    targets = find_targets(model, spec.targets)
    if not spec.st.coupled:
        return spec.layer_plan(targets, sparsity)
    params = dict(model.named_parameters())
    out: dict[str, tuple[Structure, float]] = {}
    for g, sp, _ in spec.group_plan(targets, sparsity)[0]:
        for n in _masked_tensors(g, params):
            out.setdefault(n, (spec.st, sp))
    return out


def global_masks(plan: dict[str, tuple[Structure, float]], weights: dict[str, Tensor], sparsity: float,
                 score: str | ScoreFn | Score = "l2", importance: dict[str, Tensor] | None = None,
                 base: MaskSet | None = None) -> MaskSet:
    """Global scope: one ranking over the groups of every planned tensor (one whole-group structure
    for all), ``round(sparsity * weights)`` weights pruned overall; ``base`` masks stay kept."""
    sts = {str(_unwrapped(st)) for st, _ in plan.values()}
    if len(sts) != 1 or not next(iter(plan.values()))[0].selects_groups:
        raise RecipeError("global scope needs one group structure (unstructured/row/column/block) for all targets")
    imp = importance or {}
    scores, sizes = [], []
    for n, (st, _) in plan.items():   # each tensor's own orientation (an HF Conv1D's is Transposed)
        sc = st.scores(weights[n], imp.get(n, score))
        if base is not None:
            sc = sc.masked_fill(st.partition(base[n].to(torch.uint8)).sum(1) > 0, math.inf)
        scores.append(sc)
        sizes.append(st.valid(weights[n].shape).sum(1))
    masks = MaskSet()
    for (n, (st, _)), keep in zip(plan.items(), select_keep_global(scores, sizes, sparsity)):
        shape = weights[n].shape
        m = st.unpartition(st.valid(shape) & keep[:, None], shape).bool()
        if base is not None and bool((base[n] & ~m).any()):
            raise RecipeError(f"global sparsity {sparsity} keeps fewer weights than the sparser level; levels must get denser")
        masks.set(n, m, str(st))
    return masks


def _unwrapped(st: Structure) -> Structure:
    return st.inner if isinstance(st, Transposed) else st


def compute_masks(model: nn.Module, spec: PruneSpec, sparsity: float | None = None,
                  importance: dict[str, Tensor] | None = None) -> MaskSet:
    """Masks for every target of ``spec`` (``sparsity`` overrides ``spec.sparsity``, scaling overrides
    proportionally — used by schedules).  Pure: the model is not modified."""
    targets = find_targets(model, spec.targets)
    params = {n: p.detach() for n, p in model.named_parameters()}
    imp = importance or {}
    if spec.st.coupled:
        return group_masks(spec, params, sparsity, imp, targets)
    plan = spec.layer_plan(targets, sparsity)
    if spec.scope == "global":
        gsp = float(sparsity if sparsity is not None else spec.sparsity)
        return global_masks(plan, params, gsp, spec.score, imp)
    masks = MaskSet()
    for n, (st, sp) in plan.items():
        masks.set(n, st.mask(params[n], sp, imp.get(n, spec.score)), str(st))
    return masks


def prune(model: nn.Module, structure: str | Structure = "unstructured", sparsity: float = 0.5, *,
          score: str | ScoreFn | Score = "l2", scope: str = "layer", targets: TargetSpec | dict[str, Any] | None = None,
          overrides: dict[str, Any] | None = None, apply: bool = True, groups: list[CoupledGroup] | None = None,
          **group_options: Any) -> MaskSet:
    """Prune ``model`` in one call and return its :class:`MaskSet` (weights zeroed if ``apply``).

    Group structures need ``groups`` (``prunekit.prune`` finds them from ``example_inputs``);
    ``group_options``: ``min_keep``, ``multiple_of``, ``uniform``, ``ignore`` (see :class:`PruneSpec`).
    Hard-prune the following training with ``masks.attach(model, optimizer)``."""
    spec = PruneSpec(structure, sparsity, score, scope, TargetSpec.of(targets), overrides or {}, groups=groups,
                     **group_options)
    masks = compute_masks(model, spec)
    if apply:
        masks.apply(model)
    return masks
