"""The one rule for ``data.limit`` / ``data.eval_limit``: a seeded, class-stratified sample.

Every reader that takes a ``limit`` (MNIST, CIFAR-10, GLUE, image folders, tables, ``hf_disk``, data
factories) keeps the examples :func:`sample_indices` picks:

* each class gets its share of ``limit`` in proportion to its size in the whole split, rounded by the
  largest remainder (Hamilton's method), so class ``c`` keeps ``floor(limit * n_c / N)`` or one more —
  never a prefix that holds only the first classes of a file sorted by class;
* the examples inside a class are a uniform random draw seeded by ``seed`` (the recipe's ``seed``);
  ties between equal remainders are broken by the same seed;
* regression targets (``labels=None``) have no classes: a seeded uniform sample;
* the kept indices are returned in the split's own order; the same labels and seed give the same sample.
"""
from __future__ import annotations

import random
from collections.abc import Hashable, Sequence
from typing import Any, Protocol, TypeVar

from prunekit.core.errors import DataError

__all__ = ["sample_indices", "subsample", "class_quotas"]


def class_quotas(counts: Sequence[int], limit: int, rng: random.Random) -> list[int]:
    """How many of each class to keep: ``limit * n_c / N`` rounded by the largest remainder (ties by ``rng``)."""
    total = sum(counts)
    base = [limit * n // total for n in counts]
    remainders = [limit * n % total for n in counts]
    tiebreak = [rng.random() for _ in counts]
    order = sorted(range(len(counts)), key=lambda c: (-remainders[c], tiebreak[c]))
    for c in order[: limit - sum(base)]:
        base[c] += 1
    return base


def sample_indices(labels: Sequence[Hashable] | None, limit: int | None, seed: int = 0, *,
                   size: int | None = None) -> list[int]:
    """Indices of the ``limit`` examples to keep, sorted (see the module doc).

    ``labels``: one hashable label per example (class ids or names), or ``None`` for a regression split,
    whose length is then ``size``.  ``limit`` ``None`` or at least the split's size keeps everything."""
    n = len(labels) if labels is not None else size
    if n is None:
        raise ValueError("sample_indices: give the labels or, for regression, the split size")
    if limit is None or limit >= n:
        return list(range(n))
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise DataError(f"limit must be a non-negative int or None, got {limit!r}")
    rng = random.Random(seed)
    if labels is None:
        return sorted(rng.sample(range(n), limit))
    by_class: dict[Hashable, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    members = list(by_class.values())          # classes in order of first appearance: deterministic
    quotas = class_quotas([len(m) for m in members], limit, rng)
    keep = [i for m, q in zip(members, quotas) for i in rng.sample(m, q)]
    return sorted(keep)


class _HasExamples(Protocol):
    examples: list[Any]


_D = TypeVar("_D", bound=_HasExamples)


def subsample(data: _D, limit: int | None, seed: int, *, regression: bool | None = None) -> _D:
    """Keep the :func:`sample_indices` sample of ``data.examples`` (a table, ``hf_disk`` or GLUE split:
    examples with a ``label``); the class list is unchanged.  ``regression`` (default: any label is a
    float) samples uniformly instead of by class."""
    if limit is None or limit >= len(data.examples):
        return data
    labels = [e.label for e in data.examples]
    if regression is None:
        regression = any(isinstance(y, float) for y in labels)
    idx = sample_indices(None if regression else labels, limit, seed, size=len(labels))
    data.examples = [data.examples[i] for i in idx]
    return data
