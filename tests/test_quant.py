"""Quantizers and the pruned-and-quantized constraint set (core/quant.py): exact codes on hand-built
tensors, decode(encode(w)) == project(w) bit for bit, idempotence, zeros stay zeros."""
from __future__ import annotations

import pytest
import torch

from prunekit.core.errors import RecipeError
from prunekit.core.quant import ConstraintSet, kmeans_1d, parse_quantizer

ALL = ["int:4", "int:3:asym", "int:8:sym:tensor", "int:2:asym:tensor", "int:1:asym", "pow2:3", "pow2:4",
       "binary", "ternary", "cluster:4", "cluster:16", "fp16", "bf16"]


def _t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_int_sym_codes_and_silent_zero_counted_as_pruned():
    w, m = _t([1.0, -0.6, 0.2, 3.0]), torch.tensor([[True, True, True, False]])
    cs = ConstraintSet(parse_quantizer("int:2:sym:tensor"))
    qc = cs.encode(w, m)
    assert parse_quantizer("int:2:sym:tensor").encode(w, m).codes.tolist() == [[2, 0, 1, 0]]   # level + 1
    assert qc.codes.tolist() == [[2, 0, 0, 0]] and qc.mask.tolist() == [[True, True, False, False]]
    v, m2 = cs.project(w, m)
    assert v.tolist() == [[1.0, -1.0, 0.0, 0.0]]
    assert m2.tolist() == [[True, True, False, False]]   # 0.2 rounded to 0: counted as pruned
    assert float(qc.params["scale"]) == 1.0


def test_int_per_channel_scales():
    w = _t([7.0, -3.5, 0.0], [0.7, 0.35, -0.7])
    qc = parse_quantizer("int:4").encode(w)
    assert qc.params["scale"].tolist() == [1.0, pytest.approx(0.1)]
    assert qc.codes.tolist() == [[14, 3, 7], [14, 11, 0]]    # 7 + level (3.5 → 4, half to even)


def test_int_asym_zero_point():
    w = _t([-1.0, 0.5, 2.0])
    q = parse_quantizer("int:2:asym:tensor")
    qc = q.encode(w)
    assert qc.params["scale"].tolist() == [1.0] and qc.params["zero_point"].tolist() == [1.0]
    assert qc.codes.tolist() == [[0, 2, 3]]
    assert q.decode(qc).tolist() == [[-1.0, 1.0, 2.0]]


def test_pow2_binary_ternary_cluster_fp16_codes():
    qc = parse_quantizer("pow2:3").encode(_t([4.0, -1.1, 0.6, 0.2]))
    assert qc.codes.tolist() == [[1, 6, 3, 0]]
    assert parse_quantizer("pow2:3").decode(qc).tolist() == [[4.0, -1.0, 1.0, 0.0]]
    b = parse_quantizer("binary")
    qc = b.encode(_t([1.0, -3.0, 2.0, -2.0]))
    assert qc.codes.tolist() == [[1, 0, 1, 0]] and b.decode(qc).tolist() == [[2.0, -2.0, 2.0, -2.0]]
    t = parse_quantizer("ternary")
    qc = t.encode(_t([3.0, -2.9, 0.1, 0.2]))
    assert qc.codes.tolist() == [[1, 2, 0, 0]] and float(qc.params["alpha"]) == pytest.approx(2.95)
    c = parse_quantizer("cluster:2")
    qc = c.encode(_t([0.0, 1.0, 9.0, 10.0]))
    assert qc.codes.tolist() == [[0, 0, 1, 1]] and qc.params["codebook"].tolist() == [0.5, 9.5]
    qc = parse_quantizer("fp16").encode(_t([1.0, 1 / 3, -2.0]))
    assert qc.codes.tolist() == [[0x3C00, 0x3555, 0xC000]]
    assert parse_quantizer("bf16").encode(_t([1.0])).codes.tolist() == [[0x3F80]]


def test_kmeans_linear_init_and_few_values_exact():
    assert kmeans_1d(torch.tensor([0.1, 0.1, 0.3]), 4).tolist() == pytest.approx([0.1, 0.3, 0.3, 0.3])
    c = kmeans_1d(torch.tensor([0.0, 0.2, 5.0, 5.2, 10.0]), 3)
    assert c.tolist() == pytest.approx([0.1, 5.1, 10.0])


@pytest.mark.parametrize("spec", ALL)
def test_constraint_set_invariants(spec):
    cs = ConstraintSet(parse_quantizer(spec))
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(8, 3, 3, 3, generator=g) * (0.01 + seed)
        m = torch.rand(w.shape, generator=g) > 0.4
        qc = cs.encode(w, m)
        v, m2 = cs.project(w, m)
        assert torch.equal(v, cs.decode(qc))                          # project = decode(encode)
        assert bool((v[~m2] == 0).all()) and not bool(torch.signbit(v[~m2]).any())   # +0.0 where pruned
        assert bool((v[m2] != 0).all())                               # no silent zero among survivors
        assert bool((m2 & ~m).sum() == 0)                             # masks only shrink
        assert int(qc.codes.max()) < 2 ** qc.bits and int(qc.codes.min()) >= 0
        v2, m3 = cs.project(v, m2)                                    # idempotent, bit for bit
        assert torch.equal(v2.view(torch.int32), v.view(torch.int32)) and torch.equal(m3, m2)
        cs.check(v, m2)
        levels = torch.unique(v[m2]).numel()
        if "channel" not in str(cs.quantizer) and not spec.startswith(("fp", "bf")):
            assert levels <= 2 ** qc.bits


def test_check_rejects_off_grid():
    cs = ConstraintSet(parse_quantizer("int:2:sym:tensor"))
    with pytest.raises(RecipeError, match="not on the int:2:sym:tensor grid"):
        cs.check(_t([1.0, 0.7]), torch.ones(1, 2, dtype=torch.bool))


@pytest.mark.parametrize("bad", ["int:9", "int:x", "int:4:foo", "pow2:1", "cluster:1", "fp8", "", "int:1:sym"])
def test_bad_strings_list_valid_forms(bad):
    with pytest.raises(RecipeError, match=r"int:K\[:sym\|asym\]\[:tensor\|channel\].*pow2:K"):
        parse_quantizer(bad)


def test_canonical_strings_parse_back():
    for s in ALL:
        q = parse_quantizer(s)
        assert parse_quantizer(str(q)) == q
    assert str(parse_quantizer("INT:4")) == "int:4:sym:channel"


def test_forms_sign_polarization_hand_built():
    w = _t([1.0, -2.0], [-0.5, 3.0], [0.2, -0.1], [0.4, 0.3], [-1.0, 0.0])
    cs = ConstraintSet(parse_quantizer("fp16"), polarize=2)
    v, m = cs.project(w, torch.ones(5, 2, dtype=torch.bool))
    # column 0: fragment rows 0-1 (+1 vs -0.5: positive wins), rows 2-3 (both +), row 4 alone (-)
    # column 1: rows 0-1 (-2 vs +3: positive wins), rows 2-3 (+0.3² > -0.1²), row 4 (0: pruned)
    assert m.tolist() == [[True, False], [False, True], [True, False], [True, True], [True, False]]
    assert v.tolist() == [[1.0, 0.0], [0.0, 3.0], [pytest.approx(0.2, abs=1e-3), 0.0],
                          [pytest.approx(0.4, abs=1e-3), pytest.approx(0.3, abs=1e-3)], [-1.0, 0.0]]
    v2, m2 = cs.project(v, m)
    assert torch.equal(v2, v) and torch.equal(m2, m)                      # a fixed point
    g = torch.Generator().manual_seed(0)
    big = torch.randn(37, 20, generator=g)
    v, m = ConstraintSet(parse_quantizer("int:4"), polarize=4).project(big)
    frag = torch.cat([v, torch.zeros(3, 20)]).reshape(10, 4, 20)
    assert not bool(((frag > 0).any(1) & (frag < 0).any(1)).any())        # one sign per fragment
