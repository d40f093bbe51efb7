"""Data sets built by the user's own code: ``data.factory: package.module:function``.

The function is imported (this **runs the user's code**; name only modules you trust) and called with
``data.factory_args`` as keyword arguments.  It returns ``(train_dataset, eval_dataset)`` or a dict
``{"train": ..., "eval": ...}``; each is a map-style data set (``len`` and ``[i]``) whose examples are
``(input, label)`` pairs.  ``input`` is a tensor (or anything the default collate stacks, e.g. a dict
of tensors, passed to the model as keyword arguments); ``label`` is a class id for classification or a
number for regression.

Before any training every example is read once to check it: a pair, a label of the right kind, and
for classification ids in ``[0, classes)``.  The number of classes is ``len(train.classes)`` when the
data set has a ``classes`` attribute, else ``1 + the largest train label``.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch

from prunekit.core.errors import DataError
from prunekit.data.sample import sample_indices
from prunekit.models.user import ModelImportError, call_factory

__all__ = ["FactoryData", "load_factory", "check_examples"]


@dataclass
class FactoryData:
    train: Any
    eval: Any
    num_classes: int          # 1 for regression
    task_type: str
    train_labels: list[float | int] = field(default_factory=list)   # every example's label, read once
    eval_labels: list[float | int] = field(default_factory=list)

    def limited(self, limit: int | None, eval_limit: int | None, seed: int) -> FactoryData:
        """The splits cut to ``limit`` / ``eval_limit`` examples: the seeded, class-stratified sample of
        :func:`~prunekit.data.sample.sample_indices` (uniform for regression), as ``Subset`` views."""
        def cut(ds: Any, labels: list[float | int], n: int | None) -> tuple[Any, list[float | int]]:
            if n is None or n >= len(labels):
                return ds, labels
            idx = sample_indices(None if self.task_type == "regression" else labels, n, seed, size=len(labels))
            return torch.utils.data.Subset(ds, idx), [labels[i] for i in idx]
        train, y_train = cut(self.train, self.train_labels, limit)
        ev, y_eval = cut(self.eval, self.eval_labels, eval_limit)
        return FactoryData(train, ev, self.num_classes, self.task_type, y_train, y_eval)


def _label_value(label: Any, where: str, task_type: str) -> float | int:
    if isinstance(label, torch.Tensor):
        if label.numel() != 1:
            raise DataError(f"{where}: label is a tensor of shape {tuple(label.shape)}, expected one number")
        label = label.item()
    if isinstance(label, bool) or not isinstance(label, numbers.Number):
        raise DataError(f"{where}: label {label!r} is not a number")
    num: Any = label   # a numbers.Number (int, float, numpy scalar, ...): typeshed's Number declares no operations
    if task_type == "classification":
        if not float(num).is_integer() or num < 0:
            raise DataError(f"{where}: classification label {label!r} is not a class id (an integer >= 0)")
        return int(num)
    if not math.isfinite(float(num)):
        raise DataError(f"{where}: regression label {label!r} is not finite")
    return float(num)


def check_examples(ds: Any, name: str, task_type: str) -> list[float | int]:
    """Read every example of ``ds``; return the labels.  :class:`DataError` names the split and index."""
    try:
        n = len(ds)
    except TypeError:
        raise DataError(f"{name}: the data set has no len(); return a map-style data set") from None
    if n == 0:
        raise DataError(f"{name}: empty split (0 examples)")
    labels = []
    for i in range(n):
        ex = ds[i]
        if not isinstance(ex, (tuple, list)) or len(ex) != 2:
            raise DataError(f"{name}[{i}]: expected an (input, label) pair, got {type(ex).__name__}"
                            f"{f' of length {len(ex)}' if isinstance(ex, (tuple, list)) else ''}")
        labels.append(_label_value(ex[1], f"{name}[{i}]", task_type))
    return labels


def _split(result: Any, path: str) -> tuple[Any, Any]:
    if isinstance(result, dict):
        missing = [k for k in ("train", "eval") if k not in result]
        if missing:
            raise DataError(f"data.factory {path!r} returned a dict without {missing} (keys: {sorted(result)})")
        return result["train"], result["eval"]
    if isinstance(result, (tuple, list)) and len(result) == 2:
        return result[0], result[1]
    raise DataError(f"data.factory {path!r} must return (train_dataset, eval_dataset) or a dict with "
                    f"'train' and 'eval', got {type(result).__name__}")


def load_factory(path: str, args: dict | None = None, task_type: str = "classification") -> FactoryData:
    """Call the factory and check both splits (see the module doc)."""
    try:
        result = call_factory(path, args, "data factory", "data.factory_args")
    except ModelImportError as e:
        raise DataError(str(e)) from e
    train, ev = _split(result, path)
    y_train = check_examples(train, f"{path} train", task_type)
    y_eval = check_examples(ev, f"{path} eval", task_type)
    if task_type == "regression":
        return FactoryData(train, ev, 1, task_type, y_train, y_eval)
    classes = getattr(train, "classes", None)
    k = len(classes) if classes is not None else int(max(y_train)) + 1
    for i, y in enumerate(y_eval):
        if y >= k:
            raise DataError(f"{path} eval[{i}]: label {y} is not a class of the train split ({k} classes: 0..{k - 1})")
    bad = next((i for i, y in enumerate(y_train) if y >= k), None)
    if bad is not None:
        raise DataError(f"{path} train[{bad}]: label {y_train[bad]} >= len(train.classes) = {k}")
    return FactoryData(train, ev, k, task_type, y_train, y_eval)
