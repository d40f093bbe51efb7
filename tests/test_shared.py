"""Shared-weights multi-sparsity models: nesting per structure, sequential freezing, in-place switching,
switch byte counts, the one-file artifact.  Tiny hand-built tensors and models only (runs in a few seconds)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.algorithms.shared_levels import JointLevels, LevelView
from prunekit.core.masks import MaskSet
from prunekit.core.nested import NestedMasks, nested_mask_for, nested_masks, shared_weights, sorted_levels
from prunekit.core.plan import PruneSpec
from prunekit.core.targets import TargetSpec
from prunekit.deploy.shared_weights import (
    SharedFormatError,
    load_level,
    patch_bytes,
    read_shared,
    save_shared,
    switch_cost,
)
from prunekit.pipelines.shared import train_joint, train_sequential
from prunekit.training.config import TrainConfig
from prunekit.training.tasks import ClassificationTask

T, F = True, False


def B(rows):
    return torch.tensor(rows, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------- nesting
def test_unstructured_nested_exact():
    w = torch.tensor([[1.0, -4.0, 2.0, 0.5, 3.0, -0.1]])
    m0 = nested_mask_for(w, "unstructured", 0.5)
    assert torch.equal(m0, B([[F, T, T, F, T, F]]))
    m1 = nested_mask_for(w, "unstructured", 1 / 6, m0)
    assert torch.equal(m1, B([[T, T, T, T, T, F]]))
    # a base that is not the magnitude top-k is still kept; the rest is chosen among the remaining ones
    base = B([[F, F, F, T, F, F]])
    assert torch.equal(nested_mask_for(w, "unstructured", 0.5, base), B([[F, T, F, T, T, F]]))


def test_row_column_block_nested_exact():
    w = torch.tensor([[3.0, 3.0], [0.1, 0.1], [2.0, 2.0]])
    base = B([[F, F], [T, T], [F, F]])                      # the weakest row
    assert torch.equal(nested_mask_for(w, "row", 1 / 3, base), B([[T, T], [T, T], [F, F]]))
    wc = w.t().contiguous()                                   # (2, 3): columns are the groups
    assert torch.equal(nested_mask_for(wc, "column", 1 / 3, base.t()), B([[T, T, F], [T, T, F]]))
    wb = torch.tensor([[1.0, 1.0, 5.0, 5.0, 0.2, 0.2, 3.0, 3.0]])
    m0 = nested_mask_for(wb, "block:1x2", 0.75)
    assert torch.equal(m0, B([[F, F, T, T, F, F, F, F]]))
    m1 = nested_mask_for(wb, "block:1x2", 0.25, m0)
    assert torch.equal(m1, B([[T, T, T, T, F, F, T, T]]))


def test_nm_nested_1_4_in_2_4_in_3_4():
    w = torch.tensor([[1.0, 4.0, 2.0, 3.0, 8.0, 5.0, 6.0, 7.0]])
    m0 = nested_mask_for(w, "nm:1:4", 0.75)
    m1 = nested_mask_for(w, "nm:1:4", 0.5, m0)
    m2 = nested_mask_for(w, "nm:1:4", 0.25, m1)
    assert torch.equal(m0, B([[F, T, F, F, T, F, F, F]]))
    assert torch.equal(m1, B([[F, T, F, T, T, F, F, T]]))
    assert torch.equal(m2, B([[F, T, T, T, T, F, T, T]]))
    # a base that is not 1:4-top: kept, the next level adds the largest remaining entry of each run
    base = B([[T, F, F, F, F, T, F, F]])
    assert torch.equal(nested_mask_for(w, "nm:1:4", 0.5, base), B([[T, T, F, F, T, T, F, F]]))
    with pytest.raises(ValueError, match="keeps only"):
        nested_mask_for(w, "nm:2:4", 0.5, m2)


def test_pattern_nested_keeps_base_tile_entries():
    w = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)          # one 3x3 kernel, values 1..9
    m0 = nested_mask_for(w, "pattern", 2 / 3)                 # keep ceil(9/3) = 3: the 7, 8, 9
    assert torch.equal(m0.reshape(-1), B([F] * 6 + [T] * 3))
    base = torch.zeros(9, dtype=torch.bool)
    base[[0, 1]] = True                                       # the 1 and 2
    m1 = nested_mask_for(w, "pattern", 5 / 9, base.reshape(1, 1, 3, 3))   # keep 4: base + 9, 8
    assert torch.equal(m1.reshape(-1), B([T, T, F, F, F, F, F, T, T]))
    # connectivity: a kernel the sparser level dropped entirely is the first one added back
    w2 = torch.stack([torch.arange(1.0, 10.0), torch.full((9,), 0.5)]).reshape(2, 1, 3, 3)
    s0 = nested_mask_for(w2, "pattern:3+conn", 1 - 3 / 18)
    assert int(s0[1].sum()) == 0 and int(s0[0].sum()) == 3
    s1 = nested_mask_for(w2, "pattern:3+conn", 1 - 6 / 18, s0)
    assert bool((s0 & ~s1).sum() == 0) and int(s1.sum()) == 6 and int(s1[1].sum()) == 3


@pytest.mark.parametrize("structure,levels", [
    ("unstructured", [0.8, 0.5, 0.2]), ("row", [0.75, 0.25]), ("column", [0.5, 0.25]), ("block:2x2", [0.75, 0.25]),
    ("nm:1:4", [0.75, 0.5, 0.25]), ("pattern", [0.7, 0.4]), ("pattern:2+conn", [0.9, 0.8]),
])
def test_nested_invariant_every_structure(structure, levels):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(16, 8))
    nm = nested_masks(model, PruneSpec(structure, levels[0]), levels)
    assert len(nm) == len(levels)
    for k in range(1, len(nm)):
        for n in nm.names():
            assert not bool((nm[k - 1][n] & ~nm[k][n]).any())
    sp = nm.sparsities()
    assert sp == sorted(sp, reverse=True) and sp[0] > sp[-1]


def test_nested_masks_reject_non_nested_and_bad_levels():
    a = MaskSet({"w": B([[T, F]])})
    b = MaskSet({"w": B([[F, T]])})
    with pytest.raises(ValueError, match="not nested"):
        NestedMasks([a, b])
    with pytest.raises(ValueError, match="distinct"):
        sorted_levels([0.5, 0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        sorted_levels([1.2])
    assert sorted_levels([0.2, 0.6, 0.4]) == [0.6, 0.4, 0.2]


def test_reference_construction():
    W = {"w": torch.tensor([[1.0, 2.0, 3.0, 4.0]])}
    nm = NestedMasks([MaskSet({"w": B([[F, F, F, T]])}), MaskSet({"w": B([[F, T, F, T]])}),
                      MaskSet({"w": B([[T, T, F, T]])})])
    high, med, low = shared_weights(W, nm)
    assert torch.equal(high["w"], torch.tensor([[0.0, 0.0, 0.0, 4.0]]))
    assert torch.equal(med["w"], torch.tensor([[0.0, 2.0, 0.0, 4.0]]))
    assert torch.equal(low["w"], torch.tensor([[1.0, 2.0, 0.0, 4.0]]))
    assert torch.equal(nm.level_map("w"), torch.tensor([[2, 1, 3, 0]], dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------- training
def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    return model, loader


def test_sequential_keeps_sparser_level_bitwise():
    model, loader = _tiny()
    cfg = TrainConfig(epochs=2, lr=0.1, momentum=0.9, weight_decay=0.01)
    snaps = {}
    r = train_sequential(model, ClassificationTask(), loader, None, PruneSpec("unstructured", 0.75),
                         [0.75, 0.5, 0.25], retrain_cfg=cfg, level_cfg=cfg, log=lambda *_: None,
                         on_level=lambda k, m: snaps.__setitem__(k, {n: p.detach().clone() for n, p in m.named_parameters()}))
    nm = r["nested"]
    final = dict(model.named_parameters())
    for k in (0, 1):
        for n in nm.names():
            keep = nm[k][n]
            assert torch.equal(final[n].detach()[keep], snaps[k][n][keep])      # shared weights bitwise unchanged
        for n in ("0.bias", "2.bias"):
            assert torch.equal(final[n].detach(), snaps[0][n])                 # unpruned params frozen after L0
    # the added weights did train (they moved from their dense initial values)
    assert not torch.equal(snaps[2]["0.weight"], snaps[1]["0.weight"])
    assert [round(s, 4) for s in nm.sparsities()] == [0.75, 0.5, 0.25]


def test_joint_cycles_levels_and_stays_nested():
    model, loader = _tiny()
    cfg = TrainConfig(epochs=1.5, lr=0.05)
    r = train_joint(model, ClassificationTask(), loader, None, PruneSpec("unstructured", 0.5), [0.5, 0.2], cfg,
                    schedule="cycle", log=lambda *_: None)
    assert r["steps_per_level"] == [3, 3]                                       # 6 steps, cycled
    nm = r["nested"]
    for n, p in model.named_parameters():
        if n in nm.densest:
            assert int((p.detach() != 0)[~nm.densest[n]].sum()) == 0
    view = LevelView(model, nm, 0)
    with pytest.raises(ValueError, match="schedule"):
        JointLevels(view, "random")


# ---------------------------------------------------------------------------------------------- artifact / switch
def _artifact(tmp_path):
    model, _ = _tiny()
    nm = nested_masks(model, PruneSpec("unstructured", 0.8), [0.8, 0.5, 0.2])
    nm.densest.apply(model)
    path = tmp_path / "shared.safetensors"
    save_shared(path, model, nm, levels_info=[{"level": k} for k in range(3)])
    return model, nm, path


def test_artifact_round_trip(tmp_path):
    model, nm, path = _artifact(tmp_path)
    state, nm2, manifest = read_shared(path)
    assert manifest["num_levels"] == 3 and manifest["level_bits"] == 2
    for k in range(3):
        for n in nm.names():
            assert torch.equal(nm[k][n], nm2[k][n])
    for n, v in model.state_dict().items():
        assert torch.equal(state[n], v)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SharedFormatError):
        read_shared(tmp_path / "bad.safetensors")
    with pytest.raises(SharedFormatError, match="no shared-weights artifact"):
        read_shared(tmp_path / "missing.safetensors")


def test_switch_in_place_equals_fresh_load(tmp_path):
    _, nm, path = _artifact(tmp_path)
    m, _ = _tiny()
    swm = load_level(path, 2, m)
    ids = {n: id(p) for n, p in m.named_parameters()}
    for dst in (0, 1, 2, 1, 0, 2):
        rec = swm.switch(dst)
        fresh, _ = _tiny()
        load_level(path, dst, fresh)
        for (n, p), (_, q) in zip(m.named_parameters(), fresh.named_parameters()):
            assert torch.equal(p, q), (dst, n)
            assert id(p) == ids[n]
        assert rec.dst == dst
    # bytes written in place = changed elements x 4 (float32)
    swm2 = load_level(path, 0, _tiny()[0])
    rec = swm2.switch(2)
    changed = sum(int((nm[2][n] & ~nm[0][n]).sum()) for n in nm.names())
    assert rec.elements_written == changed and rec.bytes_written == 4 * changed
    with pytest.raises(IndexError, match="levels 0..2"):
        swm2.switch(3)


def test_switch_bytes_hand_computed():
    # one 1x8 float32 tensor; level 1 adds positions 1 and 4 to level 0
    l0 = B([[T, F, F, F, F, F, F, F]])
    l1 = B([[T, T, F, F, T, F, F, F]])
    nm = NestedMasks([MaskSet({"w": l0}), MaskSet({"w": l1})])
    up = switch_cost(nm, 0, 1, other_bytes=12)
    # bitmask: ceil(8/8) = 1 index byte + 2 values x 4 bytes = 9  (CSR: 2 row_ptr + 2 col_idx + 8 = 12)
    assert up["switch_bytes"] == 9 and up["index_bytes"] == 1 and up["value_bytes"] == 8
    assert up["encodings"] == {"w": "bitmask"}
    assert up["full_rewrite_bytes"] == 8 * 4 + 12
    down = switch_cost(nm, 1, 0)
    assert down["switch_bytes"] == 1 and down["value_bytes"] == 0          # only the index: zeros are implied
    # changing every element: index + values (1 + 32) > dense rewrite (32) -> rewrite the tensor
    pb = patch_bytes(torch.ones(1, 8, dtype=torch.bool), 8, torch.float32)
    assert pb == {"bytes": 32, "encoding": "dense", "index_bytes": 0, "value_bytes": 32, "dense_bytes": 32}
    # a long sparse row: CSR beats the bitmask (2 changes in 4096: 2 + 2*2 + 8 = 14 < 512 + 8)
    ch = torch.zeros(1, 4096, dtype=torch.bool)
    ch[0, [5, 4000]] = True
    pb = patch_bytes(ch, 2, torch.float32, ("bitmask", "csr"))
    assert pb["encoding"] == "csr" and pb["bytes"] == 2 * 1 + 2 * 2 + 2 * 4


@pytest.mark.parametrize("algo_name", ["gradual", "admm", "slr", "group_lasso"])
def test_sequential_sparsest_level_from_registered_algorithm(algo_name):
    from prunekit.algorithms import get_algorithm_class
    from prunekit.core.nested import _spec_at

    model, loader = _tiny()
    spec = PruneSpec("row", 0.5, targets=TargetSpec(["0"]))
    cls = get_algorithm_class(algo_name)
    algo = cls(cls.Params(), _spec_at(spec, 0.5))
    cfg = TrainConfig(epochs=0.5, lr=0.05)
    r = train_sequential(model, ClassificationTask(), loader, None, spec, [0.5, 0.25], algorithm=algo,
                         search_cfg=cfg, retrain_cfg=cfg, level_cfg=cfg, log=lambda *_: None)
    nm = r["nested"]
    m0, m1 = nm[0]["0.weight"], nm[1]["0.weight"]
    assert int(m0.all(1).sum()) == 4 and int(m1.all(1).sum()) == 6            # 8 rows: 4 kept, then 6
    assert not bool((m0 & ~m1).any())


def test_sequential_sparsest_level_from_sparsegpt():
    """Shared-weight levels with a post-training algorithm for the sparsest level (calibration from the loader)."""
    from prunekit.algorithms import get_algorithm_class
    from prunekit.algorithms.calibration import CalibrationConfig
    from prunekit.core.nested import _spec_at

    model, loader = _tiny()
    spec = PruneSpec("unstructured", 0.5, targets=TargetSpec(["0"]))
    cls = get_algorithm_class("sparsegpt")
    algo = cls(cls.Params(), _spec_at(spec, 0.75))
    algo.calibration_loader = loader
    algo.calibration = CalibrationConfig(samples=32, batch_size=16)
    W0 = model[0].weight.detach().clone()
    cfg = TrainConfig(epochs=0.5, lr=0.05)
    r = train_sequential(model, ClassificationTask(), loader, None, spec, [0.75, 0.5], algorithm=algo,
                         retrain_cfg=None, level_cfg=cfg, log=lambda *_: None)
    m0, m1 = r["nested"][0]["0.weight"], r["nested"][1]["0.weight"]
    assert int(m0.sum()) == 12 and int(m1.sum()) == 24                          # 48 weights: 25 %, then 50 %
    assert not bool((m0 & ~m1).any())
    # level 0 holds SparseGPT's compensated weights (not the dense ones) on its kept positions
    assert not torch.allclose(r["dense_values"]["0.weight"][m0], W0[m0])
