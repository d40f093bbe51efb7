import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from prunekit.deploy import storage as S

ALL = list(S.ENCODINGS)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bit patterns, for bitwise comparison (distinguishes -0.0, keeps NaN payloads)."""
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(_bits(a.contiguous()), _bits(b.contiguous()))


def sparse_tensor(shape, sparsity, dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g)
    t[torch.rand(shape, generator=g) < sparsity] = 0
    return t.to(dtype)


def tiny() -> torch.Tensor:
    """4x8 float32 with 5 nonzeros."""
    w = torch.zeros(4, 8)
    w[0, 1], w[1, 3], w[2, 0], w[3, 2], w[3, 7] = 1.0, -2.0, 3.0, 5.0, 4.0
    return w


# ---------------------------------------------------------------- lossless round trips
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.97, 1.0])
@pytest.mark.parametrize("shape", [(16, 24), (7, 13), (6, 4, 3, 3), (40,), ()])
def test_round_trip_all_encodings(shape, sparsity, dtype):
    t = sparse_tensor(shape, sparsity, dtype)
    for name in ALL:
        if not S.is_applicable(t, name):
            assert name in ("nm", "pattern")  # only group formats have a precondition
            continue
        enc = S.encode(t, name)
        assert enc.nbytes == enc.index_bytes + enc.value_bytes
        assert_bitwise_equal(S.decode(enc), t)


@pytest.mark.parametrize("name", ALL)
def test_round_trip_keeps_negative_zero_nan_inf(name):
    t = sparse_tensor((8, 16), 0.8)
    t[0, 0] = -0.0  # what w * 0 gives for w < 0
    t[1, :] = -0.0
    t[2, 3], t[2, 4], t[2, 5] = float("nan"), float("inf"), -float("inf")
    enc = S.encode(t, name)
    assert_bitwise_equal(S.decode(enc), t)


def test_negative_zero_costs_index_bytes_only_when_present():
    t = sparse_tensor((8, 16), 0.9)
    plain = S.encode(t, "csr")
    t2 = t.clone()
    t2[t2 == 0] = -0.0
    marked = S.encode(t2, "csr")
    assert "negzero_idx" not in plain.arrays and "negzero_mask" not in plain.arrays
    assert marked.nbytes > plain.nbytes and marked.value_bytes == plain.value_bytes
    assert_bitwise_equal(S.decode(S.encode(S.canonicalize_zeros(t2), "csr")), t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64, torch.int8, torch.bool, torch.float8_e4m3fn])
def test_round_trip_other_dtypes(dtype):
    t = sparse_tensor((8, 12), 0.7)
    t = (t > 0) if dtype == torch.bool else (t * 4).to(dtype)
    for name in ALL:
        if S.is_applicable(t, name):
            assert_bitwise_equal(S.decode(S.encode(t, name)), t)


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0,)])
def test_round_trip_empty(shape):
    t = torch.zeros(shape)
    for name in ALL:
        if S.is_applicable(t, name):
            assert_bitwise_equal(S.decode(S.encode(t, name)), t)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 9),
    groups=st.integers(1, 6),
    sparsity=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    bits=st.integers(1, 6),
    block=st.tuples(st.integers(1, 5), st.integers(1, 5)),
)
def test_round_trip_property(rows, groups, sparsity, seed, bits, block):
    t = sparse_tensor((rows, 4 * groups), sparsity, seed=seed)
    for name, opts in [("relative", {"bits": bits}), ("bcsr", {"block": block}), ("nm", {"index": "positions"}),
                       ("nm", {}), ("pattern", {"m": 2}), ("csr", {}), ("bitmask", {})]:
        assert_bitwise_equal(S.decode(S.encode(t, name, **opts)), t)


# ---------------------------------------------------------------- exact byte counts
def test_exact_bytes_tiny():
    w = tiny()
    expect = {  # name: (nbytes, index_bytes, value_bytes)
        "dense": (128, 0, 128),
        "bitmask": (24, 4, 20),     # 32 mask bits = 4 bytes + 5 float32 values
        "csr": (30, 10, 20),        # row_ptr 5 x uint8 + col_idx 5 x uint8 + values
        "bcsr": (132, 4, 128),      # 4x4 blocks: both blocks occupied; ptr 2 + col 2 bytes
        "nm": (34, 2, 32),          # n=1 (auto), m=4: 8 groups x 2 bits; 8 slots incl. 3 padding zeros
        "relative": (27, 7, 20),    # auto bits=3: no filler; row_ptr 5 + ceil(5*3/8)=2
        "pattern": (25, 5, 20),     # 4x4 tiles (the pattern structure's): 2 masks: codebook 2*16 bits=4 B, ids 2*1 bit=1 B
    }
    for name, (nbytes, index_bytes, value_bytes) in expect.items():
        e = S.encode(w, name)
        assert (e.nbytes, e.index_bytes, e.value_bytes) == (nbytes, index_bytes, value_bytes), name
        assert e.nnz == 5
    assert S.encode(w, "relative").params["bits"] == 3


def test_relative_filler_rule():
    # Row of 40: nonzeros at columns 0, 20 and 39, 2-bit gaps (max gap 3):
    # col 0: gap 0; col 20: gap 19 -> 19 // 4 = 4 fillers + real gap 19 % 4 = 3;
    # col 39: gap 18 -> 4 fillers + real gap 2. Total 11 entries.
    t = torch.zeros(1, 40)
    t[0, 0], t[0, 20], t[0, 39] = 1.0, 2.0, 3.0
    e = S.encode(t, "relative", bits=2)
    assert e.arrays["values"].size == 11
    assert e.arrays["row_ptr"].tolist() == [0, 11]
    assert e.nbytes == 2 + math.ceil(11 * 2 / 8) + 11 * 4
    assert_bitwise_equal(S.decode(e), t)


def test_nm_index_bits_2_4():
    t = torch.zeros(8, 16)
    t[:, 0::4] = 1.0
    t[:, 3::4] = 2.0  # exactly 2:4; 32 groups
    comb = S.encode(t, "nm", n=2, m=4)
    pos = S.encode(t, "nm", n=2, m=4, index="positions")
    assert comb.value_bytes == pos.value_bytes == 64 * 4
    assert comb.index_bytes == 32 * 3 // 8  # ceil(log2 C(4,2)) = 3 bits per group
    assert pos.index_bytes == 32 * 4 // 8   # 2 bits per kept value
    with pytest.raises(ValueError, match="not 1:4"):
        S.encode(t, "nm", n=1, m=4)


def test_bcsr_partial_edge_blocks():
    t = sparse_tensor((7, 10), 0.8)
    e = S.encode(t, "bcsr", block=(4, 4))
    assert e.arrays["values"].shape[1:] == (4, 4)
    assert_bitwise_equal(S.decode(e), t)


# ---------------------------------------------------------------- choosing and bounds
def test_best_encoding_dense_vs_sparse():
    dense = sparse_tensor((64, 64), 0.0)
    assert S.best_encoding(dense).encoding == "dense"
    sparse = sparse_tensor((64, 64), 0.95)
    best = S.best_encoding(sparse)
    assert best.encoding != "dense"
    assert best.nbytes == min(r["nbytes"] for r in S.encoding_table(sparse))
    assert best.nbytes >= S.theoretical_min_bytes(sparse)
    assert S.best_encoding(sparse, candidates=["csr"]).encoding == "csr"
    # tie -> simplest: fully dense, nm stores n = m = 4 with 0 index bits, same bytes as dense
    assert S.encode(dense, "nm").nbytes == S.encode(dense, "dense").nbytes
    assert S.best_encoding(dense, candidates=["nm", "dense"]).encoding == "dense"


def test_encoding_table_rows():
    rows = S.encoding_table(tiny())
    assert [r["encoding"] for r in rows] == ALL
    for r in rows:
        assert set(r) == {"encoding", "nbytes", "index_bytes", "value_bytes", "ratio_vs_dense"}
        assert r["ratio_vs_dense"] == pytest.approx(r["nbytes"] / 128)


def test_theoretical_min_bytes():
    w = tiny()
    assert S.theoretical_min_bytes(w) == pytest.approx(20 + math.log2(math.comb(32, 5)) / 8)
    assert S.theoretical_min_bytes(torch.zeros(3, 3)) == 0.0
    assert S.theoretical_min_bytes(torch.ones(3, 3)) == 36.0


def _with_zeros(shape, zeros, dtype):
    t = torch.arange(1, math.prod(shape) + 1, dtype=torch.float32).reshape(shape).to(dtype)
    t.view(-1)[torch.randperm(t.numel(), generator=torch.Generator().manual_seed(1))[:zeros]] = 0
    return t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("encoding,shape", [("bitmask", (32, 50)), ("csr", (32, 50)), ("csr", (4, 300)),
                                            ("bitmask", (3, 7))])
def test_breakeven_sparsity_exact(encoding, shape, dtype):
    n = math.prod(shape)
    s = S.breakeven_sparsity(shape, dtype, encoding)
    z = round(s * n)
    assert 0 < z <= n
    dense_bytes = n * torch.empty((), dtype=dtype).element_size()
    assert S.encode(_with_zeros(shape, z, dtype), encoding).nbytes < dense_bytes       # just above
    assert S.encode(_with_zeros(shape, z - 1, dtype), encoding).nbytes >= dense_bytes  # just below


def test_breakeven_sparsity_values_and_errors():
    assert S.breakeven_sparsity(1 << 20, torch.float32, "bitmask") == pytest.approx(1 / 32, abs=1e-5)
    assert S.breakeven_sparsity(1 << 20, torch.float16, "bitmask") == pytest.approx(1 / 16, abs=1e-5)
    with pytest.raises(ValueError, match="needs the tensor shape"):
        S.breakeven_sparsity(1000, torch.float32, "csr")
    with pytest.raises(ValueError, match="depends on"):
        S.breakeven_sparsity((10, 10), torch.float32, "relative")


def test_unknown_encoding_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown encoding 'zip'.*bitmask.*csr"):
        S.encode(tiny(), "zip")
    with pytest.raises(ValueError, match="valid encodings"):
        S.best_encoding(tiny(), candidates=["csr", "nope"])
    with pytest.raises(ValueError, match="m must be an int"):
        S.encode(torch.zeros(3, 10), "nm", m=0)
    with pytest.raises(ValueError, match="block must be a pair"):
        S.encode(tiny(), "bcsr", block=(0, 4))


# ---------------------------------------------------------------- safetensors
def test_safetensors_file_round_trip(tmp_path):
    tensors, metas = {}, {}
    cases = {
        "a": (sparse_tensor((12, 16), 0.9, torch.float16), "csr", {}),
        "b": (sparse_tensor((12, 16), 0.5), "relative", {"bits": 3}),
        "c": (sparse_tensor((5, 7), 0.9, torch.bfloat16), "bcsr", {"block": (2, 4)}),
        "d": (sparse_tensor((8, 16), 0.5), "nm", {}),
        "e": (sparse_tensor((4, 2, 3, 3), 0.7), "pattern", {}),
        "f": (sparse_tensor((300, 300), 0.99), "bitmask", {}),
        "g": (sparse_tensor((3, 5), 1.0), "csr", {}),
    }
    for key, (t, name, opts) in cases.items():
        e = S.encode(t, name, **opts)
        tensors.update(S.to_safetensors_dict(key, e))
        metas[key] = e.meta
    path = tmp_path / "enc.safetensors"
    save_file(tensors, str(path), metadata={"prunekit": json.dumps(metas)})
    loaded = load_file(str(path))
    metas2 = json.loads(json.dumps(metas))
    for key, (t, _, _) in cases.items():
        assert_bitwise_equal(S.decode(S.from_safetensors_dict(key, loaded, metas2[key])), t)


def test_state_dict_round_trip_through_file(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 32))
    with torch.no_grad():
        model[0].weight.mul_(torch.rand_like(model[0].weight) > 0.9)  # -0.0 included
        model[2].weight[torch.rand_like(model[2].weight) < 0.02] = 0
    sd = model.state_dict()
    sd["tied"] = sd["0.weight"]  # aliases are stored once
    sd["steps"] = torch.tensor(7)
    for choose in ["best", "csr"]:
        tensors, meta_json = S.encode_state_dict(sd, choose=choose)
        meta = json.loads(meta_json)["tensors"]
        assert meta["0.weight"]["encoding"] == ("csr" if choose == "csr" else S.best_encoding(sd["0.weight"]).encoding)
        assert meta["0.bias"]["encoding"] == "dense" and meta["1.weight"]["encoding"] == "dense"
        # 2 % sparse: below every breakeven but pattern's, whose 4x4 tiles (the pattern structure's Linear
        # tile) index a nearly dense matrix in 8174 bytes < 8192 dense
        assert meta["2.weight"]["encoding"] == ("dense" if choose == "csr" else "pattern")
        assert meta["tied"] == {"alias_of": "0.weight"}
        path = tmp_path / f"sd_{choose}.safetensors"
        save_file(tensors, str(path), metadata={"prunekit": meta_json})
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            file_meta = f.metadata()["prunekit"]
        out = S.decode_state_dict(load_file(str(path)), file_meta)
        assert list(out) == list(sd)
        for k in sd:
            assert_bitwise_equal(out[k], sd[k])
        assert out["tied"] is out["0.weight"]
        fresh = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 32))
        fresh.load_state_dict({k: v for k, v in out.items() if k not in ("tied", "steps")}, strict=True)
    with pytest.raises(ValueError, match="valid encodings"):
        S.encode_state_dict(sd, choose="zip")


def test_values_array_is_raw_bits():
    e = S.encode(tiny(), "csr")
    assert e.arrays["values"].dtype == np.uint32
    assert e.arrays["values"].view(np.float32).tolist() == [1.0, -2.0, 3.0, 5.0, 4.0]
