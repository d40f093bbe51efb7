"""The user-loop API: :class:`Pruner` from a recipe (file, dict or :class:`Recipe`) or a prune spec.

``prunekit.Pruner(model, recipe_or_spec, optimizer, algorithm=..., params=...)``: with a recipe the
algorithm, its parameters and the prune spec come from it (``algorithm=`` / ``params=`` override);
with a spec (``PruneSpec`` or a dict like a recipe's ``prune:`` section) ``algorithm`` defaults to
``oneshot``.  Default targets (``include: ["*"]``) are the matrices inside the repeated blocks of a
transformer — embeddings and the LM head stay dense — as in every entry point
(:func:`prunekit.core.targets.resolve_targets`).  See :mod:`prunekit.training.pruner` for the loop calls.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.algorithms.quantize import quantize
from prunekit.core.masks import MaskSet
from prunekit.core.plan import PruneSpec
from prunekit.core.plan import prune as _prune
from prunekit.core.structures import Structure, parse_structure
from prunekit.deploy import compact as _manifests
from prunekit.deploy.export import export
from prunekit.deploy.surgery import CompactResult, compact
from prunekit.graph import coupled_groups
from prunekit.pipelines.recipe import Recipe, load_recipe, parse_recipe
from prunekit.pipelines.runner import prune_spec_from
from prunekit.training.pruner import Pruner as _Pruner
from prunekit.training.pruner import as_prune_spec

__all__ = ["Pruner", "prune", "compact", "groups_of", "save_compacted", "load_compacted", "quantize", "export"]


def groups_of(model: nn.Module, example_inputs: Any, kinds: tuple[str, ...] | None = None):
    """The model's coupled groups (:func:`prunekit.graph.coupled_groups`), traced in eval mode."""
    was = model.training
    try:
        return coupled_groups(model.eval(), example_inputs, kinds)
    finally:
        model.train(was)


def prune(model: nn.Module, structure: str | Structure = "unstructured", sparsity: float = 0.5, *,
          example_inputs: Any = None, groups=None, **kw) -> MaskSet:
    """:func:`prunekit.core.plan.prune`; a group structure (``"heads+neurons"``, ``"channels"``, …) finds
    the model's coupled groups from ``example_inputs`` (or takes ``groups``)::

        masks = prunekit.prune(model, "heads+neurons", 0.3, example_inputs={"input_ids": ids}, multiple_of=8)
        prunekit.compact(model, masks, {"input_ids": ids})      # physically smaller, verified
    """
    st = parse_structure(structure)
    if st.coupled and groups is None:
        if example_inputs is None:
            raise ValueError(f"structure {st} needs example_inputs (the coupled groups come from a trace of the model)")
        groups = groups_of(model, example_inputs)
    return _prune(model, st, sparsity, groups=groups, **kw)


def save_compacted(directory: str | os.PathLike, model: nn.Module, result: CompactResult | Mapping[str, Any]) -> Path:
    """Write a model compacted by :func:`compact` into ``directory``: ``model.safetensors`` (tied tensors
    once) and ``compact.json`` — the manifest (format ``prunekit-compact/2``: the kept indices of every cut
    tensor, attention-head attributes, config updates, new shapes, sha256).  ``result``: what
    :func:`compact` returned (or a manifest dict).  Reload with :func:`load_compacted`::

        res = prunekit.compact(model, masks, x)
        prunekit.save_compacted("small/", model, res)
        small = prunekit.load_compacted("small/", lambda: MyNet())     # a fresh *dense* model
    """
    return _manifests.save_compacted(directory, model, result)


def load_compacted(directory: str | os.PathLike, factory: Callable[[], nn.Module]) -> nn.Module:
    """The model :func:`save_compacted` wrote: ``factory()`` builds the dense architecture (the model as it
    was before compaction, any weights), it is cut as the manifest says and the saved weights are loaded
    strictly; the checksum is verified.  A manifest that does not fit the factory's model is a
    :class:`~prunekit.core.errors.CheckpointError`."""
    return _manifests.load_compacted(directory, factory)


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
                 algorithm: str | None = None, params: Any = None, example_inputs: Any = None, **kw):
        """``example_inputs``: for a group structure (``channels``, ``heads+neurons``, …), the input the
        model is traced on to find its coupled groups."""
        recipe = _recipe(recipe_or_spec)
        spec: PruneSpec | dict[str, Any]
        if recipe is None:
            spec = recipe_or_spec
            algorithm = algorithm or "oneshot"
        else:
            spec = prune_spec_from(recipe)
            if algorithm is None:
                algorithm, params = recipe.algorithm.name, recipe.algorithm.params if params is None else params
            kw.setdefault("calibration", recipe.calibration)     # post-training algorithms' data section
            if recipe.quant.scheme is not None:
                kw.setdefault("quant", recipe.quant.spec(prune_spec_from(recipe).targets))
                kw.setdefault("quant_method", recipe.quant.method)
                kw.setdefault("quant_reduce", recipe.quant.reduce)
            if recipe.distill and "teacher" in kw and "distill" not in kw:
                kw["distill"] = recipe.distill
        spec = as_prune_spec(spec)
        if spec.st.coupled and spec.groups is None:
            if example_inputs is None:
                raise ValueError(f"structure {spec.structure} needs example_inputs= (the coupled groups come from a "
                                 "trace of the model)")
            spec.groups = groups_of(model, example_inputs)
        super().__init__(model, spec, optimizer, algorithm=algorithm, params=params, **kw)
