"""Structure strings that parse back to the same axis (HF Conv1D), and group counts that round to zero."""
from __future__ import annotations

import logging
import warnings

import pytest
import torch

import prunekit
from hf_tiny import example, tiny
from prunekit.core.errors import RecipeError
from prunekit.core.plan import PruneSpec, compute_masks
from prunekit.core.structures import NM, Transposed, parse_structure
from prunekit.graph.families import default_targets
from prunekit.io.checkpoint import load_checkpoint, save_checkpoint

C_ATTN = "transformer.h.0.attn.c_attn.weight"          # HF Conv1D, stored (in=32, out=96)


def test_conv1d_mask_structure_round_trips_through_a_saved_maskset(tmp_path):
    model = tiny("gpt2")
    masks = compute_masks(model, PruneSpec("nm:2:4", 0.5, targets=default_targets(model)))
    assert masks.structures[C_ATTN] == "transposed:nm:2:4"
    st = parse_structure(masks.structures[C_ATTN])
    assert st == Transposed(NM(2, 4)) and str(st) == "transposed:nm:2:4"
    save_checkpoint(tmp_path, model, masks)
    back = load_checkpoint(tmp_path, tiny("gpt2"))[1]
    assert back.names() == masks.names() and back.structures == masks.structures
    params = dict(model.named_parameters())
    for n in masks:
        assert torch.equal(back[n], masks[n])
        again = parse_structure(back.structures[n]).mask(params[n].detach(), 0.5)
        assert torch.equal(again, masks[n]), n                 # the re-parsed structure makes the same mask
    m = back[C_ATTN]
    assert bool((m.t().reshape(96, 8, 4).sum(-1) == 2).all())    # 2 of every 4 consecutive *inputs*
    wrong = parse_structure("nm:2:4").mask(params[C_ATTN].detach(), 0.5)   # what the inner string alone gives
    assert not torch.equal(wrong, m)


def test_transposed_string_parses_and_refuses_nesting():
    assert parse_structure("Transposed: block:4x4") == Transposed(parse_structure("block:4x4"))
    with pytest.raises(RecipeError, match="per-tensor structure"):
        parse_structure("transposed:transposed:row")
    with pytest.raises(RecipeError, match="per-tensor structure"):
        parse_structure("transposed:heads")
    # a recipe that already says transposed: is not wrapped twice for a Conv1D
    model = tiny("gpt2")
    a = compute_masks(model, PruneSpec("transposed:nm:2:4", 0.5, targets=default_targets(model)))
    b = compute_masks(model, PruneSpec("nm:2:4", 0.5, targets=default_targets(model)))
    assert torch.equal(a[C_ATTN], b[C_ATTN])


def test_global_scope_ranks_conv1d_in_its_own_orientation():
    model = tiny("gpt2")
    masks = compute_masks(model, PruneSpec("row", 0.5, scope="global", targets=default_targets(model)))
    m = masks[C_ATTN]                                         # whole output units = whole columns of (in, out)
    assert bool((m.all(0) == m.any(0)).all()) and masks.structures[C_ATTN] == "transposed:row"


def test_group_count_rounding_to_zero_warns_and_logs(caplog):
    model, x = tiny("llama"), example("llama")                # 2 KV heads per layer
    with warnings.catch_warnings(record=True) as got, caplog.at_level(logging.WARNING, logger="prunekit"):
        warnings.simplefilter("always")
        masks = prunekit.prune(model, "kv_groups", 0.25, example_inputs=x, targets=default_targets(model))
    msg = "kv_groups: 25% of 2 groups rounds to 0 — nothing pruned in model.layers.0.self_attn, model.layers.1.self_attn"
    assert [str(w.message) for w in got if issubclass(w.category, UserWarning)] == [msg]
    assert [r.getMessage() for r in caplog.records] == [msg]
    assert masks.sparsity() == 0.0
    with warnings.catch_warnings():                           # 50 % of 2 rounds to 1: no warning
        warnings.simplefilter("error")
        half = prunekit.prune(tiny("llama"), "kv_groups", 0.5, example_inputs=x, targets=default_targets(model))
    assert half.sparsity() > 0
