"""Issue 18, item 2 (+ part of 6): one compaction, always verified.

* every output tensor is checked on its own scale, on two inputs (another batch size / sequence length);
* a ``sum`` over the channels reads them: a channel that still carries BatchNorm's shift is kept;
* a provably dead unit (zero source rows, zero bias / BatchNorm affine) is removed whatever its consumer
  columns hold; units that stay say why;
* a model that does not trace is refused (no unverified fallback);
* opening a run folder never imports the code its recipe names unless ``--trust-code``.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import sys

import pytest
import torch
from torch import nn

import prunekit
from prunekit.cli.bench import bench_run
from prunekit.cli.compact import compact_loaded, compact_run
from prunekit.cli.main import main
from prunekit.core.errors import UntrustedCodeError
from prunekit.deploy.surgery import CompactionError, OutputCheck, check_outputs, second_inputs
from prunekit.graph import coupled_groups


class ConvSum(nn.Module):
    """conv → BN → ReLU; outputs ``(logits, h.sum(1))`` — the model of the issue."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 4)
        self.scale = scale

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc(h.mean((2, 3))) * self.scale, h.sum(1)


def _conv_sum(scale: float = 1e4) -> ConvSum:
    torch.manual_seed(0)
    m = ConvSum(scale).eval()
    with torch.no_grad():
        m.bn.bias.uniform_(0.5, 1.0)               # every channel carries a positive shift
        m.bn.running_mean.uniform_(-0.1, 0.1)
        m.bn.running_var.uniform_(0.5, 1.5)
    return m


def _drop_channels(m: ConvSum, idx, affine: bool = False) -> dict[str, torch.Tensor]:
    masks = {"conv.weight": torch.ones(8, 3, 3, 3, dtype=torch.bool), "conv.bias": torch.ones(8, dtype=torch.bool),
             "fc.weight": torch.ones(4, 8, dtype=torch.bool)}
    masks["conv.weight"][idx] = False
    masks["conv.bias"][idx] = False
    masks["fc.weight"][:, idx] = False
    if affine:
        masks["bn.weight"] = torch.ones(8, dtype=torch.bool)
        masks["bn.weight"][idx] = False
        masks["bn.bias"] = masks["bn.weight"].clone()
    return masks


def _masked(m, masks):
    ref = copy.deepcopy(m).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    return ref


def _outs(m, x):
    with torch.no_grad():
        return m(x)


X = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def test_sum_over_channels_keeps_channels_that_carry_the_bn_shift():
    """Old code: the check compared the largest error with the largest output (the logits, ×1e4), so the
    second output came back changed by tens of percent."""
    m = _conv_sum(1e6)
    masks = _drop_channels(m, [0, 2, 4, 6])
    ref = _outs(_masked(m, masks), X)
    res = prunekit.compact(m, masks, X, count_macs=False)
    got = _outs(m, X)
    rel = float((got[1] - ref[1]).abs().max() / ref[1].abs().max())
    assert rel <= 1e-5, rel                                      # the h.sum(1) output is unchanged (old: 0.2+)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-2)
    g = next(g for g in coupled_groups(m, X) if g.name == "channels:conv")
    assert g.readers and "summed over by sum" in g.readers[0]
    rep = {r.name: r for r in res.groups}["channels:conv"]
    assert rep.removed == 0 and m.conv.out_channels == 8
    assert rep.reason.startswith("4 units are zero in every weight but read by summed over by sum")


def test_sum_reader_dead_channels_go():
    """The same channels with BatchNorm weight and bias zero are dead: removed, both outputs equal."""
    m = _conv_sum()
    masks = _drop_channels(m, [0, 2, 4, 6], affine=True)
    ref = _outs(_masked(m, masks), X)
    res = prunekit.compact(m, masks, X, count_macs=False)
    assert m.conv.out_channels == m.bn.num_features == m.fc.in_features == 4
    assert res.params_after == 4 * 27 + 4 + 4 + 4 + 4 * 4 + 4
    got = _outs(m, X)
    for a, b in zip(got, ref):
        assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max()) + 1e-5


def test_every_output_checked_on_its_own_scale():
    class Two(nn.Module):
        def forward(self, x):
            return x * 1e4, x[:, :1] * 1e-2

    x = torch.ones(2, 3)
    refs = [(x, Two()(x))]
    bad = Two()
    bad.forward = lambda x: (x * 1e4, x[:, :1] * 1.2e-2)      # the small output 20 % off
    checks = check_outputs(refs, bad, 1e-4, 1e-6)
    assert [c.ok for c in checks] == [True, False]
    assert isinstance(checks[1], OutputCheck) and checks[1].rel_err == pytest.approx(0.2, rel=1e-4)


def test_second_input_has_another_batch_and_length():
    ids = torch.randint(0, 50, (2, 8))
    x2 = second_inputs({"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel": torch.randn(2, 3, 4)})
    assert tuple(x2["input_ids"].shape) == (3, 6) and tuple(x2["attention_mask"].shape) == (3, 6)
    assert torch.equal(x2["input_ids"][:2], ids[:, :6])
    assert tuple(x2["pixel"].shape) == (3, 3, 4)
    img = torch.randn(1, 3, 5, 5)
    y = second_inputs(img)
    assert tuple(y.shape) == (2, 3, 5, 5) and not torch.equal(y[:1], img)
    m = _conv_sum()
    res = prunekit.compact(m, _drop_channels(m, [1], affine=True), X, count_macs=False)
    assert {(c.input, c.output) for c in res.checks} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert res.checks[2].shape == (3, 4)                         # batch 3 on the second input


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.fc(h.mean((2, 3)))


def _small_cnn() -> SmallCNN:
    torch.manual_seed(0)
    m = SmallCNN().eval()
    with torch.no_grad():
        for bn in (m.bn1, m.bn2):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return m


def test_dead_channels_from_other_tools_are_removed():
    """Masks zeroing conv1 rows + bias and bn1's weight and bias (conv2's input columns untouched): the
    channels are provably dead.  Old code: nothing removed, reason blamed "a residual partner"."""
    m = _small_cnn()
    dead = [1, 3, 5]
    masks = {"conv1.weight": torch.ones(8, 3, 3, 3, dtype=torch.bool), "conv1.bias": torch.ones(8, dtype=torch.bool),
             "bn1.weight": torch.ones(8, dtype=torch.bool), "bn1.bias": torch.ones(8, dtype=torch.bool)}
    for k in masks:
        masks[k][dead] = False
    x = torch.randn(2, 3, 8, 8)
    ref = _outs(_masked(m, masks), x)
    res = prunekit.compact(m, masks, x, count_macs=False)
    assert m.conv1.out_channels == m.bn1.num_features == m.conv2.in_channels == 5
    hand = (5 * 27 + 5) + 2 * 5 + (6 * 5 * 9 + 6) + 2 * 6 + (5 * 6 + 5)
    assert res.params_after == hand == sum(p.numel() for p in m.parameters())
    assert {r.name: r.removed for r in res.groups}["channels:conv1"] == 3
    torch.testing.assert_close(_outs(m, x), ref, rtol=1e-5, atol=1e-6)


def test_zero_rows_with_a_bn_shift_stay_and_say_why():
    m = _small_cnn()
    masks = {"conv1.weight": torch.ones(8, 3, 3, 3, dtype=torch.bool)}
    masks["conv1.weight"][[0, 2]] = False                      # rows zero, BatchNorm shift nonzero
    x = torch.randn(2, 3, 8, 8)
    ref = _outs(_masked(m, masks), x)
    res = prunekit.compact(m, masks, x, count_macs=False)
    rep = {r.name: r for r in res.groups}["channels:conv1"]
    assert rep.removed == 0 and m.conv1.out_channels == 8
    assert rep.reason.startswith("2 units have zero source rows but a nonzero bias or norm affine, read by conv2.weight")
    assert "residual partner" not in rep.reason
    torch.testing.assert_close(_outs(m, x), ref, rtol=0, atol=0)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if float(x.sum()) > 0:                                   # data-dependent Python control flow
            return self.fc(x)
        return -self.fc(x)


def test_untraceable_model_is_refused_not_compacted_unverified():
    m = Untraceable().eval()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(CompactionError, match=r"model 'my.models:untraceable' cannot be compacted: its graph does "
                                              r"not trace.*cannot trace Untraceable"):
        compact_loaded(m, None, torch.randn(2, 4), "my.models:untraceable")
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


# ------------------------------------------------------------------------------------------ trust
MARKER_MODULE = '''
import os, pathlib
pathlib.Path(os.environ["PK_TRUST_MARKER"]).write_text("imported")
from torch import nn

def make():
    return nn.Sequential(nn.Conv2d(1, 4, 5), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
'''


def _cli(*args) -> tuple[int, str]:
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        mp.setenv("PRUNEKIT_NO_PROGRESS", "1")
        rc = main(list(args))
    return rc, buf.getvalue()


@pytest.fixture(scope="module")
def user_code_run(tmp_path_factory):
    """A finished run folder whose recipe names ``pkmarker_<id>:make``; importing it writes a marker."""
    root = tmp_path_factory.mktemp("trust")
    name = f"pkmarker_{abs(hash(str(root))) % 10**8}"
    (root / f"{name}.py").write_text(MARKER_MODULE)
    marker = root / "imported.txt"
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        mp.setenv("PK_TRUST_MARKER", str(marker))
        rc, out = _cli("run", "recipes/lenet5_oneshot.yaml", "--set", f"model.name={name}:make",
                       "--set", "data.limit=64", "--set", "dense.epochs=0.1", "--set", "retrain.epochs=0.1",
                       "--set", "prune.structure=channels", "--set", "prune.sparsity=0.5", "--out", str(root / "run"))
        assert rc == 0, out
        assert marker.read_text() == "imported"                   # `prunekit run` imports it: that is asked
        sys.modules.pop(name, None)
        marker.unlink()
        yield root / "run", marker, name, mp


def test_opening_a_run_folder_never_imports_its_code_unasked(user_code_run, tmp_path):
    run, marker, name, mp = user_code_run
    for cmd in (("compact", str(run), "--out", str(tmp_path / "c")), ("bench", str(run), "--repeats", "1"),
                ("export", str(run), "--out", str(tmp_path / "e")), ("report", str(run))):
        rc, out = _cli(*cmd)
        assert not marker.exists(), cmd
        if cmd[0] == "report":                                     # reads results.json + recipe.yaml only
            assert rc == 0 and "##" in out
            continue
        assert rc == 2 and len(out.strip().splitlines()) == 1, out
        assert f"would import the model factory '{name}:make' (model.name)" in out and "--trust-code" in out
    assert not (tmp_path / "c").exists() and not (tmp_path / "e").exists()
    with pytest.raises(UntrustedCodeError, match="trust_code=True"):
        compact_run(run, tmp_path / "c")
    with pytest.raises(UntrustedCodeError):
        bench_run(run, repeats=1)
    assert not marker.exists()


def test_trust_code_flag_allows_it(user_code_run, tmp_path):
    run, marker, name, mp = user_code_run
    rc, out = _cli("compact", str(run), "--out", str(tmp_path / "c"), "--trust-code")
    assert rc == 0, out
    assert marker.read_text() == "imported" and "graph-driven, verified" in out
    man = json.loads((tmp_path / "c" / "compact.json").read_text())
    assert man["format"] == "prunekit-compact/2" and man["params_after"] < man["params_before"]
    # bench times the same verified compaction on the user's own model (old: "no built-in chains")
    r = bench_run(run, repeats=1, batches=(1,), threads=(1,), trust_code=True)
    assert r["params"] == {"before": man["params_before"], "after": man["params_after"]}
    assert r["latency"][0]["compacted_ms"] > 0
    sys.modules.pop(name, None)
