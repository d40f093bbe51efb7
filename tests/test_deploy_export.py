"""Deployment export (`prunekit.export`, `prunekit export RUN`): ONNX fp32 checked against PyTorch on every
output on its own scale, int8 by ONNX Runtime's quantization tools (dynamic, static with a calibration
reader), the artefact evaluated by ONNX Runtime and recorded in results.json.  onnx / onnxruntime are in
the test extra: these tests fail (ImportError) rather than skip when they are missing."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import onnx
import onnxruntime  # noqa: F401  (fail loudly when the extra is missing)
import pytest
import torch
from torch import nn

import prunekit
from hf_tiny import example, tiny
from prunekit.cli.export import at_length, export_run, load_run_workload
from prunekit.cli.main import main
from prunekit.deploy.export import BatchReader, ExportError, OrtModel, check_onnx, quantize_onnx, rel_errors
from prunekit.training.tasks import ClassificationTask


class TinyCNN(nn.Module):
    """Conv → BN → ReLU → Conv → ReLU → pool → Linear, two outputs on different scales (logits and
    1000 × a feature)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.fc = nn.Conv2d(16, 64, 3, padding=1), nn.Linear(64, 2)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.bn(self.conv(x))))).mean((2, 3))
        return self.fc(h), 1000.0 * h


def _separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.5 + (2 * y - 1).float().view(-1, 1, 1, 1)
    return x, y


class _First(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x)[0]


@pytest.fixture(scope="module")
def cnn_files(tmp_path_factory):
    """A TinyCNN trained to ~100 % on a separable problem, exported fp32 once, quantized dynamic + static."""
    torch.manual_seed(0)
    m = TinyCNN()
    x, y = _separable(256, 0)
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x)[0], y).backward()
        opt.step()
    m.eval()
    d = tmp_path_factory.mktemp("cnn")
    res = prunekit.export(m, x[:4], d / "cnn.onnx")
    dyn = quantize_onnx(res.path, d / "cnn.int8-dynamic.onnx", "dynamic")
    stat = quantize_onnx(res.path, d / "cnn.int8-static.onnx", "static", calibration=[x[i:i + 32] for i in range(0, 128, 32)])
    return m, res, dyn, stat


def test_cnn_fp32_matches_pytorch_on_every_output(cnn_files):
    m, res, _, _ = cnn_files
    assert res.int8 is None and res.path == res.fp32_path and res.check.n_outputs == 2
    xs = torch.randn(7, 1, 8, 8)                     # another batch size: the batch axis is dynamic
    chk = check_onnx(res.path, m, xs)
    assert len(chk.rel) == 2 and max(chk.rel) <= 1e-4
    # each output on its own scale: the 1000x feature output's absolute error would hide the logits'
    got = OrtModel(res.path)(xs)
    with torch.no_grad():
        ref = m(xs)
    assert rel_errors([g.numpy() for g in got], [r.numpy() for r in ref]) == pytest.approx(chk.rel)


def test_cnn_int8_dynamic_and_static_smaller_and_accurate(cnn_files):
    m, res, dyn, stat = cnn_files
    x, y = _separable(200, 1)                        # held-out data
    loader = [(x[i:i + 50], y[i:i + 50]) for i in range(0, 200, 50)]
    task = ClassificationTask()
    acc_pt = task.evaluate(_First(m), loader)["accuracy"]
    assert acc_pt >= 95.0
    for f in (dyn, stat):
        assert f.stat().st_size < res.bytes
        acc = task.evaluate(_First(OrtModel(f)), loader)["accuracy"]
        assert abs(acc - acc_pt) <= 1.0, f
    ops = {n.op_type for n in onnx.load(str(stat)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops          # QDQ format
    assert "ConvInteger" in {n.op_type for n in onnx.load(str(dyn)).graph.node}


def test_batch_reader_feeds_by_name_and_rewinds():
    b1 = {"input_ids": torch.tensor([[1, 2]]), "attention_mask": torch.tensor([[1, 1]]), "labels": torch.tensor([0])}
    r = BatchReader(["input_ids", "attention_mask"], [b1, b1])
    f = r.get_next()
    assert set(f) == {"input_ids", "attention_mask"} and f["input_ids"].tolist() == [[1, 2]]
    assert r.get_next() is not None and r.get_next() is None
    r.rewind()
    assert r.get_next() is not None
    with pytest.raises(ExportError, match="lacks inputs"):
        BatchReader(["token_type_ids"], [b1]).get_next()
    with pytest.raises(ExportError, match="at least one batch"):
        BatchReader(["x"], [])


@pytest.fixture(scope="module")
def bert_files(tmp_path_factory):
    m = tiny("bert").bert                 # BertModel: last_hidden_state and pooler_output, two scales
    d, cwd = tmp_path_factory.mktemp("bert"), tmp_path_factory.mktemp("cwd")
    res = prunekit.export(m, example("bert", 2, 8), d / "bert.onnx")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)      # ONNX Runtime's failed symbolic shape inference must not litter the working directory
        dyn = quantize_onnx(res.path, d / "bert.int8-dynamic.onnx", "dynamic")
        stat = quantize_onnx(res.path, d / "bert.int8-static.onnx", "static",
                             calibration=[example("bert", 4, 12), example("bert", 3, 6)])
    assert list(cwd.iterdir()) == []
    return m, res, dyn, stat


def test_tiny_bert_fp32_matches_and_int8_is_smaller(bert_files):
    m, res, dyn, stat = bert_files
    x = example("bert", 3, 11)                                      # other batch and sequence length
    chk = check_onnx(res.path, m, x)
    assert chk.n_outputs == 2 and chk.max_rel <= 1e-4
    with torch.no_grad():
        ref = m(**x).to_tuple()
    for f in (dyn, stat):
        assert f.stat().st_size < res.bytes
        out = OrtModel(f)(**x)                                      # HF calling convention: .logits, to_tuple()
        assert out.logits is out.to_tuple()[0]
        rel = rel_errors([o.numpy() for o in out.to_tuple()], [r.numpy() for r in ref])
        assert len(rel) == 2 and max(rel) <= 0.1, (f, rel)           # int8: within 10 % of each output's scale
    with pytest.raises(ExportError, match="calibration"):
        prunekit.export(m, x, res.path.with_name("never.onnx"), int8="static")
    with pytest.raises(ExportError, match="int8 must be"):
        prunekit.export(m, x, res.path.with_name("never.onnx"), int8="int4")


def test_fp32_mismatch_refuses_and_removes_the_file(tmp_path):
    m = TinyCNN().eval()
    with pytest.raises(ExportError, match="relative to its largest value"):
        prunekit.export(m, torch.randn(2, 1, 8, 8), tmp_path / "m.onnx", rtol=0.0)
    assert not (tmp_path / "m.onnx").exists()


def _cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setenv("PRUNEKIT_NO_PROGRESS", "1")
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def lenet_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    rc, _, _ = _cli("run", "recipes/lenet5_oneshot.yaml", "--set", "data.limit=300", "--set", "train.epochs=0.3",
                    "--set", "dense.epochs=0.3", "--set", "retrain.epochs=0.2", "--set", "prune.structure=channels",
                    "--set", "prune.sparsity=0.5", "--out", str(run))
    assert rc == 0
    return run


def test_cli_export_writes_the_evaluated_record(lenet_run):
    rc, stdout, _ = _cli("export", str(lenet_run), "--int8", "dynamic", "--batches", "1", "--repeats", "2")
    assert rc == 0
    rec = json.loads((lenet_run / "results.json").read_text())["export"]["onnx-int8-dynamic"]
    f = lenet_run / "export" / "model.int8-dynamic.onnx"
    assert rec["file"] == str(f) and rec["bytes"] == f.stat().st_size < rec["fp32_bytes"]
    assert rec["compacted"] and rec["params_after"] < rec["params_before"]
    # the recorded metric is the artefact's own: re-evaluate the file by hand on the run's test set
    wl, _, _ = load_run_workload(lenet_run)
    correct = total = 0
    sess = OrtModel(f)
    for xb, yb in wl.eval_loader:
        correct += int((sess(xb).argmax(1) == yb).sum())
        total += len(yb)
    assert rec["metric"] == pytest.approx(100.0 * correct / total) and rec["eval_examples"] == total
    assert rec["metric_name"] == "accuracy" and rec["tolerance_exceeded"] is (rec["metric_loss"] > 1.0)
    assert rec["fp32_max_rel_error"] <= 1e-4 and rec["fp32_dev_batch_max_rel_error"] <= 1e-4
    (lat,) = rec["latency"]
    assert lat["batch"] == 1 and lat["threads"] == 1 and lat["onnx_ms"] > 0
    assert "ONNX Runtime" in stdout and f"{rec['bytes']:,} bytes" in stdout


def test_int8_loss_beyond_tolerance_is_flagged_loudly(lenet_run):
    """A forced mismatch: a negative tolerance no artefact can meet → WARNING line + flag."""
    lines: list[str] = []
    rec = export_run(lenet_run, int8="static", tolerance=-1.0, batches=(1,), repeats=1, calibration_samples=64,
                     log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert rec["tolerance_exceeded"] is True and rec["calibration_batches"] >= 1
    assert len(lines) == 1 and lines[0].startswith("WARNING: the onnx-int8-static artefact loses")
    both = json.loads((lenet_run / "results.json").read_text())["export"]
    assert both["onnx-int8-static"]["tolerance_exceeded"] is True
    assert np.isfinite(rec["metric"]) and rec["pytorch_metric"] - rec["metric"] == pytest.approx(rec["metric_loss"])


def test_token_inputs_are_timed_at_the_asked_length():
    x = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    y = at_length(x, 7)
    assert y["input_ids"].tolist() == [[5, 6, 7, 5, 6, 7, 5]] and y["attention_mask"].tolist() == [[1] * 7]
    assert at_length(x, 2)["input_ids"].tolist() == [[5, 6]]
    t = torch.randn(2, 1, 8, 8)
    assert at_length(t, 7) is t                       # not token inputs: unchanged
