"""Pruning algorithms, registered by name (``algorithm.name`` in a recipe)."""
from prunekit.algorithms.base import ALGORITHMS, Algorithm, get_algorithm_class, list_algorithms, register
from prunekit.algorithms import oneshot, gradual  # noqa: F401  (registration)
from prunekit.algorithms import admm, slr, group_lasso  # noqa: F401  (registration)
from prunekit.algorithms import distill, heads_neurons  # noqa: F401  (registration: progressive_distill, heads_neurons)
from prunekit.algorithms import wanda, sparsegpt, obs_structured  # noqa: F401  (registration: post-training pruning)

__all__ = ["ALGORITHMS", "Algorithm", "get_algorithm_class", "list_algorithms", "register"]
