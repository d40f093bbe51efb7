"""Pruning algorithms, registered by name (``algorithm.name`` in a recipe)."""
from .base import ALGORITHMS, Algorithm, get_algorithm_class, list_algorithms, register
from . import oneshot, gradual  # noqa: F401  (registration)

__all__ = ["ALGORITHMS", "Algorithm", "get_algorithm_class", "list_algorithms", "register"]
