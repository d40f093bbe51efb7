"""The quantized artefact (deploy/quant_storage.py): positions encodings on hand-built masks, the cheapest
chosen, relative indices with fillers, entropy coding, every byte counted, reload bit for bit; recipe errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from prunekit.core.bits import unpack
from prunekit.core.errors import CheckpointError, RecipeError
from prunekit.core.quant import ConstraintSet, parse_quantizer
from prunekit.deploy.quant_storage import (
    _gaps,
    _ungaps,
    artefact_report,
    decode_artefact,
    encode_artefact,
    huffman_decode,
    huffman_encode,
    positions_encodings,
)
from prunekit.pipelines.recipe import parse_recipe


def test_relative_gaps_with_fillers_hand_built():
    m = np.zeros(20, dtype=bool)
    m[[0, 2, 12]] = True
    e = _gaps(m, 2)                 # 2-bit gaps: 3 = "advance 3, no weight"
    assert e.tolist() == [0, 1, 3, 3, 3, 0]  # 0 → pos 0; 1 → pos 2; 3 fillers (9 skipped) then 0 → pos 12
    assert np.array_equal(_ungaps(e, 2, 20), m)


def test_positions_encodings_sizes_and_choice():
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[0, 0] = mask[3, 15] = True
    enc = positions_encodings(mask)
    assert len(enc["bitmap"][0]) == 8                                 # 64 bits
    assert len(enc["csr"][0]) == 5 + 1 and enc["csr"][1]["col_bits"] == 4   # uint8 ptr ×5 + 2×4 bits
    b, p = enc["relative"]
    assert np.array_equal(_ungaps(unpack(np.frombuffer(b, np.uint8), p["gap_bits"], p["entries"]).astype(np.int64),
                                  p["gap_bits"], 64), mask.reshape(-1).numpy())
    assert len(b) == min(len(v[0]) for v in enc.values())            # here relative is the cheapest


@pytest.mark.parametrize("entropy", [None, "huffman", "lzma"])
@pytest.mark.parametrize("spec", ["int:3:sym:tensor", "int:4:asym", "ternary", "cluster:8", "bf16"])
def test_artefact_reloads_bit_for_bit_and_counts_every_byte(spec, entropy):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 3, 5, 5, generator=g)
    m = torch.rand(w.shape, generator=g) > 0.9
    cs = ConstraintSet(parse_quantizer(spec))
    v, m2 = cs.project(w, m)
    state = {"conv.weight": v, "conv.bias": torch.randn(64, generator=g), "bn.num_batches_tracked": torch.tensor(7)}
    data = encode_artefact(state, {"conv.weight": cs.check(v, m2)}, entropy)
    back = decode_artefact(data)
    for k, t in state.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
    r = artefact_report(data)
    assert sum(r["bytes"].values()) == r["file_bytes"] == len(data)
    layer = r["layers"][0]
    assert layer["kept"] == int(m2.sum()) and r["bytes"]["other"] == 64 * 4 + 8
    if entropy is None:
        assert layer["codes_bytes"] == -(-layer["kept"] * cs.quantizer.bits // 8)   # K bits per kept weight
    assert r["weight_data_compression"] == round(w.numel() * 4 / (r["bytes"]["codes"] + r["bytes"]["scales"]
                                                                   + r["bytes"]["positions"]), 2)


def test_dense_layer_stores_no_positions():
    w = torch.tensor([[1.0, -1.0, 1.0, 1.0]])
    cs = ConstraintSet(parse_quantizer("binary"))
    data = encode_artefact({"w": w}, {"w": cs.check(w, torch.ones(1, 4, dtype=torch.bool))})
    r = artefact_report(data)
    assert r["layers"][0]["positions"] == "all" and r["bytes"]["positions"] == 0 and r["bytes"]["codes"] == 1
    assert torch.equal(decode_artefact(data)["w"], w)


def test_huffman_hand_built_and_round_trip():
    assert huffman_encode(np.array([0, 0, 0, 1])) == bytes([2, 0, 1, 1, 0b00010000])   # lengths 1,1; bits 0001
    rng = np.random.default_rng(0)
    s = np.minimum(rng.geometric(0.3, size=3000) - 1, 40)
    b = huffman_encode(s)
    assert np.array_equal(huffman_decode(b, s.size), s)
    p = np.bincount(s) / s.size
    shannon = -(np.bincount(s) * np.log2(np.where(p > 0, p, 1))).sum() / 8
    stream = len(b) - 2 - (s.max() + 1)                             # minus the length table
    assert shannon <= stream <= shannon + s.size / 8 + 1             # within one bit per symbol of the bound


def test_lzma_beats_packing_on_skewed_codes():
    g = torch.Generator().manual_seed(0)
    w = torch.where(torch.rand(1, 4000, generator=g) < 0.02, -1.0, 1.0)
    cs = ConstraintSet(parse_quantizer("binary"))
    qc = cs.check(*cs.project(w))
    plain = artefact_report(encode_artefact({"w": w}, {"w": qc}))
    ent = artefact_report(encode_artefact({"w": w}, {"w": qc}, "lzma"))
    assert ent["layers"][0]["codes"] == "lzma" and ent["bytes"]["codes"] < plain["bytes"]["codes"] == 500
    # i.i.d. codes: the order-0 Shannon bound is a true lower bound, and LZMA (small stream, fixed overhead) within 3× of it
    assert ent["layers"][0]["shannon_code_bytes"] < ent["bytes"]["codes"] < 3 * ent["layers"][0]["shannon_code_bytes"]


def test_bad_artefact_and_bad_recipe():
    with pytest.raises(CheckpointError, match="bad magic"):
        decode_artefact(b"nope")
    base = {"model": {"name": "lenet5"}, "data": {"name": "mnist"}}
    with pytest.raises(RecipeError, match=r"quant.scheme: .*valid: .*int:K"):
        parse_recipe({**base, "quant": {"scheme": "int:12"}})
    with pytest.raises(RecipeError, match=r"quant.overrides\['fc1'\]"):
        parse_recipe({**base, "quant": {"scheme": "int:4", "overrides": {"fc1": "pow2:1"}}})
    with pytest.raises(RecipeError, match="quant.method"):
        parse_recipe({**base, "quant": {"scheme": "int:4", "method": "magic"}})
    with pytest.raises(RecipeError, match="need quant.scheme"):
        parse_recipe({**base, "quant": {"schedule": ["int:8"]}})
