"""The one structure protocol: partition round trips, selection within groups, must-keep nesting, the
group layout storage encodes, registries, the one bit-packer — once for every structure."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from prunekit import PruneSpec, compute_masks, mask_for, parse_structure
from prunekit.algorithms.admm import project_masks, project_weights
from prunekit.algorithms.group_lasso import group_lasso_penalty
from prunekit.core import bits
from prunekit.core.errors import UnknownNameError
from prunekit.core.nested import nested_mask_for, nested_masks
from prunekit.core.registry import Registry
from prunekit.core.scoring import SCORES, resolve_score
from prunekit.core.structures import NM, STRUCTURES, Pattern, Structure, structure_syntax
from prunekit.deploy import storage as S

# (structure, shape): edge blocks, N:M with padding, pattern on Linear tiles (partial too) and Conv kernels
CASES = [
    ("unstructured", (6, 10)), ("row", (6, 10)), ("column", (5, 2, 3, 3)),
    ("block:4x4", (10, 13)), ("block:3x5", (8, 2, 3, 3)), ("block:2x2", (4, 8)),
    ("nm:2:4", (6, 10)), ("nm:1:3", (4, 2, 3, 3)), ("nm:2:4", (8, 16)),
    ("pattern", (10, 13)), ("pattern:4@2x3", (6, 9)), ("pattern:4", (4, 3, 3, 3)),
    ("pattern+conn", (6, 2, 3, 3)), ("pattern:3:8+conn", (8, 16)),
]
IDS = [f"{s}-{'x'.join(map(str, sh))}" for s, sh in CASES]


def _w(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spec,shape", CASES, ids=IDS)
def test_round_trip_and_group_decisions(spec, shape):
    st = parse_structure(spec)
    st.check_shape(shape)
    w = _w(shape)
    parts, valid, idx = st.partition(w), st.valid(shape), st.group_index(shape)
    assert parts.shape == valid.shape == idx.shape
    assert torch.equal(st.unpartition(parts, shape), w)                      # identity on valid entries
    assert bool((parts[~valid] == 0).all())                                  # padding is zero
    assert sorted(idx[valid].tolist()) == list(range(w.numel()))             # every weight in one slot
    assert torch.equal(parts[valid], w.reshape(-1)[idx[valid]])              # the layout storage encodes
    keep = (torch.rand(parts.shape, generator=torch.Generator().manual_seed(1)) > 0.5) & valid
    m = st.unpartition(keep, shape)                                          # masks from group decisions
    assert torch.equal(st.partition(m) & valid, keep)


@pytest.mark.parametrize("spec,shape", CASES, ids=IDS)
def test_mask_is_the_template(spec, shape):
    st = parse_structure(spec)
    w = _w(shape, 2)
    s = st.fixed_sparsity(shape) or 0.5
    m = st.mask(w, s, "l2")
    keep = st.select(st.partition(w), st.valid(shape), s, resolve_score("l2"))
    assert torch.equal(m, st.unpartition(keep, shape).bool())
    assert torch.equal(st.project(w, s), w * m)                              # the ADMM Z-step
    if st.selects_groups:                                                    # whole groups kept or dropped
        per = st.partition(m.float()).sum(1)
        assert bool(((per == 0) | (per == st.valid(shape).sum(1))).all())


def test_nm_exact_through_template():
    w = torch.tensor([[0.1, -3., 2., 0.5, 7., 0.2, -5.],
                      [4., 3., 2., 1., -0.1, 0.3, 0.0]])
    st = NM(2, 4)
    parts = st.partition(w)
    assert parts.shape == (4, 4) and st.valid(w.shape).sum(1).tolist() == [4, 3, 4, 3]
    keep = st.select(parts, st.valid(w.shape), 0.5, resolve_score("l2"))
    assert keep.tolist() == [[False, True, True, False], [True, False, True, False],
                             [True, True, False, False], [True, True, False, False]]
    T, F = True, False
    assert torch.equal(st.mask(w, 0.5), torch.tensor([[F, T, T, F, T, F, T], [T, T, F, F, T, T, F]]))
    # partial run of 3 keeps 2; ties → lower index; base entries are kept first
    base = torch.zeros_like(w, dtype=torch.bool)
    base[0, 0] = True
    assert torch.equal(st.mask(w, 0.5, base=base)[0, :4], torch.tensor([T, T, F, F]))


def test_pattern_exact_through_template():
    pats = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 0, 1]], dtype=torch.bool)
    st = Pattern(keep=2, tile=(2, 2), patterns=pats)
    w = torch.tensor([[5., 4., 0.1, 3.],
                      [0.2, 0.1, 2., 0.1],
                      [1., 0., 0., 9.]])                                     # 3x4: tiles 2x2, last row partial
    parts = st.partition(w)
    assert torch.allclose(parts, torch.tensor([[5, 4, .2, .1], [.1, 3, 2, .1], [1, 0, 0, 0], [0, 9, 0, 0]]))
    # energies per pattern: tile0 [41, .05, 25.01] → p0; tile1 [9.01, 4.01, .02] → p0; tile2 [1, 0, 1] → p0;
    # tile3 [81, 0, 0] → p0 (pattern slots in padding are dropped)
    m = st.mask(w, 0.5)
    T, F = True, False
    assert torch.equal(m, torch.tensor([[T, T, T, T], [F, F, F, F], [T, T, T, T]]))   # a kept slot may hold a 0
    w[1, 2] = 10.0                                                           # tile1 now prefers p1 (2x2 bottom)
    assert torch.equal(st.mask(w, 0.5)[:2, 2:], torch.tensor([[F, F], [T, T]]))


def test_edge_blocks_scored_per_real_weight():
    torch.manual_seed(0)
    w = torch.randn(10, 64)                                                  # 4x4 blocks: last block row is 2x4
    for score in ("l1", "l2"):
        m = mask_for(w, "block:4x4", 0.5, score)
        sparsity = 1 - m.float().mean().item()
        assert abs(sparsity - 0.5) <= 16 / 640 + 1e-9, (score, sparsity)     # 50% ± one block's share
        assert int((m.sum(1) == 0).sum()) == 0, score                        # no output row loses every weight
    assert 1 - mask_for(w, "block:4x4", 0.5, "l1").float().mean().item() == 0.5
    # full blocks: the count rule and the raw scores are unchanged
    full = torch.randn(8, 16)
    st = parse_structure("block:4x4")
    assert torch.allclose(st.scores(full, "l2"), st.partition(full).norm(dim=1))
    assert int((st.partition(mask_for(full, st, 0.3)).sum(1) == 0).sum()) == round(0.3 * 8)


def test_plain_pattern_never_empties_a_kernel_conn_does():
    torch.manual_seed(0)
    c = torch.randn(16, 16, 3, 3)                                            # 256 kernels
    m = mask_for(c, "pattern", 0.5)                                          # keep ceil(4.5) = 5 per kernel
    per = m.reshape(-1, 9).sum(1)
    assert int((per == 0).sum()) == 0 and bool((per == 5).all())
    m = mask_for(c, "pattern:4+conn", 0.75)   # 2304 weights, keep 576 = 144 kernels of 4 → 112 emptied
    per = m.reshape(-1, 9).sum(1)
    assert int((per == 0).sum()) == 112 and set(per.unique().tolist()) == {0, 4}


@pytest.mark.parametrize("spec,shape", CASES, ids=IDS)
def test_group_lasso_norms_are_the_partitions(spec, shape):
    st = parse_structure(spec)
    w = _w(shape, 3).requires_grad_(True)
    norms = st.partition(w.detach()).norm(dim=1)
    assert torch.allclose(st.group_norms(w), norms, atol=1e-6)
    alpha = torch.rand(st.num_groups(shape), generator=torch.Generator().manual_seed(4))
    pen = group_lasso_penalty(st, w, alpha, lam=0.5)
    assert torch.allclose(pen, 0.5 * (alpha * norms).sum(), atol=1e-5)
    pen.backward()
    assert torch.isfinite(w.grad).all()


NEST = [("unstructured", (6, 10)), ("row", (8, 5)), ("column", (4, 12)), ("block:4x4", (10, 13)),
        ("nm:1:4", (6, 10)), ("pattern", (4, 3, 3, 3)), ("pattern", (8, 12)), ("pattern:2+conn", (6, 2, 3, 3))]


@pytest.mark.parametrize("spec,shape", NEST, ids=[f"{s}-{sh}" for s, sh in NEST])
def test_nested_levels_are_supersets(spec, shape):
    w = _w(shape, 5)
    levels = [0.75, 0.5, 0.25] if not spec.startswith("pattern:2") else [0.9, 0.85, 0.8]
    prev = None
    for s in levels:
        m = nested_mask_for(w, spec, s, prev)
        if prev is not None:
            assert bool((prev & ~m).sum() == 0), (spec, s)
            assert int(m.sum()) >= int(prev.sum())
        prev = m


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3)
        self.fc = nn.Linear(20, 10)


ALL = ["unstructured", "row", "column", "block:4x4", "block:3x5", "nm:2:4", "nm:1:3", "pattern", "pattern:4",
       "pattern:4:8", "pattern+conn"]


@pytest.mark.parametrize("spec", ALL)
def test_maskset_records_parseable_structures(spec):
    torch.manual_seed(0)
    net = _Net()
    st = parse_structure(spec)
    ms = compute_masks(net, PruneSpec("row", 0.5, overrides={"conv": {"structure": spec, "sparsity": 0.5},
                                                             "fc": {"structure": spec}}))
    for n in ms:
        assert parse_structure(ms.structures[n]) == st
    nested = nested_masks(net, PruneSpec(spec, 0.5), [0.5, 0.3])
    assert all(parse_structure(nested[0].structures[n]) == st for n in nested.names())


def test_global_nested_levels_use_the_one_global_selection():
    torch.manual_seed(0)
    net = _Net()
    nm = nested_masks(net, PruneSpec("row", 0.5, scope="global"), [0.7, 0.3])
    for n in nm.names():
        assert bool((nm[0][n] & ~nm[1][n]).sum() == 0)
    with pytest.raises(ValueError, match="global scope needs one group structure"):
        compute_masks(net, PruneSpec("nm:2:4", 0.5, scope="global"))


def test_registries_and_syntax():
    assert isinstance(STRUCTURES, Registry) and isinstance(SCORES, Registry)
    assert STRUCTURES.names() == ["block", "column", "groups", "nm", "pattern", "row", "transposed", "unstructured"]
    help_ = structure_syntax()
    for name in STRUCTURES:
        cls = STRUCTURES.get(name)
        assert issubclass(cls, Structure) and cls.syntax in help_ and cls.help in help_
    with pytest.raises(UnknownNameError, match=r"unknown structure 'blok:4x4'; valid: unstructured"):
        parse_structure("blok:4x4")
    assert parse_structure("irregular") == parse_structure("unstructured")
    assert set(SCORES.names()) >= {"l1", "l2", "magnitude"}
    assert SCORES.get("l2").power == 2 and SCORES.get("l1").power == 1
    with pytest.raises(ValueError, match="unknown score 'l3'"):
        resolve_score("l3")


def test_one_override_scaling_rule():
    net = _Net()
    spec = PruneSpec("row", 0.5, overrides={"conv": 0.8, "fc": {"sparsity": 0.2, "structure": "column"}})
    names = ["conv.weight", "fc.weight"]
    plan = spec.layer_plan(names, 0.25)
    assert plan["conv.weight"][1] == pytest.approx(0.4) and plan["fc.weight"][1] == pytest.approx(0.1)
    moved = spec.at(0.25)
    assert {n: sp for n, (_, sp) in moved.layer_plan(names).items()} == {n: sp for n, (_, sp) in plan.items()}
    assert str(plan["fc.weight"][0]) == "column"
    ms = compute_masks(net, spec, sparsity=0.25)
    assert ms.sparsity("fc.weight") == pytest.approx(0.1)


@pytest.mark.parametrize("spec", ["unstructured", "block:4x4", "nm:2:4", "pattern:4:8", "pattern+conn"])
def test_admm_z_step_is_the_structures_projection(spec):
    torch.manual_seed(0)
    net = _Net()
    sp = PruneSpec(spec, 0.5)
    values = {n: p.detach() + 0.1 * torch.randn_like(p) for n, p in net.named_parameters() if n.endswith("weight")}
    z = project_weights(net, sp, values)
    ms = project_masks(net, sp, values)
    for n, v in values.items():
        assert torch.equal(z[n], parse_structure(spec).project(v, 0.5))
        assert torch.equal(z[n] != 0, ms[n] & (v != 0))


# ---- storage: the structure's group layout --------------------------------------------------------------
def _sparse(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g)
    t[torch.rand(shape, generator=g) < 0.6] = 0
    return t


@pytest.mark.parametrize("shape", [(6, 10), (3, 7), (4, 2, 3, 3), (5, 13)])
def test_storage_nm_when_m_does_not_divide(shape):
    w = _w(shape, 6)
    t = w * mask_for(w, "nm:2:4", 0.5)
    for index in ("combination", "positions"):
        e = S.encode(t, "nm", n=2, m=4, index=index)
        assert torch.equal(S.decode(e), t)
        groups = NM(2, 4).num_groups(shape)
        assert e.arrays["values"].size == 2 * groups                          # n slots per M-run, partial too
    assert torch.equal(S.decode(S.encode(_sparse(shape), "nm")), _sparse(shape))


@pytest.mark.parametrize("shape,tile", [((10, 13), None), ((6, 9), (2, 3)), ((4, 2, 3, 3), None), ((7, 5), (4, 4))])
def test_storage_pattern_tiles_from_the_structure(shape, tile):
    w = _w(shape, 7)
    spec = "pattern:3@2x3" if tile else "pattern:4"
    t = w * mask_for(w, spec, 0.5) if shape != (7, 5) else _sparse(shape)
    e = S.encode(t, "pattern", tile=tile)
    assert torch.equal(S.decode(e), t)
    st = Pattern(tile=tile) if len(shape) == 2 else Pattern()
    n_groups = st.num_groups(shape)
    assert len(bits.unpack(e.arrays["ids"], bits.bits_for(e.params["n_patterns"]), n_groups)) == n_groups
    if len(shape) == 4:
        assert "tile" not in e.params and e.params["m"] == 9                    # one kernel per group, as before
    else:
        assert e.params["tile"] == list(st.tile_shape(shape))


def test_storage_old_pattern_layout_still_decodes():
    t = _sparse((4, 8))
    old = S.encode(t, "pattern", m=4)          # runs of 4: what files without a "tile" parameter hold
    assert "tile" not in old.params
    meta = {k: v for k, v in old.params.items()}
    again = S.Encoded("pattern", old.shape, old.dtype, old.arrays, meta, nnz=old.nnz)
    assert torch.equal(S.decode(again), t)


# ---- the one bit-packer ---------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 13])
@pytest.mark.parametrize("order", ["little", "big"])
def test_bit_packer_round_trip(k, order):
    rng = np.random.default_rng(k)
    v = rng.integers(0, 2 ** k, size=37)
    p = bits.pack(v, k, bitorder=order)
    assert p.dtype == np.uint8 and p.size == (37 * k + 7) // 8
    assert np.array_equal(bits.unpack(p, k, 37, bitorder=order).astype(np.int64), v)


def test_bit_packer_matches_numpy_packbits_for_masks():
    m = torch.rand(5, 11) > 0.5
    assert np.array_equal(bits.pack_mask(m).numpy(), np.packbits(m.numpy().reshape(-1)))
    assert torch.equal(bits.unpack_mask(bits.pack_mask(m), m.shape), m)
