"""Data sets: MNIST, CIFAR-10 and the GLUE tasks, read from local files under the data root.

Start with :func:`get_dataset` / :func:`list_datasets`. Every missing or malformed file raises
:class:`DataError` (a ``ValueError``) naming the file and the problem. GLUE metrics live in
:mod:`prunekit.data.metrics`; the reader modules are imported on first use.
"""
from prunekit.data.registry import DataError, ImageDataset, canonical_dataset_name, get_dataset, list_datasets

__all__ = ["DataError", "ImageDataset", "canonical_dataset_name", "get_dataset", "list_datasets"]
