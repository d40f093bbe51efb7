"""``prunekit info`` — list the registered structures, algorithms, models and datasets."""
from __future__ import annotations

from prunekit.algorithms import list_algorithms
from prunekit.core.quant import quantizer_syntax
from prunekit.core.scoring import SCORES
from prunekit.core.structures import structure_syntax
from prunekit.data.registry import list_datasets
from prunekit.models.registry import list_models


def add_parser(sub):
    p = sub.add_parser("info", help="list structures, algorithms, models and datasets",
                       description="List the registered structures (with their syntax), scores, algorithms, models and datasets.")
    p.set_defaults(func=run)


def run(args) -> int:

    print("structures:", structure_syntax())
    print("quantizers:", quantizer_syntax())
    print("scores:    ", ", ".join(sorted(SCORES)))
    print("algorithms:", ", ".join(list_algorithms()))
    print("models:    ", ", ".join(list_models()))
    print("datasets:  ", ", ".join(list_datasets()))
    return 0
