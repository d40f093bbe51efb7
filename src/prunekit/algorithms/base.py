"""Algorithm interface and registry.

An algorithm is a :class:`~prunekit.algorithms.hooks.Hook` (extra loss, after-step, epoch-end) plus three
decisions the pipeline asks it (see :func:`prunekit.pipelines.runner.run_pipeline`)::

    masks_during_search(model) -> MaskSet | None   # hard-prune masks while the algorithm trains
    has_search                                     # does it train before hard-pruning?
    final_masks(model) -> MaskSet                  # the hard-prune masks at the end of its phase

Every algorithm has a ``Params`` dataclass (validated from ``algorithm.params`` in the recipe, unknown
keys rejected) and ``state_dict()`` / ``load_state_dict()`` of plain tensors and numbers (for resume).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from torch import nn

from prunekit.algorithms.hooks import Hook
from prunekit.core.masks import MaskSet
from prunekit.core.plan import PruneSpec, compute_masks, target_plan
from prunekit.core.registry import Registry

__all__ = ["Algorithm", "register", "get_algorithm_class", "list_algorithms", "ALGORITHMS", "full_masks"]

ALGORITHMS: Registry[type[Algorithm[Any]]] = Registry("algorithm")

A = TypeVar("A", bound="type[Algorithm[Any]]")
P = TypeVar("P")


def register(cls: A) -> A:
    """Class decorator: register an algorithm under its ``name``."""
    ALGORITHMS.add(cls.name, cls)
    return cls  # the same object add() returns, typed as the class itself


def list_algorithms() -> list[str]:
    return ALGORITHMS.names()


def get_algorithm_class(name: str) -> type[Algorithm[Any]]:
    """The registered class; a miss raises :class:`~prunekit.core.errors.UnknownNameError`."""
    return ALGORITHMS.get(name)


def full_masks(model: nn.Module, spec: PruneSpec) -> MaskSet:
    """All-True masks on every target (nothing pruned yet)."""
    params = dict(model.named_parameters())
    ms = MaskSet()
    plan = target_plan(model, spec)
    for n, (st, _) in plan.items():
        ms.set(n, torch.ones_like(params[n], dtype=torch.bool), str(st))
    return ms


class Algorithm(Hook, Generic[P]):
    """Generic over its params type ``P`` (the class's ``Params`` dataclass): ``class X(Algorithm["X.Params"])``."""

    name = "base"
    has_search = False

    @dataclass
    class Params:
        pass

    def __init__(self, params: P, spec: PruneSpec):
        self.params = params
        self.spec = spec

    def masks_during_search(self, model: nn.Module) -> MaskSet | None:
        return None

    def final_masks(self, model: nn.Module) -> MaskSet:
        return compute_masks(model, self.spec)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
