"""The dataset contract (error type, image dataset) and the dataset registry.

``get_dataset(name, ...)`` is the one entry point the training loop and CLI use; each name maps to a
small loader function below. Loaders are imported lazily inside those functions so that
``import prunekit.data`` stays cheap and the reader modules can import :class:`DataError` from here
without an import cycle.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from prunekit.core.errors import DataError, UnknownNameError
from prunekit.core.registry import Registry
from prunekit.data.cifar10 import load_cifar10
from prunekit.data.glue import load_glue
from prunekit.data.images import ImageDataset
from prunekit.data.mnist import load_mnist

__all__ = ["DATASETS", "DataError", "ImageDataset", "get_dataset", "list_datasets", "canonical_dataset_name"]





# --- registry --------------------------------------------------------------------------------------

def _mnist(root, split, limit, **kw):
    return load_mnist(root, split=split, limit=limit, **kw)


def _cifar10(root, split, limit, **kw):
    return load_cifar10(root, split=split, limit=limit, **kw)


def _glue(task: str) -> Callable[..., Any]:
    def load(root, split, limit, **kw):
        return load_glue(task, root, split=split, limit=limit, **kw)
    load.__name__ = f"_glue_{task}"
    return load


_GLUE_NAMES = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")

DATASETS: Registry[Callable[..., Any]] = Registry("dataset")
DATASETS.add("mnist", _mnist)
DATASETS.add("cifar10", _cifar10)
for _task in _GLUE_NAMES:
    DATASETS.add(_task, _glue(_task))


def list_datasets() -> list[str]:
    """All registered dataset names, sorted (``mnist``, ``cifar10`` and the nine GLUE tasks)."""
    return DATASETS.names()


def canonical_dataset_name(name: str) -> str:
    """Map user spellings to the registered name: case-insensitive, ``-``/``_`` ignored, optional
    ``glue/`` prefix (``"SST-2"``, ``"glue/sts_b"`` -> ``"sst2"``, ``"stsb"``). Unknown ->
    :class:`UnknownNameError` listing the valid names."""
    key = name.strip().lower()
    if key.startswith("glue/"):
        key = key[len("glue/"):]
    key = key.replace("-", "").replace("_", "")
    if key not in DATASETS:
        raise UnknownNameError(f"unknown dataset {name!r}; valid: {', '.join(list_datasets())}")
    return key


def get_dataset(name: str, root: str | os.PathLike | None = None, split: str = "train",
                limit: int | None = None, seed: int = 0, **kw: Any):
    """Load dataset ``name`` from the data root.

    ``root`` is resolved by :func:`prunekit.data.paths.resolve_data_root` (option, ``$PRUNEKIT_DATA``,
    ``../shared/data``). ``split`` is ``train``/``test`` for images and ``train``/``dev`` (MNLI also
    ``dev_matched``/``dev_mismatched``) for GLUE. ``limit`` keeps a class-stratified sample of ``limit``
    examples drawn with ``seed`` (:func:`prunekit.data.sample.sample_indices`; regression: uniform).
    Extra keywords go to the loader (e.g. ``augment=True`` for CIFAR-10).
    Returns an :class:`ImageDataset` for images and a :class:`prunekit.data.glue.GlueData` for GLUE.
    """
    loader = DATASETS.get(canonical_dataset_name(name))
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise DataError(f"limit must be a non-negative int or None, got {limit!r}")
    return loader(root, split, limit, seed=seed, **kw)
