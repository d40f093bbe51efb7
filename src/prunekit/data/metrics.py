"""The official GLUE metrics, computed with scikit-learn and SciPy.

=====================  ==========================================  ====================
task                   metrics (keys of :func:`glue_metrics`)      primary
=====================  ==========================================  ====================
CoLA                   ``matthews_correlation``                    matthews_correlation
SST-2, MNLI, QNLI,     ``accuracy``                                accuracy
RTE, WNLI
MRPC, QQP              ``f1`` (positive class 1), ``accuracy``,    f1
                       ``combined`` = their mean
STS-B                  ``pearson``, ``spearmanr``, ``combined``    combined
                       = their mean
=====================  ==========================================  ====================

The GLUE leaderboard shows MRPC/QQP as "F1/accuracy" and STS-B as "Pearson/Spearman"; to rank
runs by one number we use F1 for MRPC/QQP and the Pearson–Spearman mean for STS-B. All values are
percentages (85.0, not 0.85), like every metric prunekit reports (the single-metric functions
below return fractions). Degenerate inputs follow the libraries: MCC is 0 when one side is constant;
a correlation with a constant side is NaN.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from prunekit.core.errors import DataError
from prunekit.data.glue import GlueTask, get_task

__all__ = ["accuracy", "f1", "matthews_correlation", "pearson", "spearman", "glue_metrics", "primary_metric",
           "to_predictions"]


def accuracy(predictions, labels) -> float:
    """Fraction of predictions equal to the labels."""
    return float(accuracy_score(labels, predictions))


def f1(predictions, labels) -> float:
    """Binary F1 of the positive class (label 1): 2·TP / (2·TP + FP + FN)."""
    return float(f1_score(labels, predictions, pos_label=1, average="binary", zero_division=0.0))


def matthews_correlation(predictions, labels) -> float:
    """Matthews correlation (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)), as for CoLA."""
    return float(matthews_corrcoef(labels, predictions))


def pearson(predictions, labels) -> float:
    """Pearson correlation coefficient."""
    return float(pearsonr(np.asarray(predictions, float), np.asarray(labels, float))[0])


def spearman(predictions, labels) -> float:
    """Spearman rank correlation (Pearson of the average ranks)."""
    return float(spearmanr(predictions, labels)[0])


def to_predictions(task: str | GlueTask, outputs) -> np.ndarray:
    """Model outputs -> predictions: logits ``(N, C)`` become class ids by argmax; for regression
    ``(N, 1)`` becomes ``(N,)``. 1-D input is returned as is."""
    task = get_task(task)
    out = np.asarray(outputs.detach().cpu() if hasattr(outputs, "detach") else outputs)
    if out.ndim == 2:
        if task.is_regression:
            if out.shape[1] != 1:
                raise DataError(f"{task.display} is a regression task; expected (N,) or (N, 1) outputs, got {out.shape}")
            return out[:, 0].astype(float)
        return out.argmax(axis=1)
    if out.ndim != 1:
        raise DataError(f"expected (N,) predictions or (N, C) logits, got shape {out.shape}")
    return out


_FUNCTIONS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy, "f1": f1, "matthews_correlation": matthews_correlation,
    "pearson": pearson, "spearmanr": spearman,
}


def glue_metrics(task: str | GlueTask, predictions, labels) -> dict[str, float]:
    """All official metrics of ``task`` for ``predictions`` (class ids, logits, or scores) vs ``labels``."""
    task = get_task(task)
    p = to_predictions(task, predictions)
    y = np.asarray(labels.detach().cpu() if hasattr(labels, "detach") else labels)
    if p.shape[0] != y.shape[0]:
        raise DataError(f"{len(p)} predictions but {len(y)} labels")
    if len(y) == 0:
        raise DataError("no examples to score")
    out = {m: 100.0 * _FUNCTIONS[m](p, y) for m in task.metric_names if m != "combined"}
    if "combined" in task.metric_names:  # MRPC/QQP: (f1 + accuracy) / 2; STS-B: (pearson + spearmanr) / 2
        out["combined"] = float(np.mean(list(out.values())))
    return out


def primary_metric(task: str | GlueTask) -> str:
    """The key of :func:`glue_metrics` used to rank runs on ``task`` (see the module table)."""
    return get_task(task).primary_metric
