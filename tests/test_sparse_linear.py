import math

import pytest
import torch
from torch import nn

from prunekit.deploy.sparse_linear import SparseLinear, choose_linear_impl, sparsify_linears, time_linear


def masked_linear(in_f, out_f, sparsity, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.rand_like(lin.weight) >= sparsity)
    return lin


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_shape", [(5,), (3, 5), (2, 7, 5), (2, 3, 4, 5), (0, 5)])
def test_sparse_linear_matches_dense(bias, x_shape):
    lin = masked_linear(5, 6, 0.6, bias=bias)
    sl = SparseLinear(lin)
    x = torch.randn(x_shape)
    y = sl(x)
    assert y.shape == lin(x).shape
    torch.testing.assert_close(y, lin(x), atol=1e-5, rtol=1e-5)


def test_sparse_linear_bert_shaped():
    lin = masked_linear(96, 384, 0.9)
    sl = SparseLinear(lin)
    assert sl.weight.layout == torch.sparse_csr and sl.weight.col_indices().dtype == torch.int32
    assert sl.nnz == int((lin.weight != 0).sum())
    assert sl.sparsity == pytest.approx(float((lin.weight == 0).float().mean()))
    x = torch.randn(2, 16, 96)
    torch.testing.assert_close(sl(x), lin(x), atol=1e-5, rtol=1e-5)
    back = sl.to_linear()
    assert torch.equal(back.weight, lin.weight) and torch.equal(back.bias, lin.bias)


def test_sparse_linear_rejects_non_linear():
    with pytest.raises(TypeError, match="nn.Linear"):
        SparseLinear(nn.Conv1d(3, 3, 1))


def test_choose_linear_impl_and_timings():
    lin = masked_linear(64, 128, 0.95)
    x = torch.randn(1, 8, 64)
    assert choose_linear_impl(lin, x, repeats=3) in ("dense", "csr")
    t = time_linear(lin, x, repeats=3, warmup=1, num_threads=1)
    assert math.isfinite(t.dense_ms) and t.dense_ms > 0
    assert math.isfinite(t.sparse_ms) and t.sparse_ms > 0
    assert t.chosen in ("dense", "csr")
    assert time_linear(lin, x, repeats=2, min_speedup=0.0).chosen == "csr"
    assert time_linear(lin, x, repeats=2, min_speedup=math.inf).chosen == "dense"


class TinyEncoder(nn.Module):
    """BERT-shaped stand-in (keyword inputs, (batch, seq, hidden) activations, a shared Linear,
    an uncalled Linear and an MHA whose out_proj is an nn.Linear subclass)."""

    def __init__(self, hidden=32):
        super().__init__()
        self.embed = nn.Embedding(50, hidden)
        self.attn = nn.MultiheadAttention(hidden, 2, batch_first=True)
        self.up = nn.Linear(hidden, 4 * hidden)
        self.down = nn.Linear(4 * hidden, hidden)
        self.dense_ish = nn.Linear(hidden, hidden)
        self.shared = nn.Linear(hidden, hidden)
        self.blocks = nn.ModuleList([self.shared])
        self.unused = nn.Linear(hidden, hidden)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = h + self.down(torch.relu(self.up(h)))
        return self.blocks[0](self.dense_ish(h))


def _prune(model, sparsity, skip=("dense_ish",)):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and name not in skip:
                m.weight.mul_(torch.rand(m.weight.shape, generator=g) >= sparsity)


@pytest.mark.parametrize("min_speedup", [0.0, 1.1])
def test_sparsify_linears_report_and_outputs(min_speedup):
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    _prune(model, 0.9)
    inputs = {"input_ids": torch.randint(0, 50, (2, 12)), "attention_mask": torch.ones(2, 12)}
    with torch.no_grad():
        ref = model(**inputs)
    report = sparsify_linears(model, inputs, min_sparsity=0.5, repeats=2, warmup=1, min_speedup=min_speedup)
    rows = {r["name"]: r for r in report}
    assert set(rows) == {"attn.out_proj", "up", "down", "dense_ish", "shared", "unused"}
    for r in report:
        assert set(r) == {"name", "sparsity", "dense_ms", "sparse_ms", "chosen", "reason"}
        assert r["chosen"] in ("dense", "csr")
    assert type(model.attn.out_proj) is not SparseLinear  # MHA reads its weight directly
    assert "subclass" in rows["attn.out_proj"]["reason"]
    assert rows["unused"]["dense_ms"] is None and rows["unused"]["chosen"] == "dense"
    assert rows["unused"]["reason"].startswith("not called")
    assert rows["dense_ish"]["sparse_ms"] is None and rows["dense_ish"]["reason"].startswith("sparsity")
    for name in ("up", "down", "shared"):
        assert rows[name]["sparsity"] > 0.8
        assert rows[name]["dense_ms"] > 0 and rows[name]["sparse_ms"] > 0
        expect = SparseLinear if rows[name]["chosen"] == "csr" else nn.Linear
        assert type(model.get_submodule(name)) is expect
    if min_speedup == 0.0:
        assert all(rows[n]["chosen"] == "csr" for n in ("up", "down", "shared"))
        assert model.blocks[0] is model.shared  # shared module replaced under both names
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_sparsify_linears_hf_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=256, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    _prune(model, 0.95, skip=())
    inputs = {"input_ids": torch.randint(0, 100, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    with torch.no_grad():
        ref = model(**inputs).last_hidden_state
    report = sparsify_linears(model, inputs, repeats=3, min_speedup=0.0)
    assert len(report) == 2 * 6 + 1 and all(r["chosen"] == "csr" for r in report)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).last_hidden_state, ref, atol=1e-5, rtol=1e-5)
