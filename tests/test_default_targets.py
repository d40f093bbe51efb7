"""One default for what is pruned, in every entry point: on a transformer the matrices of its repeated
blocks (embeddings and the LM head — tied or not — stay dense unless asked for), on other models every
layer; targets that match nothing are a RecipeError naming the pattern, before any work."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit
from hf_tiny import FAMILIES, example, tiny
from prunekit.core.errors import RecipeError
from prunekit.core.targets import TargetSpec, find_targets, resolve_targets


def _entry_points(model: nn.Module, sparsity: float):
    yield "prunekit.prune", lambda: prunekit.prune(model, "unstructured", sparsity, apply=False)
    yield "compute_masks", lambda: prunekit.compute_masks(model, prunekit.PruneSpec("unstructured", sparsity))
    yield "Pruner(spec dict)", lambda: prunekit.Pruner(model, {"structure": "unstructured",
                                                               "sparsity": sparsity}).final_masks()
    yield "Pruner(recipe dict)", lambda: prunekit.Pruner(model, {"prune": {"structure": "unstructured",
                                                                           "sparsity": sparsity}}).final_masks()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lm_head_and_embeddings_stay_dense_in_every_entry_point(family):
    model = tiny(family)
    per_layer = FAMILIES[family][3]
    dense = {n for n, _ in model.named_parameters() if any(k in n for k in ("lm_head", "wte", "wpe", "embed"))}
    assert dense                                               # the model has them
    for entry, masks_of in _entry_points(model, 0.5):
        masks = masks_of()
        assert len(masks) == 2 * per_layer, entry             # every block matrix of both layers ...
        assert not set(masks.names()) & dense, entry          # ... and nothing else
        assert all(".h." in n or ".layers." in n for n in masks.names()), entry
        for n in masks.names():
            assert masks.sparsity(n) == pytest.approx(0.5, abs=1e-6), (entry, n)


def test_a_cnn_keeps_every_layer_as_default_target():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    assert resolve_targets(model, TargetSpec()) == TargetSpec()
    assert list(find_targets(model)) == ["0.weight", "3.weight"]


def test_the_lm_head_is_pruned_when_asked_for_by_name():
    model = tiny("llama")
    masks = prunekit.prune(model, "unstructured", 0.5, targets={"include": ["model.layers.*", "lm_head"]})
    assert "lm_head.weight" in masks and masks.sparsity("lm_head.weight") == pytest.approx(0.5, abs=1e-3)
    assert not [n for n in masks.names() if "embed" in n]


def test_targets_matching_nothing_are_a_recipe_error_in_every_entry_point():
    model = tiny("bert")                                   # names start with bert.encoder, not encoder
    bad = {"include": ["encoder.*"], "types": ["Linear"]}
    calls = [
        lambda: prunekit.prune(model, "nm:2:4", 0.5, targets=bad),
        lambda: prunekit.compute_masks(model, prunekit.PruneSpec("nm:2:4", 0.5, targets=TargetSpec(**bad))),
        lambda: prunekit.Pruner(model, {"structure": "nm:2:4", "sparsity": 0.5, "targets": bad}),   # at once
        lambda: prunekit.Pruner(model, {"prune": {"structure": "nm:2:4", "sparsity": 0.5, "targets": bad}}),
    ]
    for call in calls:
        with pytest.raises(RecipeError, match=r"'encoder\.\*' matches no Linear module; candidates: \['bert\."):
            call()
    with pytest.raises(RecipeError, match="leave nothing to prune"):
        prunekit.prune(model, "unstructured", 0.5, targets={"include": ["bert.pooler.*"], "exclude": ["bert.pooler*"]})
    with pytest.raises(RecipeError, match=r"unknown keys \['includes'\]; valid: include, exclude, types"):
        prunekit.prune(model, "unstructured", 0.5, targets={"includes": ["bert.*"]})
    with pytest.raises(RecipeError, match="targets.include must be a list of strings"):
        prunekit.prune(model, "unstructured", 0.5, targets={"include": "bert.*"})
    with pytest.raises(RecipeError, match=r"prune spec: unknown keys \['sparsty'\]"):
        prunekit.Pruner(model, {"structure": "unstructured", "sparsty": 0.5})
    with pytest.raises(RecipeError, match=r"include=\['bert.pooler.\*'\] .* hold no producing layer of any heads group"):
        prunekit.prune(model, "heads", 0.5, example_inputs=example("bert"), targets={"include": ["bert.pooler.*"]})
    assert torch.count_nonzero(model.bert.encoder.layer[0].intermediate.dense.weight) == 32 * 64   # untouched


def test_conv1d_and_conv3d_layers_are_default_targets():
    """A sequence CNN (Conv1d) or a video CNN (Conv3d) is pruned in every weight layer by default — before, only its
    Linear head was, while the run reported the head's 50% as the targeted sparsity."""
    model = nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), nn.Conv1d(8, 6, 3), nn.Flatten(), nn.Linear(6 * 4, 3))
    video = nn.Sequential(nn.Conv3d(2, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    assert list(find_targets(model)) == ["0.weight", "2.weight", "4.weight"]
    assert list(find_targets(video)) == ["0.weight", "2.weight"]
    masks = prunekit.prune(model, "nm:2:4", 0.5, apply=False)
    assert masks.names() == ["0.weight", "2.weight", "4.weight"]
    for n in masks.names():
        assert masks.sparsity(n) == 0.5
