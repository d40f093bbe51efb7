"""Which parameters are pruned: module-name patterns and module types.

A :class:`TargetSpec` selects ``<module>.weight`` parameters of modules whose *type* is in ``types``
and whose *qualified name* matches one of ``include`` (shell-style ``fnmatch`` patterns, or regular
expressions written as ``re:...``) and none of ``exclude``.  Every include pattern must match at least
one module; one that matches nothing is an error that lists the candidates.  Exclude patterns may name
the module (``fc2``) or its parameter (``fc2.weight``); one that matches nothing is an error too.

**Default targets** (``include: ["*"]`` and no ``exclude``, :attr:`TargetSpec.is_default`) are the same in every
entry point (``prunekit.prune``, ``compute_masks``, ``Pruner`` with a spec dict or a recipe, ``prunekit run``):
on a model with lists of repeated blocks (a transformer: :func:`block_lists`) they are the Linear / HF
``Conv1D`` layers inside those blocks, so embeddings, the LM head (tied or not), the pooler and the
classifier stay dense unless asked for by name (e.g. ``include: ["model.layers.*", "lm_head"]``);
on any other model (a CNN, an MLP) every layer of the allowed types.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from prunekit.core.errors import RecipeError

__all__ = ["DEFAULT_TYPES", "TargetSpec", "find_targets", "MODULE_TYPES", "linear_types", "hf_conv1d", "block_lists", "block_targets",
           "resolve_targets"]

MODULE_TYPES: dict[str, type[nn.Module]] = {
    "Linear": nn.Linear,
    "Conv2d": nn.Conv2d,
    "Conv1d": nn.Conv1d,
    "Conv3d": nn.Conv3d,
}
# HF GPT-2 style Conv1D is registered lazily (transformers is optional)
DEFAULT_TYPES: tuple[str, ...] = ("Linear", "Conv1d", "Conv2d", "Conv3d", "HFConv1D")
"""Module types targeted unless a spec names others: every weight layer prunekit can partition."""


def hf_conv1d() -> type[nn.Module] | None:
    """HF GPT-2's ``Conv1D`` (a Linear whose weight is stored ``(in, out)``), or None without transformers."""
    if "HFConv1D" not in MODULE_TYPES:
        try:
            from transformers.pytorch_utils import Conv1D  # noqa: PLC0415  (optional dependency)
        except ImportError:  # pragma: no cover - transformers absent
            return None
        MODULE_TYPES["HFConv1D"] = Conv1D
    return MODULE_TYPES["HFConv1D"]


def linear_types() -> tuple[type[nn.Module], ...]:
    """Module types that compute ``x @ W`` on the last dimension: ``nn.Linear`` and HF ``Conv1D``."""
    c = hf_conv1d()
    return (nn.Linear,) if c is None else (nn.Linear, c)


def _module_types(names: list[str]) -> tuple[type[nn.Module], ...]:
    out = []
    for n in names:
        if n == "HFConv1D" and hf_conv1d() is None:
            continue                   # transformers absent: no model can hold an HF Conv1D
        if n not in MODULE_TYPES:
            raise RecipeError(f"unknown module type {n!r} in targets.types; valid: {sorted(MODULE_TYPES)}")
        out.append(MODULE_TYPES[n])
    return tuple(out)


def _match(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


@dataclass
class TargetSpec:
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=lambda: list(DEFAULT_TYPES))

    def __post_init__(self) -> None:
        for key in ("include", "exclude", "types"):
            v = getattr(self, key)
            if isinstance(v, str) or not isinstance(v, (list, tuple)) or not all(isinstance(p, str) for p in v):
                raise RecipeError(f"targets.{key} must be a list of strings; got {v!r}")
            setattr(self, key, list(v))
        if not self.include:
            raise RecipeError("targets.include is empty: name at least one module pattern (or leave the default ['*'])")
        for p in self.include + self.exclude:
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as e:
                    raise RecipeError(f"bad regular expression in targets: {p!r}: {e}") from None


    @property
    def is_default(self) -> bool:
        """Nothing chosen (``include: ["*"]``, no excludes): :func:`resolve_targets` picks the model's default."""
        return list(self.include) == ["*"] and not self.exclude

    @classmethod
    def of(cls, spec: TargetSpec | dict[str, Any] | None) -> TargetSpec:
        """A :class:`TargetSpec` from itself, a dict (``{"include": [...], "exclude": [...], "types": [...]}``)
        or ``None`` (the default); unknown keys are a :class:`RecipeError` naming the valid ones."""
        if spec is None:
            return cls()
        if isinstance(spec, cls):
            return spec
        if not isinstance(spec, dict):
            raise RecipeError(f"targets: expected a mapping with include/exclude/types, got {spec!r}")
        bad = sorted(set(map(str, spec)) - {"include", "exclude", "types"})
        if bad:
            raise RecipeError(f"targets: unknown keys {bad}; valid: include, exclude, types")
        return cls(**spec)


def block_lists(model: nn.Module) -> list[str]:
    """Names of the model's lists of repeated blocks (transformer layers): every ``nn.ModuleList`` whose
    children are all of one class and hold at least two Linear / HF Conv1D layers, outermost only
    (ALBERT's shared layer group counts once; an encoder-decoder has two)."""
    linear = linear_types()
    found: list[str] = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0 or any(name.startswith(f + ".") for f in found):
            continue
        kinds = {type(c) for c in m}
        if len(kinds) == 1 and sum(isinstance(x, linear) for x in m[0].modules()) >= 2:
            found.append(name)
    return found


def block_targets(model: nn.Module, types: list[str] | None = None) -> TargetSpec | None:
    """Every layer of ``types`` (default Linear and HF Conv1D) inside the repeated blocks of
    :func:`block_lists`, or ``None`` when the model has none."""
    lists = block_lists(model)
    if not lists:
        return None
    include = [rf"re:^{re.escape(name)}\.\d+\." for name in lists]
    return TargetSpec(include, [], list(types) if types else ["Linear"] + (["HFConv1D"] if hf_conv1d() is not None else []))


def resolve_targets(model: nn.Module, spec: TargetSpec | None = None) -> TargetSpec:
    """``spec`` itself, or for the default spec the model's default targets (module doc)."""
    spec = spec or TargetSpec()
    if not spec.is_default:
        return spec
    return block_targets(model, spec.types) or spec


def find_targets(model: nn.Module, spec: TargetSpec | None = None) -> dict[str, nn.Module]:
    """Ordered ``{parameter_name: module}`` for every targeted ``weight`` (default spec: the model's default
    targets, :func:`resolve_targets`).

    Raises :class:`RecipeError` if an include pattern matches no module of the allowed types, listing the
    candidate module names."""
    spec = resolve_targets(model, spec)
    types = _module_types(spec.types)
    candidates = {n: m for n, m in model.named_modules() if isinstance(m, types) and getattr(m, "weight", None) is not None}
    # a weight tied to another module's (GPT-2's LM head and token embedding) is known by its first name
    canonical = {id(p): n for n, p in model.named_parameters()}
    if not candidates:
        raise RecipeError(f"the model has no modules of types {spec.types}")
    out: dict[str, nn.Module] = {}
    for pat in spec.include:
        hits = [n for n in candidates if _match(pat, n)]
        if not hits:
            shown = list(candidates)[:20]
            more = f" (+{len(candidates) - 20} more)" if len(candidates) > 20 else ""
            raise RecipeError(f"target pattern {pat!r} matches no {'/'.join(spec.types)} module; "
                             f"candidates: {shown}{more}")
        for n in hits:
            if not any(_match(x, n) or _match(x, f"{n}.weight") for x in spec.exclude):
                name = canonical.get(id(candidates[n].weight))
                if name is not None:
                    out.setdefault(name, candidates[n])
    for pat in spec.exclude:
        if not any(_match(pat, n) or _match(pat, f"{n}.weight") for n in candidates):
            raise RecipeError(f"exclude pattern {pat!r} matches no {'/'.join(spec.types)} module; "
                             f"candidates: {list(candidates)[:20]}")
    if not out:
        raise RecipeError(f"targets include={spec.include} exclude={spec.exclude} leave nothing to prune")
    # keep model order
    order = {name: i for i, name in enumerate(canonical.values())}
    return dict(sorted(out.items(), key=lambda kv: order[kv[0]]))
