"""End to end on MNIST (1000 images, fractional epochs): every search algorithm through ``run_pipeline``
from one shared dense checkpoint; final masks hit the target per layer, pruned weights are exactly
zero after retraining, results.json has its numbers, and accuracy clears a measured sanity bar.

Measured (1000 train / 500 test images, Adam 1e-3): dense ≈ 85-88 %, every algorithm at 80 %
unstructured after half an epoch of search + half of retraining ≈ 75-87 %; the bar is 60 %.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from prunekit.core.structures import as_matrix
from prunekit.data.paths import resolve_data_root
from prunekit.io.checkpoint import load_checkpoint
from prunekit.models.registry import get_model
from prunekit.pipelines.recipe import parse_recipe
from prunekit.pipelines.runner import run_pipeline

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ACC_BAR = 60.0

try:
    _root = resolve_data_root(None)
    HAVE_MNIST = (Path(_root) / "mnist" / "train-images-idx3-ubyte.gz").exists()
except Exception:  # noqa: BLE001
    HAVE_MNIST = False
pytestmark = pytest.mark.skipif(not HAVE_MNIST, reason="MNIST IDX files not in the data folder (../shared/data/mnist)")


def base(**kw) -> dict:
    r = {
        "name": "t", "seed": 0, "model": {"name": "lenet5"},
        "data": {"name": "mnist", "limit": 1000, "eval_limit": 300, "batch_size": 128, "eval_batch_size": 300},
        "prune": {"structure": "unstructured", "sparsity": 0.8},
        "algorithm": {"name": "oneshot"},
        "train": {"optimizer": "adam", "lr": 1e-3, "epochs": 0.5, "scheduler": "none"},
        "dense": {"epochs": 3},
    }
    r.update(kw)
    return r


@pytest.fixture(scope="module")
def dense(tmp_path_factory, monkeypatch_module=None):
    import os
    os.environ["PRUNEKIT_NO_PROGRESS"] = "1"
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("dense")
    res = run_pipeline(parse_recipe(base(retrain={"epochs": 0})), out, log=lambda *_: None)
    return out / "dense", res["dense_score"]


ALGOS = {
    "gradual": {},
    "admm": {"rho": 0.01, "rho_growth": 1.5, "update_every": 1},
    "admm_progressive": {"targets": [0.5, 0.8], "rho": 0.01, "update_every": 1},
    "slr": {"rho": 0.01, "update_every": 1},
    "group_lasso": {"lam": 1e-5, "reweight_every": 1},
}


def _check_run(out: Path, res: dict, structure: str, sparsity: float):
    data = json.loads((out / "results.json").read_text())
    for k in ("score", "dense_score", "score_after_hard_prune", "sparsity", "compression_rate",
              "targeted_compression_rate", "params", "nonzero_params"):
        assert isinstance(data[k], (int, float)) and math.isfinite(data[k]), k
    model = get_model("lenet5")
    _, masks, _ = load_checkpoint(out, model)
    assert set(masks.names()) == {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}
    params = dict(model.named_parameters())
    for n, m in masks.items():
        if structure == "unstructured":
            assert m.numel() - int(m.sum()) == round(sparsity * m.numel()), n
        elif structure == "row":
            rows = as_matrix(m).sum(1)
            assert int((rows == 0).sum()) == round(sparsity * m.shape[0]), n
        assert bool((params[n].detach()[~m] == 0).all()), f"{n}: pruned weights not zero after retraining"
    assert data["targeted_compression_rate"] == pytest.approx(1 / (1 - sparsity), rel=0.02)
    return data


@pytest.mark.parametrize("algo", list(ALGOS))
def test_algorithm_end_to_end(dense, tmp_path, algo):
    ckpt, dense_acc = dense
    assert dense_acc > 75.0
    r = base(model={"name": "lenet5", "checkpoint": str(ckpt)}, algorithm={"name": algo, "params": ALGOS[algo]},
             retrain={"epochs": 0.5})
    res = run_pipeline(parse_recipe(r), tmp_path, log=lambda *_: None)
    data = _check_run(tmp_path, res, "unstructured", 0.8)
    assert data["algorithm"] == algo and data["dense_score"] == pytest.approx(dense_acc)
    assert data["score"] > ACC_BAR
    assert data["algorithm_state_keys"]


def test_structured_admm_row(dense, tmp_path):
    ckpt, _ = dense
    r = base(model={"name": "lenet5", "checkpoint": str(ckpt)},
             prune={"structure": "row", "sparsity": 0.5, "targets": {"exclude": ["fc2"]}},
             algorithm={"name": "admm", "params": ALGOS["admm"]}, retrain={"epochs": 0.5})
    run_pipeline(parse_recipe(r), tmp_path, log=lambda *_: None)
    data = json.loads((tmp_path / "results.json").read_text())
    _, masks, _ = load_checkpoint(tmp_path, get_model("lenet5"))
    assert set(masks.names()) == {"conv1.weight", "conv2.weight", "fc1.weight"}
    for n, m in masks.items():
        rows = as_matrix(m).sum(1)
        assert bool(((rows == 0) | (rows == as_matrix(m).shape[1])).all())
        assert int((rows == 0).sum()) == round(0.5 * m.shape[0])
    assert data["score"] > ACC_BAR


@pytest.mark.parametrize("name", ["gradual", "admm", "admm_progressive", "slr", "group_lasso"])
def test_recipes_parse(name):
    from prunekit.pipelines.recipe import load_recipe
    r = load_recipe(RECIPES / f"lenet5_{name}.yaml", ["data.limit=100"])
    assert r.algorithm.name == name and r.data.limit == 100
    r = load_recipe(RECIPES / "resnet18_cifar10.yaml", ["train.epochs=0.1"])
    assert r.model.name == "resnet18_cifar" and r.train.epochs == 0.1
