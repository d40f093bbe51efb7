"""The pruning core: structures, selection, masks/hard-prune, targets, checkpoints, reports, recipes."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as tprune

import prunekit
from prunekit import MaskSet, PruneSpec, TargetSpec, compute_masks, mask_for, parse_structure
from prunekit.core.errors import RecipeError
from prunekit.core.stats import count_flops, model_summary
from prunekit.core.structures import NM, Block, Pattern
from prunekit.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from prunekit.pipelines.recipe import parse_recipe

ALL_STRUCTURES = ["unstructured", "row", "column", "block:4x4", "block:3x5", "nm:2:4", "nm:1:3",
                  "pattern:4", "pattern:4:8", "pattern+conn"]


# ---- equality with torch.nn.utils.prune ---------------------------------------------------------
@pytest.mark.parametrize("amount", [0.1, 0.37, 0.5, 0.9])
def test_masks_equal_torch_prune(amount):
    torch.manual_seed(1)
    w = torch.randn(33, 47)

    def ref(fn, **kw):
        lin = nn.Linear(47, 33)
        lin.weight.data.copy_(w)
        fn(lin, "weight", amount=amount, **kw)
        return lin.weight_mask.bool()

    assert torch.equal(mask_for(w, "unstructured", amount), ref(tprune.l1_unstructured))
    assert torch.equal(mask_for(w, "row", amount), ref(tprune.ln_structured, n=2, dim=0))
    assert torch.equal(mask_for(w, "column", amount), ref(tprune.ln_structured, n=2, dim=1))


# ---- exact masks on hand-built tensors --------------------------------------------------------
def test_block_mask_exact():
    w = torch.tensor([[1., 1, 9, 9],
                      [1, 1, 9, 9],
                      [5, 5, 0.1, 0.1],
                      [5, 5, 0.1, 0.1]])
    m = mask_for(w, "block:2x2", 0.5)
    expect = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(m, expect)


def test_partial_edge_blocks():
    # 3x5 with 2x2 blocks: block grid 2x3, edge blocks are 2x1, 1x2 and 1x1
    w = torch.arange(1., 16.).reshape(3, 5)
    st = Block(2, 2)
    assert st.num_groups(w.shape) == 6
    valid = st.valid(w.shape).sum(1).tolist()
    assert valid == [4, 4, 2, 2, 2, 1]
    m = mask_for(w, st, 0.5)  # prune lowest per-weight scores while <= round(7.5) = 8 weights are gone
    # L2 per real weight (RMS): blocks (0,0)=[1,2,6,7] 4.74, (0,1)=[3,4,8,9] 6.60, (0,2)=[5,10] 7.91,
    # (1,0)=[11,12] 11.5, (1,1)=[13,14] 13.5, (1,2)=[15] 15 → (0,0) and (0,1): 8 weights
    expect = torch.tensor([[0, 0, 0, 0, 1], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(m, expect)


def test_nm_mask_exact_and_partial_group():
    w = torch.tensor([[0.1, -3., 2., 0.5, 7., 0.2],
                      [4., 3., 2., 1., -0.1, 0.3]])
    m = mask_for(w, "nm:2:4", 0.5)
    # groups of 4 along each row, the last group is partial (2 weights) and keeps min(2, 2)
    expect = torch.tensor([[0, 1, 1, 0, 1, 1], [1, 1, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(m, expect)
    assert NM(2, 4).fixed_sparsity(w.shape) == 0.5
    with pytest.raises(ValueError, match="beyond"):
        mask_for(w, "nm:2:4", 0.75)


def test_nm_every_group_keeps_n_on_conv():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)  # matrix view 8x36, 9 groups of 4 per row
    m = mask_for(w, "nm:2:4", 0.5).reshape(8, 36).reshape(8, 9, 4)
    assert torch.all(m.sum(-1) == 2)


def test_pattern_picks_best_pattern_per_kernel():
    pats = torch.tensor([[1, 1, 0, 1, 0, 0, 0, 0, 0],
                         [0, 0, 0, 0, 1, 1, 0, 1, 1]], dtype=torch.bool)
    st = Pattern(keep=4, patterns=pats)
    w = torch.zeros(2, 1, 3, 3)
    w[0, 0] = torch.tensor([[5., 5, 0], [5, 1, 0], [0, 0, 0]])   # top-left energy → pattern 0
    w[1, 0] = torch.tensor([[1., 0, 0], [0, 2, 2], [0, 2, 2]])   # bottom-right → pattern 1
    m = st.mask(w, 5 / 9)
    assert torch.equal(m[0, 0].reshape(-1), pats[0])
    assert torch.equal(m[1, 0].reshape(-1), pats[1])


def test_pattern_connectivity_reaches_target():
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    m = mask_for(w, "pattern:4+conn", 0.75)
    kernels = m.reshape(-1, 9).sum(1)
    assert set(kernels.unique().tolist()) <= {0, 4}           # pattern or removed kernel
    assert abs((1 - m.float().mean().item()) - 0.75) < 4 / m.numel() + 1e-6
    with pytest.raises(ValueError, match="connectivity"):
        mask_for(w, "pattern:4", 0.75)                          # 4 of 9 = 55.6% without conn


# ---- selection rules ----------------------------------------------------------------------------
def test_count_rule_and_deterministic_ties():
    w = torch.ones(10)[None].repeat(1, 1)  # 1x10, all equal
    m = mask_for(w, "unstructured", 0.25)  # round(2.5) = 2 (ties to even, as torch.nn.utils.prune)
    assert int((~m).sum()) == 2
    assert torch.equal(~m[0], torch.tensor([1, 1, 0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.bool))
    assert torch.equal(m, mask_for(w, "unstructured", 0.25))


@pytest.mark.parametrize("spec", ALL_STRUCTURES)
@pytest.mark.parametrize("shape", [(24, 40), (12, 6, 3, 3), (10, 13)])
def test_partition_round_trip(spec, shape):
    st = parse_structure(spec)
    w = torch.randn(shape)
    try:
        st.check_shape(shape)
    except ValueError:
        return  # shape rejected up front with a clear message (tested below)
    assert torch.equal(st.unpartition(st.partition(w), shape), w)
    m = st.mask(w, 0.6 if "conn" in spec or spec == "pattern+conn" else 0.5)
    assert m.dtype == torch.bool and m.shape == w.shape


def test_bad_inputs_clear_errors():
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        mask_for(torch.randn(4, 4), "row", 1.5)
    with pytest.raises(ValueError, match="unknown structure 'blok:4x4'.*valid"):
        parse_structure("blok:4x4")
    with pytest.raises(ValueError, match="N <= M"):
        parse_structure("nm:5:4")
    with pytest.raises(ValueError, match="does not fit"):
        mask_for(torch.randn(3, 8), "block:4x4", 0.5)
    with pytest.raises(ValueError, match="unknown score"):
        mask_for(torch.randn(4, 4), "row", 0.5, score="l7")


def test_global_scope_ranks_across_layers():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    model[0].weight.data = torch.tensor([[1., 2.], [3., 4.]])
    model[1].weight.data = torch.tensor([[0.5, 5.], [6., 0.1]])
    spec = PruneSpec("unstructured", 0.5, scope="global")
    ms = compute_masks(model, spec)
    assert torch.equal(ms["0.weight"], torch.tensor([[False, False], [True, True]]))
    assert torch.equal(ms["1.weight"], torch.tensor([[False, True], [True, False]]))


def test_overrides_per_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 10))
    ms = compute_masks(model, PruneSpec("unstructured", 0.5, overrides={"2.weight": 0.8}))
    assert ms.sparsity("0.weight") == 0.5 and ms.sparsity("2.weight") == 0.8
    with pytest.raises(ValueError, match="match no targeted parameter"):
        compute_masks(model, PruneSpec("unstructured", 0.5, overrides={"nope*": 0.8}))


# ---- targets -------------------------------------------------------------------------------------
def test_targets_patterns_and_errors():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))
    t = prunekit.find_targets(model, TargetSpec(include=["*"], types=["Linear"]))
    assert list(t) == ["2.weight"]
    with pytest.raises(ValueError, match=r"'encoder\.\*' matches no.*candidates: \['0', '2'\]"):
        prunekit.find_targets(model, TargetSpec(include=["encoder.*"]))
    t = prunekit.find_targets(model, TargetSpec(exclude=["2.weight"]))
    assert list(t) == ["0.weight"]
    with pytest.raises(ValueError, match=r"exclude pattern 'fc2' matches no"):
        prunekit.find_targets(model, TargetSpec(exclude=["fc2"]))
    with pytest.raises(ValueError, match="unknown module type"):
        prunekit.find_targets(model, TargetSpec(types=["Dense"]))


# ---- hard prune -------------------------------------------------------------------------------------
@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adam"])
def test_hard_prune_keeps_zeros_with_momentum_and_adam(opt_name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    make = {"sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
            "adam": lambda p: torch.optim.Adam(p, lr=0.01)}[opt_name]
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))

    def train(model, opt, steps=10):
        for _ in range(steps):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    # without hard-prune, momentum/Adam state revives pruned weights (so the test below means something)
    opt = make(model.parameters())
    train(model, opt, 3)   # build optimizer state
    masks = prunekit.prune(model, "unstructured", 0.7)
    train(model, opt, 3)
    assert (model[0].weight[~masks["0.weight"]] != 0).any()

    masks.apply(model)
    with masks.attach(model, opt):
        train(model, opt, 10)
        assert (model[0].weight[~masks["0.weight"]] == 0).all()
        assert (model[2].weight[~masks["2.weight"]] == 0).all()
        assert model[0].weight.grad[~masks["0.weight"]].abs().sum() == 0
    assert abs(masks.sparsity() - 0.7) < 1e-3


def test_masks_only_shrink_and_state_round_trip():
    ms = MaskSet()
    ms.update("w", torch.tensor([True, True, False, True]), "unstructured")
    out = ms.update("w", torch.tensor([True, False, True, True]))
    assert torch.equal(out, torch.tensor([True, False, False, True]))
    other = MaskSet()
    other.load_state_dict(ms.state_dict())
    assert torch.equal(other["w"], ms["w"]) and other.structures == {"w": "unstructured"}


# ---- checkpoints ---------------------------------------------------------------------------------------
def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def test_checkpoint_round_trip_and_corruption(tmp_path):
    m = _tiny()
    masks = prunekit.prune(m, "row", 0.5)
    save_checkpoint(tmp_path, m, masks, recipe={"name": "t"})
    m2 = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    state, masks2, manifest = load_checkpoint(tmp_path, m2)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    assert torch.equal(masks2["0.weight"], masks["0.weight"]) and masks2.structures["0.weight"] == "row"
    assert manifest["recipe"] == {"name": "t"}
    assert not list(tmp_path.glob("*.tmp"))                      # atomic writes leave no temp files

    wrong = nn.Sequential(nn.Linear(8, 15), nn.ReLU(), nn.Linear(15, 2))
    with pytest.raises(CheckpointError, match=r"'0.weight' has shape \(16, 8\).*\(15, 8\)"):
        load_checkpoint(tmp_path, wrong)

    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path, m2)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest.*corrupt"):
        load_checkpoint(tmp_path)


def test_checkpoint_never_pickles(tmp_path):
    save_checkpoint(tmp_path, _tiny(), None)
    head = (tmp_path / "model.safetensors").read_bytes()[:8]
    header_len = int.from_bytes(head, "little")
    json.loads((tmp_path / "model.safetensors").read_bytes()[8:8 + header_len])  # safetensors JSON header


# ---- reports ---------------------------------------------------------------------------------------------
def test_summary_numbers_hand_checked():
    m = _tiny()  # 8*16+16 + 16*2+2 = 178 params
    masks = prunekit.prune(m, "unstructured", 0.5)
    s = model_summary(m, masks, torch.randn(1, 8))
    assert s["params"] == 178
    assert s["targeted_params"] == 160 and s["targeted_nonzeros"] == 80
    assert s["sparsity"] == 0.5
    nz_bias = int((m[0].bias != 0).sum() + (m[2].bias != 0).sum())
    assert math.isclose(s["compression_rate"], 178 / (80 + nz_bias))
    assert s["flops"] == 2 * 160 and s["nonzero_flops"] == 2 * 80


def test_flops_lenet5_hand_computed():
    from prunekit.models.registry import get_model
    m = get_model("lenet5")
    f = count_flops(m, torch.randn(1, 1, 28, 28))["flops"]
    macs = 20 * 24 * 24 * 25 + 50 * 8 * 8 * 20 * 25 + 800 * 500 + 500 * 10
    assert f == 2 * macs


# ---- recipes ----------------------------------------------------------------------------------------------
def test_recipe_unknown_key_and_bad_values():
    with pytest.raises(RecipeError, match=r"unknown recipe key prune\.sparsty; valid keys of prune: \[.*'sparsity'"):
        parse_recipe({"prune": {"sparsty": 0.5}})
    with pytest.raises(RecipeError, match=r"sparsity: 1.5 is out of range"):
        parse_recipe({"prune": {"sparsity": 1.5}})
    with pytest.raises(RecipeError, match="structure: unknown structure 'blok:4x4'"):
        parse_recipe({"prune": {"structure": "blok:4x4"}})
    with pytest.raises(RecipeError, match=r"optimizer: 'sgdd' is not one of"):
        parse_recipe({"train": {"optimizer": "sgdd"}})
    with pytest.raises(RecipeError, match=r"unknown key\(s\) \['retrain.epoch'\]"):
        parse_recipe({"retrain": {"epoch": 2}})
    with pytest.raises(ValueError, match="unknown algorithm 'admn'"):
        parse_recipe({"algorithm": {"name": "admn"}})
    r = parse_recipe({"train": {"epochs": 3}, "retrain": {"lr": 0.5}}, ["train.epochs=1", "data.limit=100"])
    assert r.phase("retrain").epochs == 1 and r.phase("retrain").lr == 0.5 and r.data.limit == 100


def test_global_scope_equal_and_unequal_group_sizes_agree_with_sorting():
    from prunekit.core.scoring import select_keep_global
    torch.manual_seed(3)
    scores = [torch.rand(50), torch.rand(70)]
    # equal sizes: fast threshold path; reference = prune the lowest round(s*N) of the concatenation
    keeps = select_keep_global(scores, [torch.ones(50), torch.ones(70)], 0.4)
    flat = torch.cat(scores)
    ref = flat > flat.sort().values[47]
    assert torch.equal(torch.cat(keeps), ref) and int((~ref).sum()) == 48
    # unequal sizes: whole groups pruned in score order while the pruned weight count stays <= target
    sizes = [torch.full((50,), 2), torch.full((70,), 3)]
    keeps = select_keep_global(scores, sizes, 0.5)
    pruned = sum(int(((~k) * z).sum()) for k, z in zip(keeps, sizes))
    assert pruned <= round(0.5 * 310) and pruned > round(0.5 * 310) - 3
