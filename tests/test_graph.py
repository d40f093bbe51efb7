"""Coupled groups found from the traced graph: counts, slices, and non-removable reasons."""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from prunekit.core.groups import CoupledGroup, Slice
from prunekit.graph import TraceError, coupled_groups, macs
from prunekit.models.lenet import lenet5

IDS = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))


class LNMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)
        self.w = nn.Parameter(torch.ones(16))

    def forward(self, x):
        return self.fc2(F.layer_norm(torch.relu(self.fc1(x)), (16,), self.w))


def _by_name(groups):
    return {g.name: g for g in groups}


def test_slice_partition_and_masks_roundtrip():
    g = CoupledGroup("heads:a", "heads", 3, (Slice("q", 0, 2), Slice("o", 1, 2), Slice("c", 1, 2, offset=6)))
    t = {"q": torch.arange(24.).reshape(6, 4), "o": torch.arange(12.).reshape(2, 6),
         "c": torch.arange(24.).reshape(2, 12)}
    part = g.partition(t)
    assert part.shape == (3, 8 + 4 + 4)
    assert part[1, :8].tolist() == list(range(8, 16))               # q rows 2,3
    keep = torch.tensor([True, False, True])
    m = g.element_masks(keep, {k: v.shape for k, v in t.items()})
    assert m["q"][2:4].sum() == 0 and m["q"].sum() == 16
    assert m["c"][:, :6].all() and (~m["c"][:, 8:10]).all()          # offset 6: unit 1 = cols 8, 9
    assert g.pruned_units(m).tolist() == [False, True, False]
    assert g.kept_indices(keep, g.slices[2], 12).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 10, 11]


def test_mlp_layernorm_couples_fc1_rows_norm_and_fc2_cols():
    gs = _by_name(coupled_groups(LNMLP().eval(), torch.randn(2, 8)))
    g = gs["neurons:fc1"]
    assert g.count == 16
    assert {(s.tensor, s.dim) for s in g.slices} == {("fc1.weight", 0), ("fc1.bias", 0), ("w", 0), ("fc2.weight", 1)}
    assert not g.removable and "layer_norm" in g.reason
    assert not gs["neurons:fc2"].removable and "model output" in gs["neurons:fc2"].reason


def test_lenet_flatten_width_is_spatial_size():
    gs = _by_name(coupled_groups(lenet5().eval(), torch.randn(1, 1, 28, 28)))
    g = gs["channels:conv2"]
    assert g.count == 50 and g.removable
    assert Slice("fc1.weight", 1, 16, 0) in g.slices
    assert gs["channels:conv1"].count == 20 and gs["neurons:fc1"].count == 500


def test_bert_heads_and_neurons():
    m = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                             vocab_size=100)).eval()
    gs = coupled_groups(m, {"input_ids": IDS})
    heads = [g for g in gs if g.kind == "heads"]
    neurons = [g for g in gs if g.kind == "neurons" and g.removable]
    assert [g.count for g in heads] == [4, 4] and all(g.removable for g in heads)
    assert heads[0].head_dim == 8 and heads[0].attention == "encoder.layer.0.attention.self"
    assert Slice("encoder.layer.0.attention.output.dense.weight", 1, 8) in heads[0].slices
    assert len(heads[0].slices) == 7            # q/k/v weight+bias rows, o columns
    assert [g.count for g in neurons] == [37, 37]
    hidden = [g for g in gs if g.kind == "channels"]
    assert len(hidden) == 1 and not hidden[0].removable and "layer_norm" in hidden[0].reason


def test_gpt2_fused_c_attn_offsets_and_tied_head():
    m = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=100)).eval()
    gs = coupled_groups(m, {"input_ids": IDS})
    h = next(g for g in gs if g.kind == "heads")
    assert h.count == 4
    offs = sorted(s.offset for s in h.slices if s.tensor == "transformer.h.0.attn.c_attn.weight")
    assert offs == [0, 32, 64] and all(s.dim == 1 and s.width == 8 for s in h.slices
                                       if s.tensor.endswith("c_attn.weight"))
    assert Slice("transformer.h.0.attn.c_proj.weight", 0, 8) in h.slices
    n = next(g for g in gs if g.kind == "neurons" and g.removable)
    assert n.count == 128 and Slice("transformer.h.0.mlp.c_fc.weight", 1, 1) in n.slices
    hidden = next(g for g in gs if g.kind == "channels")
    assert not hidden.removable and "tied to the embedding" in hidden.reason


def test_llama_gqa_kv_groups_gated_mlp_rmsnorm():
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=40, vocab_size=100, head_dim=8)
    gs = coupled_groups(LlamaForCausalLM(cfg).eval(), {"input_ids": IDS})
    kv = [g for g in gs if g.kind == "kv_groups"]
    assert [g.count for g in kv] == [2, 2] and all(g.removable for g in kv)
    sl = {s.tensor.rsplit(".", 2)[-2]: s for s in kv[0].slices}
    assert (sl["q_proj"].width, sl["k_proj"].width, sl["v_proj"].width, sl["o_proj"].width) == (16, 8, 8, 16)
    assert kv[0].heads_per_unit == 2 and kv[0].head_dim == 8
    mlp = [g for g in gs if g.kind == "neurons" and g.removable]
    assert [g.count for g in mlp] == [40, 40]
    assert {s.tensor.rsplit(".", 2)[-2] for s in mlp[0].slices} == {"gate_proj", "up_proj", "down_proj"}
    hidden = next(g for g in gs if g.kind == "channels")
    assert not hidden.removable and "mean" in hidden.reason        # RMSNorm


def test_macs_counts_linear_and_attention():
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    assert macs(m, torch.randn(3, 8)) == {"linear": 3 * (8 * 16 + 16 * 4), "total": 3 * (8 * 16 + 16 * 4)}
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
                                vocab_size=100)).eval()
    mc = macs(bert, {"input_ids": IDS})
    assert mc["scaled_dot_product_attention"] == 2 * 4 * 8 * 8 * (8 + 8)
    assert mc["linear"] == 2 * 8 * (4 * 32 * 32 + 2 * 32 * 37) + 2 * 32 * 32   # + pooler on 2 tokens


def test_untraceable_model_is_a_clear_error():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if float(x.sum()) > 0:      # data-dependent Python control flow on a value
                return self.fc(x).numpy()
            return self.fc(x)

    with pytest.raises(TraceError, match="cannot trace Bad"):
        coupled_groups(Bad(), torch.ones(1, 4))


def test_graph_build_is_fast_for_a_4_layer_bert():
    m = BertModel(BertConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                             vocab_size=100)).eval()
    t = time.perf_counter()
    gs = coupled_groups(m, {"input_ids": IDS})
    assert time.perf_counter() - t < 10
    assert sum(g.kind == "heads" for g in gs) == 4
