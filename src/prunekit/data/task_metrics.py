"""Metrics for the user's own data sets, chosen by task type.  **All values are percentages (0–100).**

===============  =====================================================================  ===========
task type        metrics (keys)                                                          primary
===============  =====================================================================  ===========
classification   ``accuracy``, ``matthews_correlation`` (×100), and for 2 classes ``f1``  ``accuracy``
                 (positive class = class id 1)
regression       ``pearson``, ``spearmanr`` (×100) and ``combined`` = their mean          ``combined``
===============  =====================================================================  ===========

The functions are those of :mod:`prunekit.data.metrics` (scikit-learn / SciPy), scaled by 100.  A
correlation with a constant side is NaN (as SciPy gives it).
"""
from __future__ import annotations

import numpy as np
import torch

from prunekit.data.metrics import accuracy, f1, matthews_correlation, pearson, spearman

__all__ = ["primary_metric", "outputs_to_predictions", "task_metrics"]


def primary_metric(task_type: str) -> str:
    """The key to maximise for ``task_type``."""
    return "combined" if task_type == "regression" else "accuracy"


def outputs_to_predictions(task_type: str, outputs) -> np.ndarray:
    """Logits ``(N, C)`` -> class ids (argmax); regression ``(N, 1)`` or ``(N,)`` -> floats."""
    out = np.asarray(outputs.detach().float().cpu() if isinstance(outputs, torch.Tensor) else outputs)
    if task_type == "regression":
        if out.ndim == 2 and out.shape[1] == 1:
            out = out[:, 0]
        if out.ndim != 1:
            raise ValueError(f"regression needs one output per example, got outputs of shape {out.shape}")
        return out.astype(float)
    if out.ndim != 2:
        raise ValueError(f"classification needs (N, classes) logits, got shape {out.shape}")
    return out.argmax(axis=1)


def task_metrics(task_type: str, outputs, labels, num_classes: int | None = None) -> dict[str, float]:
    """Every metric of ``task_type`` (see the module table), in percent."""
    p = outputs_to_predictions(task_type, outputs)
    y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if len(p) != len(y):
        raise ValueError(f"{len(p)} predictions but {len(y)} labels")
    if len(y) == 0:
        raise ValueError("no examples to score")
    if task_type == "regression":
        out = {"pearson": 100.0 * pearson(p, y), "spearmanr": 100.0 * spearman(p, y)}
        out["combined"] = float(np.mean([out["pearson"], out["spearmanr"]]))
        return out
    out = {"accuracy": 100.0 * accuracy(p, y), "matthews_correlation": 100.0 * matthews_correlation(p, y)}
    if (num_classes if num_classes is not None else int(max(p.max(), y.max())) + 1) == 2:
        out["f1"] = 100.0 * f1(p, y)
    return out
