"""Pruning algorithms, registered by name (``algorithm.name`` in a recipe)."""
from prunekit.algorithms import (  # noqa: F401  (registration)  # noqa: F401  (registration)  # noqa: F401  (registration: progressive_distill, heads_neurons)  # noqa: F401  (registration: post-training pruning)
    admm,
    distill,
    gradual,
    group_lasso,
    heads_neurons,
    obs_structured,
    oneshot,
    slr,
    sparsegpt,
    wanda,
)
from prunekit.algorithms.base import ALGORITHMS, Algorithm, get_algorithm_class, list_algorithms, register

__all__ = ["ALGORITHMS", "Algorithm", "get_algorithm_class", "list_algorithms", "register"]
