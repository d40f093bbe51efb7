"""GLUE metrics against values worked out by hand on tiny arrays."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prunekit.core.errors import UnknownNameError
from prunekit.data.metrics import glue_metrics, primary_metric, to_predictions

# Five binary examples used throughout:
#   index:  0  1  2  3  4
#   pred:   1  0  1  1  0
#   label:  1  1  1  0  0
# TP = {0, 2} = 2, FN = {1} = 1, FP = {3} = 1, TN = {4} = 1; correct = 3 of 5.
PRED = [1, 0, 1, 1, 0]
LABEL = [1, 1, 1, 0, 0]
ACC = 3 / 5
F1 = 2 * 2 / (2 * 2 + 1 + 1)                        # 2TP / (2TP + FP + FN) = 4/6
MCC = (2 * 1 - 1 * 1) / math.sqrt((2 + 1) * (2 + 1) * (1 + 1) * (1 + 1))  # (TP·TN − FP·FN)/sqrt(...) = 1/6


@pytest.mark.parametrize("task", ["sst2", "qnli", "rte", "wnli"])
def test_accuracy_tasks(task):
    assert glue_metrics(task, PRED, LABEL) == {"accuracy": pytest.approx(100 * ACC)}
    assert primary_metric(task) == "accuracy"


def test_cola_mcc():
    assert F1 == pytest.approx(2 / 3) and MCC == pytest.approx(1 / 6)
    assert glue_metrics("cola", PRED, LABEL) == {"matthews_correlation": pytest.approx(100 * MCC)}
    assert glue_metrics("CoLA", [1] * 5, LABEL) == {"matthews_correlation": 0.0}  # constant side -> 0
    assert primary_metric("cola") == "matthews_correlation"


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_f1_accuracy_tasks(task):
    m = glue_metrics(task, PRED, LABEL)
    assert list(m) == ["f1", "accuracy", "combined"]
    assert m["f1"] == pytest.approx(200 / 3) and m["accuracy"] == pytest.approx(60.0)
    assert m["combined"] == pytest.approx((200 / 3 + 60) / 2)
    assert primary_metric(task) == "f1"


def test_mnli_three_classes_from_logits():
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 1.0], [0.0, 1.0, 5.0], [1.0, 0.0, 0.0]])
    assert to_predictions("mnli", logits).tolist() == [0, 1, 2, 0]
    assert glue_metrics("mnli", logits, [0, 1, 1, 2]) == {"accuracy": pytest.approx(50.0)}


def test_stsb_pearson_spearman_by_hand():
    x = [1.0, 2.0, 3.0, 4.0]          # predictions, mean 2.5: deviations -1.5, -0.5, 0.5, 1.5 (sum sq 5)
    y = [2.0, 9.0, 5.0, 4.0]          # labels, mean 5: deviations -3, 4, 0, -1 (sum sq 26)
    cov = (-1.5 * -3) + (-0.5 * 4) + (0.5 * 0) + (1.5 * -1)   # = 1
    pearson = cov / math.sqrt(5 * 26)                      # = 1/sqrt(130)
    # Ranks of y: 1, 4, 3, 2; of x: 1, 2, 3, 4; d = 0, -2, 0, 2; rho = 1 - 6·Σd²/(n(n²−1)) = 1 - 48/60
    spearman = 1 - 6 * 8 / (4 * (16 - 1))
    m = glue_metrics("sts-b", np.array(x)[:, None], y)     # (N, 1) regression outputs are accepted
    assert m == {"pearson": pytest.approx(100 * pearson), "spearmanr": pytest.approx(100 * spearman),
                 "combined": pytest.approx(100 * (pearson + spearman) / 2)}
    assert spearman == pytest.approx(0.2) and primary_metric("stsb") == "combined"


def test_errors():
    with pytest.raises(ValueError, match="5 predictions but 4 labels"):
        glue_metrics("sst2", PRED, LABEL[:4])
    with pytest.raises(UnknownNameError, match="unknown GLUE task 'squad'"):
        glue_metrics("squad", PRED, LABEL)
    with pytest.raises(ValueError, match="regression task"):
        glue_metrics("stsb", np.zeros((4, 2)), [0.0, 1.0, 2.0, 3.0])
