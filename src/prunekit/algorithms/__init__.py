"""Pruning algorithms, registered by name (``algorithm.name`` in a recipe)."""
from .base import ALGORITHMS, Algorithm, get_algorithm_class, list_algorithms, register
from . import oneshot, gradual  # noqa: F401  (registration)
from . import admm, slr, group_lasso  # noqa: F401  (registration)
from . import distill, heads_neurons  # noqa: F401  (registration: progressive_distill, heads_neurons)

__all__ = ["ALGORITHMS", "Algorithm", "get_algorithm_class", "list_algorithms", "register"]
