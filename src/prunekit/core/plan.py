"""The one-call API: masks for a tensor, masks for a model.

>>> import torch, prunekit
>>> w = torch.tensor([[1., -4., 2., 0.5]])
>>> prunekit.mask_for(w, "unstructured", 0.5)
tensor([[False,  True,  True, False]])
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Callable

from torch import Tensor, nn

from prunekit.core.masks import MaskSet
from prunekit.core.scoring import resolve_score, select_keep_global
from prunekit.core.structures import NM, Pattern, Structure, parse_structure
from prunekit.core.targets import TargetSpec, find_targets

__all__ = ["mask_for", "PruneSpec", "compute_masks", "prune", "validate_overrides"]


def mask_for(weight: Tensor, structure: "str | Structure", sparsity: float, score="l2") -> Tensor:
    """Keep-mask (``torch.bool``, True = kept) of ``weight`` for ``structure`` at ``sparsity``.

    ``score``: ``"l1"``, ``"l2"``, ``"magnitude"``, a callable on the ``(G, S)`` group partition, or an
    element-wise importance tensor of the weight's shape.  For ``unstructured`` every score is |w|."""
    st = parse_structure(structure)
    return st.mask(weight.detach(), sparsity, score)


def _check_fraction(key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{key}: {value} is not a finite number")
    if not (0.0 <= value < 1.0):
        raise ValueError(f"{key}: {value} is out of range (must be >= 0 and < 1)")


def validate_overrides(overrides: dict) -> None:
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

    structure: "str | Structure" = "unstructured"
    sparsity: float = 0.5
    score: "str | Callable" = "l2"
    scope: str = "layer"
    targets: TargetSpec = field(default_factory=TargetSpec)
    overrides: dict = field(default_factory=dict)

    def __post_init__(self):
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

    def layer_plan(self, names) -> dict[str, tuple[Structure, float]]:
        """``{param_name: (structure, sparsity)}`` after overrides."""
        plan = {}
        used = set()
        for n in names:
            st, sp = self.structure, float(self.sparsity)
            for pat, ov in self.overrides.items():
                if fnmatch.fnmatchcase(n, pat) or fnmatch.fnmatchcase(n.removesuffix(".weight"), pat):
                    used.add(pat)
                    if isinstance(ov, dict):
                        st = parse_structure(ov.get("structure", st))
                        sp = float(ov.get("sparsity", sp))
                    else:
                        sp = float(ov)
                    break
            plan[n] = (st, sp)
        unused = set(self.overrides) - used
        if unused:
            raise ValueError(f"prune.overrides patterns {sorted(unused)} match no targeted parameter; "
                             f"targets: {list(names)[:20]}")
        return plan


def compute_masks(model: nn.Module, spec: PruneSpec, sparsity: float | None = None,
                  importance: dict[str, Tensor] | None = None) -> MaskSet:
    """Masks for every target of ``spec`` (``sparsity`` overrides ``spec.sparsity``, scaling overrides
    proportionally — used by schedules).  Pure: the model is not modified."""
    targets = find_targets(model, spec.targets)
    params = dict(model.named_parameters())
    plan = spec.layer_plan(list(targets))
    if sparsity is not None and spec.sparsity > 0:
        f = float(sparsity) / float(spec.sparsity)
        plan = {n: (st, min(sp * f, 0.999999)) for n, (st, sp) in plan.items()}
    elif sparsity is not None:
        plan = {n: (st, float(sparsity)) for n, (st, sp) in plan.items()}
    masks = MaskSet()
    imp = importance or {}
    if spec.scope == "global":
        sts = {str(st) for st, _ in plan.values()}
        if len(sts) != 1 or any(isinstance(st, (NM, Pattern)) for st, _ in plan.values()):
            raise ValueError("global scope needs one group structure (unstructured/row/column/block) for all targets")
        st = next(iter(plan.values()))[0]
        scores, sizes = [], []
        for n in plan:     # on the CPU: one global ranking over tensors that may live on an accelerator
            w = params[n].detach().cpu()
            how = imp.get(n, spec.score)
            scores.append(st.scores(w, how.detach().cpu() if isinstance(how, Tensor) else how))
            sizes.append(st.valid(w.shape).sum(1))
        gsp = float(sparsity if sparsity is not None else spec.sparsity)
        keeps = select_keep_global(scores, sizes, gsp)
        for (n, _), keep in zip(plan.items(), keeps):
            w = params[n]
            m = st.unpartition(st.valid(w.shape) & keep[:, None], w.shape).bool()
            masks.set(n, m.to(w.device), str(st))
        return masks
    for n, (st, sp) in plan.items():
        w = params[n].detach()
        masks.set(n, st.mask(w, sp, imp.get(n, spec.score)), str(st))
    return masks


def prune(model: nn.Module, structure: "str | Structure" = "unstructured", sparsity: float = 0.5, *,
          score="l2", scope: str = "layer", targets: TargetSpec | dict | None = None,
          overrides: dict | None = None, apply: bool = True) -> MaskSet:
    """Prune ``model`` in one call and return its :class:`MaskSet` (weights zeroed if ``apply``).

    Hard-prune the following training with ``masks.attach(model, optimizer)``."""
    if isinstance(targets, dict):
        targets = TargetSpec(**targets)
    spec = PruneSpec(structure, sparsity, score, scope, targets or TargetSpec(), overrides or {})
    masks = compute_masks(model, spec)
    if apply:
        masks.apply(model)
    return masks
