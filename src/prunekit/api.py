"""The user-loop API: :class:`Pruner` from a recipe (file, dict or :class:`Recipe`) or a prune spec.

``prunekit.Pruner(model, recipe_or_spec, optimizer, algorithm=..., params=...)``: with a recipe the
algorithm, its parameters and the prune spec come from it (``algorithm=`` / ``params=`` override);
with a spec (``PruneSpec`` or a dict like a recipe's ``prune:`` section) ``algorithm`` defaults to
``oneshot``.  A recipe whose targets are the default ``["*"]`` on a Hugging Face model gets the
encoder matrices (as ``prunekit run`` does).  See :mod:`prunekit.training.pruner` for the loop calls.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.core.plan import PruneSpec
from prunekit.graph.families import default_targets
from prunekit.pipelines.recipe import Recipe, load_recipe, parse_recipe
from prunekit.pipelines.runner import prune_spec_from
from prunekit.training.pruner import Pruner as _Pruner

__all__ = ["Pruner"]


def _recipe(obj) -> Recipe | None:
    if isinstance(obj, Recipe):
        return obj
    if isinstance(obj, (str, Path)):
        return load_recipe(obj)
    if isinstance(obj, dict) and ({"prune", "algorithm"} & set(obj)):
        return parse_recipe(obj)
    return None


class Pruner(_Pruner):
    """:class:`prunekit.training.pruner.Pruner` that also accepts a recipe (see module doc)."""

    def __init__(self, model: nn.Module, recipe_or_spec: Any, optimizer: torch.optim.Optimizer | None = None, *,
                 algorithm: str | None = None, params: Any = None, **kw):
        recipe = _recipe(recipe_or_spec)
        spec: PruneSpec | dict[str, Any]
        if recipe is None:
            spec = recipe_or_spec
            algorithm = algorithm or "oneshot"
        else:
            t = recipe.prune.targets
            if hasattr(model, "config") and list(t.include) == ["*"] and not t.exclude:
                ts = default_targets(model)
                t.include, t.types = list(ts.include), list(ts.types)
            spec = prune_spec_from(recipe)
            if algorithm is None:
                algorithm, params = recipe.algorithm.name, recipe.algorithm.params if params is None else params
            if recipe.distill and "teacher" in kw and "distill" not in kw:
                kw["distill"] = recipe.distill
        super().__init__(model, spec, optimizer, algorithm=algorithm, params=params, **kw)
