"""Every HF family gets default targets (all attention and MLP matrices of every layer; embeddings, LM
head, pooler and classifier excluded), unstructured and N:M masks, and tied weights never raise."""
from __future__ import annotations

import pytest
import torch

import prunekit
from hf_tiny import FAMILIES, example, tiny
from prunekit import PruneSpec, compute_masks, prune
from prunekit.core.stats import count_flops
from prunekit.core.targets import find_targets
from prunekit.graph.families import default_targets


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_default_targets_are_the_block_matrices(family):
    model = tiny(family)
    names = list(find_targets(model, default_targets(model)))
    per_layer = FAMILIES[family][3]
    assert len(names) == (per_layer if family == "albert" else 2 * per_layer)   # ALBERT shares one layer
    bad = ("embed", "wte", "wpe", "lm_head", "pooler", "classifier", "score")
    assert not [n for n in names if any(b in n for b in bad)]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("structure,expected", [("unstructured", 0.5), ("nm:2:4", 0.5)])
def test_masks_hit_the_target_and_keep_outputs_finite(family, structure, expected):
    model = tiny(family)
    masks = compute_masks(model, PruneSpec(structure, 0.5, targets=default_targets(model)))
    assert masks.sparsity() == pytest.approx(expected, abs=1e-6)
    masks.apply(model)
    out = model(**example(family))
    logits = out.logits
    assert torch.isfinite(logits).all()


def test_tied_lm_head_never_raises_and_is_pruned_once():
    model = tiny("gpt2")
    masks = prune(model, "unstructured", 0.5, targets={"include": ["transformer.h.*", "lm_head"]})  # asked by name
    assert "lm_head.weight" not in masks.names()             # the tied weight is known by its first name
    assert "transformer.wte.weight" in masks.names()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert float((model.lm_head.weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)


def test_flops_count_gpt2_conv1d():
    model = tiny("gpt2")
    x = example("gpt2", batch=1, seq=8)
    f = count_flops(model, x)
    # per layer: c_attn 32x96, attn c_proj 32x32, c_fc 32x128, mlp c_proj 128x32; plus lm_head 32x100
    macs_per_token = 2 * (32 * 96 + 32 * 32 + 32 * 128 + 128 * 32) + 32 * 100
    assert f["flops"] == 2 * 8 * macs_per_token


def _first_conv1d(model):
    return model.transformer.h[0].attn.c_attn          # weight (in=32, out=96)


@pytest.mark.parametrize("structure", ["row", "nm:2:4", "block:4x4"])
def test_conv1d_structures_run_along_the_input_as_for_linear(structure):
    """HF Conv1D stores (in, out): the mask must equal the Linear mask of the transposed weight."""
    model = tiny("gpt2")
    layer = _first_conv1d(model)
    masks = compute_masks(model, PruneSpec(structure, 0.5, targets=default_targets(model)))
    m = masks["transformer.h.0.attn.c_attn.weight"]
    lin = torch.nn.Linear(32, 96, bias=False)
    with torch.no_grad():
        lin.weight.copy_(layer.weight.t())
    expected = compute_masks(lin, PruneSpec(structure, 0.5))["weight"]
    assert torch.equal(m, expected.t())
    if structure == "row":       # whole output units: whole columns of the (in, out) weight
        kept_cols = m.all(0)
        assert int(kept_cols.sum()) == 48 and bool((m.any(0) == kept_cols).all())
    if structure == "nm:2:4":    # 2 of every 4 consecutive inputs of each output
        assert bool((m.t().reshape(96, 8, 4).sum(-1) == 2).all())


HEADS = {"albert", "bert", "distilbert", "electra", "gpt2", "roberta", "vit"}   # "heads"; Llama/Qwen2: KV groups
RELOADS = {"llama", "qwen2", "deberta-v2", "vit"}    # config can express the result (ViT, too, reads config.head_dim)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_groups_prune_and_verified_compaction_for_every_family(family, tmp_path):
    """Heads (or KV groups) and FFN neurons found from the trace, pruned at 50% with default targets,
    physically removed; outputs equal the masked model's (surgery verifies, rel. error <= 1e-4)."""
    from prunekit.graph import coupled_groups
    model, x = tiny(family), example(family)
    kinds = {g.kind for g in coupled_groups(model, x) if g.removable}
    attn = "heads" if family in HEADS else ("kv_groups" if family in ("llama", "qwen2") else None)
    assert "neurons" in kinds and (attn is None or attn in kinds)
    structure = "neurons" if attn is None else f"{attn}+neurons"
    masks = prune(model, structure, 0.5, example_inputs=x, targets=default_targets(model))
    with torch.no_grad():
        masked = model(**x).logits
    res = prunekit.compact(model, masks, x)
    assert res.params_after < res.params_before
    assert res.rel_err <= 1e-4
    with torch.no_grad():
        torch.testing.assert_close(res.model(**x).logits, masked, rtol=1e-4, atol=1e-5)
    assert bool(res.notes) == (family not in RELOADS)        # the notes say when from_pretrained cannot reload
    if family in RELOADS:                                     # the config expresses the result: HF reloads it
        res.model.save_pretrained(tmp_path)
        again = type(res.model).from_pretrained(tmp_path).eval()
        with torch.no_grad():
            torch.testing.assert_close(again(**x).logits, masked, rtol=1e-4, atol=1e-5)
