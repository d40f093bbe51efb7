"""Sensitivity analysis: exact drops on a synthetic eval, equal-drop budget allocation, the YAML snippet
loading as recipe overrides with the budget met, and the CLI end to end on a tiny budget."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch import nn

from prunekit.algorithms.sensitivity import (
    Sensitivity,
    allocate_budget,
    layer_sensitivity,
    overall_sparsity,
    overrides_yaml,
    parse_sparsities,
)
from prunekit.core.plan import PruneSpec, compute_masks
from prunekit.pipelines.recipe import parse_recipe
from prunekit.pipelines.runner import prune_spec_from


def mlp():
    m = nn.Sequential(nn.Linear(10, 1, bias=False), nn.ReLU(), nn.Linear(1, 10, bias=False))
    with torch.no_grad():
        m[0].weight.copy_(torch.arange(1.0, 11.0).reshape(1, 10))          # |w| = 1..10
        m[2].weight.copy_(torch.full((10, 1), 3.0))                        # all 3
    return m


def l1_mass(model):
    """Synthetic metric: total |w| of the model — pruning k smallest entries drops it by their sum."""
    return float(sum(p.abs().sum() for p in model.parameters()))


def test_layer_sensitivity_exact_drops_and_weights_restored():
    m = mlp()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    sens = layer_sensitivity(m, l1_mass, PruneSpec("unstructured", 0.5), [0.3, 0.5, 0.9])
    assert sens.dense_score == 55.0 + 30.0
    assert sens.curves["0.weight"] == [(0.3, 6.0), (0.5, 15.0), (0.9, 45.0)]   # 1+2+3, 1..5, 1..9
    assert sens.curves["2.weight"] == [(0.3, 9.0), (0.5, 15.0), (0.9, 27.0)]   # 3, 5, 9 entries of 3
    assert sens.numel == {"0.weight": 10, "2.weight": 10}
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])


def test_layer_sensitivity_row_structure():
    m = nn.Sequential(nn.Linear(2, 4, bias=False))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[1.0, 0], [2, 0], [3, 0], [4, 0]]))
    sens = layer_sensitivity(m, l1_mass, PruneSpec("row", 0.5), [0.5])
    assert sens.curves["0.weight"] == [(0.5, 3.0)] and sens.structures["0.weight"] == "row"


def _hand(curves, numel):
    sps = sorted({s for pts in curves.values() for s, _ in pts})
    return Sensitivity("m", 1.0, sps, curves, numel, {k: "unstructured" for k in curves})


def test_allocate_equal_drop_exact():
    # A: drop = s ; B: drop = 2 s (both linear), equal sizes; budget 0.45 → τ = 0.6 → A 0.6, B 0.3
    sens = _hand({"A": [(0.5, 0.5), (0.9, 0.9)], "B": [(0.25, 0.5), (0.45, 0.9)]}, {"A": 100, "B": 100})
    r = allocate_budget(sens, 0.45)
    assert r["A"] == pytest.approx(0.6, abs=1e-6) and r["B"] == pytest.approx(0.3, abs=1e-6)
    assert overall_sparsity(r, sens.numel) == pytest.approx(0.45, abs=1e-9)


def test_allocate_flat_curve_and_noise_and_weights():
    # C is insensitive up to 0.9 (flat, noisy-negative); it fills first; blending keeps the budget exact
    sens = _hand({"C": [(0.3, -0.1), (0.6, 0.0), (0.9, 0.0)], "D": [(0.3, 1.0), (0.6, 2.0), (0.9, 5.0)]},
                 {"C": 300, "D": 100})
    r = allocate_budget(sens, 0.7)
    assert r["C"] == pytest.approx(0.9, abs=1e-6)
    assert r["D"] == pytest.approx((0.7 * 400 - 0.9 * 300) / 100, abs=1e-6)        # 0.1
    r2 = allocate_budget(sens, 0.5)    # C alone on its flat part: 0.5*400/300 of it, D stays 0
    assert overall_sparsity(r2, sens.numel) == pytest.approx(0.5, abs=1e-9) and r2["D"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="exceeds what the sweep covers"):
        allocate_budget(sens, 0.95)
    with pytest.raises(ValueError, match=r"budget must be in \(0, 1\)"):
        allocate_budget(sens, 1.0)


def test_snippet_loads_as_recipe_overrides_and_meets_budget():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(256, 64)
    ref = model(x).detach()

    def fidelity(m):   # higher is better: negative output error vs the dense model
        return -float((m(x) - ref).pow(2).mean())

    sens = layer_sensitivity(model, fidelity, PruneSpec("unstructured", 0.5), [0.2, 0.5, 0.8, 0.95])
    budget = 0.7
    snippet = overrides_yaml(allocate_budget(sens, budget), budget=budget, sens=sens)
    raw = {"name": "t", "prune": {"structure": "unstructured"}}
    raw["prune"].update(yaml.safe_load(snippet)["prune"])
    recipe = parse_recipe(raw)
    assert set(recipe.prune.overrides) == {"0.weight", "2.weight", "4.weight"}
    masks = compute_masks(model, prune_spec_from(recipe))
    assert abs(masks.sparsity() - budget) < 0.005
    # the least sensitive layer gets more than the budget, the most sensitive less
    ov = recipe.prune.overrides
    assert max(ov.values()) > budget > min(ov.values())


def test_parse_sparsities():
    assert parse_sparsities("0.5,0.1, 0.5") == [0.1, 0.5]
    with pytest.raises(ValueError, match="must be in"):
        parse_sparsities("0.5,1.0")
    with pytest.raises(ValueError, match="comma-separated"):
        parse_sparsities("a,b")


def test_cli_sensitivity_end_to_end(tmp_path, capsys):
    from prunekit.cli.main import main
    out = tmp_path / "s"
    rc = main(["sensitivity", "recipes/lenet5_oneshot.yaml", "--set", "data.limit=200", "--set", "dense.epochs=0",
               "--sparsities", "0.5,0.9", "--budget", "0.8", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "sensitivity.json").read_text())
    assert set(res["curves"]) == {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}
    assert all(len(v) == 2 for v in res["curves"].values())
    assert overall_sparsity(res["allocation"], res["numel"]) == pytest.approx(0.8, abs=1e-6)
    assert (out / "sensitivity.png").stat().st_size > 1000
    snip = yaml.safe_load((out / "overrides.yaml").read_text())
    assert snip["prune"]["sparsity"] == 0.8 and set(snip["prune"]["overrides"]) == set(res["curves"])
    assert "| conv1.weight | unstructured | 500 |" in capsys.readouterr().out
    assert main(["sensitivity", "recipes/lenet5_oneshot.yaml", "--sparsities", "0.5,2", "--out", str(out)]) == 2
