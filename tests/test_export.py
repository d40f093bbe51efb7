"""ONNX export of compacted models, checked with onnxruntime (atol 1e-4).

onnx / onnxruntime / onnxscript are in the ``test`` extra: these tests fail (ImportError) rather than
skip when they are missing."""
from __future__ import annotations

import onnx  # noqa: F401  (fail loudly when the extra is missing)
import onnxruntime  # noqa: F401
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from prunekit.deploy.export import check_onnx, export_onnx
from prunekit.deploy.surgery import compact
from prunekit.models.lenet import lenet5


def test_lenet5_compacted_onnx(tmp_path):
    torch.manual_seed(0)
    m = lenet5().eval()
    with torch.no_grad():
        m.conv2.weight[:25] = 0                           # 25 channels: filters + the 16 fc1 columns each
        m.fc1.weight[:, :400] = 0
        m.fc1.weight[:100] = 0                            # 100 fc1 neurons: rows + fc2 columns
        m.fc2.weight[:, :100] = 0
    compact(m, None, torch.randn(2, 1, 28, 28), count_macs=False)
    assert (m.conv2.out_channels, m.fc1.in_features, m.fc1.out_features) == (25, 400, 400)
    res = export_onnx(m, torch.randn(2, 1, 28, 28), tmp_path / "lenet.onnx")
    assert res.max_abs_diff <= 1e-4 and res.n_outputs == 1
    # dynamic batch: another batch size runs and matches
    assert check_onnx(tmp_path / "lenet.onnx", m, torch.randn(5, 1, 28, 28)).max_abs_diff <= 1e-4
    init = {t.name: list(t.dims) for t in onnx.load(str(tmp_path / "lenet.onnx")).graph.initializer}
    assert [25, 20, 5, 5] in init.values() and [400, 400] in init.values()   # the compacted shapes


def test_tiny_bert_compacted_onnx(tmp_path):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=64, num_labels=2, max_position_embeddings=32)
    m = BertForSequenceClassification(cfg).eval()
    with torch.no_grad():
        L = m.bert.encoder.layer[0]
        for lin in (L.attention.self.query, L.attention.self.key, L.attention.self.value):
            lin.weight[:16] = 0                           # heads 0, 1: q/k/v rows + output columns
        L.attention.output.dense.weight[:, :16] = 0
        L.intermediate.dense.weight[32:] = 0              # 32 FFN neurons: rows + output columns
        L.output.dense.weight[:, 32:] = 0
    compact(m, None, {"input_ids": torch.randint(0, 100, (2, 8))}, count_macs=False)
    assert m.bert.encoder.layer[0].attention.self.num_attention_heads == 2
    ids = torch.randint(0, 100, (2, 8))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    res = export_onnx(m, x, tmp_path / "bert.onnx")
    assert res.max_abs_diff <= 1e-4
    ids2 = torch.randint(0, 100, (3, 5))                  # other batch and sequence length
    assert check_onnx(tmp_path / "bert.onnx", m, {"input_ids": ids2,
                                                   "attention_mask": torch.ones_like(ids2)}).max_abs_diff <= 1e-4


def test_bad_inputs():
    with pytest.raises(TypeError, match="example inputs"):
        export_onnx(lenet5().eval(), "not a tensor", "/tmp/never.onnx")
