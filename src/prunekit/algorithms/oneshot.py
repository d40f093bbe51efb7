"""One-shot pruning (Han et al., "Learning both Weights and Connections", NeurIPS 2015):
train dense (or load) → prune once to the target by the structure's score → hard-pruned retrain."""
from __future__ import annotations

from prunekit.algorithms.base import Algorithm, register


@register
class OneShot(Algorithm["Algorithm.Params"]):
    name = "oneshot"
    has_search = False
