"""``obs_structured`` takes its heads / KV groups / neurons from the traced graph: GPT-2 (Conv1D) and Llama
(GQA, gated MLP) work like BERT, beat magnitude on the same groups, and the result compacts verified."""
from __future__ import annotations

import pytest
import torch

import prunekit
from hf_tiny import tiny
from prunekit.algorithms.base import get_algorithm_class
from prunekit.algorithms.calibration import CalibrationConfig
from prunekit.core.errors import RecipeError
from prunekit.core.plan import PruneSpec
from prunekit.core.targets import TargetSpec
from prunekit.graph import coupled_groups
from prunekit.graph.families import default_targets

transformers = pytest.importorskip("transformers")


def _items(n=16, seq=12):
    g = torch.Generator().manual_seed(5)
    return [{"input_ids": torch.randint(3, 100, (seq,), generator=g), "attention_mask": torch.ones(seq, dtype=torch.long)}
            for _ in range(n)]


def _obs(model, kinds="heads+neurons", sparsity=0.5, **params):
    cls = get_algorithm_class("obs_structured")
    algo = cls(cls.Params(kinds=kinds, **params), PruneSpec("unstructured", sparsity, targets=default_targets(model)))
    algo.calibration = CalibrationConfig(samples=16, batch_size=8)
    algo.calibration_loader = torch.utils.data.DataLoader(_items(), batch_size=8)
    return algo.final_masks(model)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _zeroed_units(model, groups):
    """Units of each group whose every weight slice is all zero."""
    params = dict(model.named_parameters())
    out = {}
    for g in groups:
        weights = [t for t in g.tensors if params[t].dim() >= 2]
        out[g.name] = int((g.partition({t: params[t] for t in weights}, only=weights) == 0).all(1).sum())
    return out


@pytest.mark.parametrize("family,attn", [("gpt2", "heads"), ("llama", "kv_groups")])
def test_obs_structured_graph_groups_zero_exact_units_beat_magnitude_and_compact(family, attn):
    dense = tiny(family)
    batch = {k: torch.stack([it[k] for it in _items()]) for k in ("input_ids", "attention_mask")}
    ref = _logits(dense, batch)
    x = {k: v[:2] for k, v in batch.items()}
    groups = [g for g in coupled_groups(dense, x, (attn, "neurons")) if g.removable]
    assert {g.kind for g in groups} == {attn, "neurons"} and len(groups) == 4

    model = tiny(family)
    masks = _obs(model)
    want = {g.name: g.count // 2 for g in groups}            # 50 %: GPT-2 2 of 4 heads, 64 of 128 neurons; Llama 1 of 2 KV groups, 32 of 64
    assert _zeroed_units(model, groups) == want
    assert set(masks.structures.values()) <= {attn, "neurons"}
    for n, m in masks.items():
        assert (dict(model.named_parameters())[n][~m] == 0).all()

    magnitude = tiny(family)                                  # the same groups and counts, magnitude (l2) scores
    prunekit.prune(magnitude, f"{attn}+neurons", 0.5, groups=groups, targets=default_targets(magnitude))
    assert _zeroed_units(magnitude, groups) == want
    err_obs = float((_logits(model, batch) - ref).pow(2).mean())
    err_mag = float((_logits(magnitude, batch) - ref).pow(2).mean())
    assert err_obs < 0.7 * err_mag, (err_obs, err_mag)       # reconstruction on the calibration data pays

    masked = _logits(model, x)
    res = prunekit.compact(model, masks, x, count_macs=False)
    assert res.removed == want and res.rel_err <= 1e-4
    torch.testing.assert_close(_logits(model, x), masked, rtol=1e-4, atol=1e-5 * float(masked.abs().max()))


def test_obs_structured_refuses_when_no_group_is_a_target():
    model = tiny("gpt2")
    cls = get_algorithm_class("obs_structured")
    algo = cls(cls.Params(), PruneSpec("unstructured", 0.5, targets=TargetSpec(include=["lm_head"])))
    algo.calibration = CalibrationConfig(samples=8, batch_size=8)
    algo.calibration_loader = torch.utils.data.DataLoader(_items(8), batch_size=8)
    with pytest.raises(RecipeError, match="no removable heads/kv_groups/neurons groups"):
        algo.final_masks(model)
