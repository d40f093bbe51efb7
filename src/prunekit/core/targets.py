"""Which parameters are pruned: module-name patterns and module types.

A :class:`TargetSpec` selects ``<module>.weight`` parameters of modules whose *type* is in ``types``
and whose *qualified name* matches one of ``include`` (shell-style ``fnmatch`` patterns, or regular
expressions written as ``re:...``) and none of ``exclude``.  Every include pattern must match at least
one module; one that matches nothing is an error that lists the candidates.  Exclude patterns may name
the module (``fc2``) or its parameter (``fc2.weight``); one that matches nothing is an error too.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from torch import nn

from prunekit.core.errors import RecipeError

__all__ = ["TargetSpec", "find_targets", "MODULE_TYPES", "linear_types", "hf_conv1d"]

MODULE_TYPES: dict[str, type[nn.Module]] = {
    "Linear": nn.Linear,
    "Conv2d": nn.Conv2d,
    "Conv1d": nn.Conv1d,
    "Conv3d": nn.Conv3d,
}
# HF GPT-2 style Conv1D is registered lazily (transformers is optional)


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
    types: list[str] = field(default_factory=lambda: ["Linear", "Conv2d", "HFConv1D"])

    def __post_init__(self) -> None:
        for p in self.include + self.exclude:
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as e:
                    raise RecipeError(f"bad regular expression in targets: {p!r}: {e}") from None


def find_targets(model: nn.Module, spec: TargetSpec | None = None) -> dict[str, nn.Module]:
    """Ordered ``{parameter_name: module}`` for every targeted ``weight``.

    Raises ``ValueError`` if an include pattern matches no module of the allowed types, listing the
    candidate module names."""
    spec = spec or TargetSpec()
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
