"""Coupled groups as structures: ``prune.structure: heads+neurons | channels | ...`` through compute_masks
(one-shot, gradual, ADMM, group lasso), the group options, and ``prunekit run`` → ``prunekit compact``."""
from __future__ import annotations

import contextlib
import copy
import io
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel

import prunekit
from prunekit.core.errors import RecipeError
from prunekit.core.plan import PruneSpec, compute_masks, kept_count
from prunekit.core.structures import GroupStructure, parse_structure, structure_syntax
from prunekit.graph import coupled_groups
from prunekit.pipelines.recipe import parse_recipe

IDS = {"input_ids": torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))}


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                                vocab_size=100)).eval()


class ResCNN(nn.Module):
    """stem conv+bn → residual block (conv1 → conv2, added to the stem's output) → pool → fc."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12)
        self.conv2, self.bn2 = nn.Conv2d(12, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def bert():
    m = tiny_bert()
    return m, coupled_groups(m, IDS)


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    m = ResCNN().eval()
    return m, coupled_groups(m, X)


def _layer(i):
    return f"encoder.layer.{i}."


def _unit_norms(sd, parts, count):
    """L2 per unit over ``parts`` = [(tensor, dim)], every unit a contiguous slice of width size/count."""
    tot = torch.zeros(count)
    for name, dim in parts:
        w = sd[name].detach().movedim(dim, 0)
        tot += w.reshape(count, -1).pow(2).sum(1)
    return tot.sqrt()


# ------------------------------------------------------------------------------------------- parsing
def test_group_kinds_parse_as_structures():
    st = parse_structure("heads+neurons")
    assert isinstance(st, GroupStructure) and st.kinds == ("heads", "neurons") and str(st) == "heads+neurons"
    assert st.coupled and not parse_structure("row").coupled
    assert parse_structure("Channels").kinds == ("channels",) and parse_structure("kv_groups").kinds == ("kv_groups",)
    assert "channels|heads|kv_groups|neurons[+...]" in structure_syntax()
    assert parse_recipe({"prune": {"structure": "heads+neurons", "multiple_of": 8}}).prune.multiple_of == 8
    with pytest.raises(RecipeError, match="group structures"):
        parse_recipe({"prune": {"structure": "row", "min_keep": 2}})
    with pytest.raises(ValueError, match="coupled groups"):
        compute_masks(tiny_bert(), PruneSpec("heads", 0.5))          # no groups given
    with pytest.raises(ValueError, match="coupled groups"):
        prunekit.mask_for(torch.randn(4, 4), "neurons", 0.5)


# ------------------------------------------------------------------------------------------- exact masks
def test_heads_neurons_bert_half_exact(bert):
    m, groups = bert
    ms = compute_masks(m, PruneSpec("heads+neurons", 0.5, groups=groups))
    sd = dict(m.named_parameters())
    for i in range(2):
        p = _layer(i)
        q, k, v = (f"{p}attention.self.{n}.weight" for n in ("query", "key", "value"))
        o, f1, f2 = f"{p}attention.output.dense.weight", f"{p}intermediate.dense.weight", f"{p}output.dense.weight"
        hn = _unit_norms(sd, [(q, 0), (k, 0), (v, 0), (o, 1)], 4)
        keep_h = torch.zeros(4, dtype=torch.bool)
        keep_h[hn.argsort(descending=True)[:2]] = True
        rows = keep_h.repeat_interleave(8)
        for n in (q, k, v):
            assert torch.equal(ms[n], rows[:, None].expand(32, 32)) and ms.structures[n] == "heads"
        assert torch.equal(ms[o], rows[None, :].expand(32, 32))
        nn_ = _unit_norms(sd, [(f1, 0), (f2, 1)], 40)
        keep_n = torch.zeros(40, dtype=torch.bool)
        keep_n[nn_.argsort(descending=True)[:20]] = True
        assert torch.equal(ms[f1], keep_n[:, None].expand(40, 32)) and ms.structures[f1] == "neurons"
        assert torch.equal(ms[f2], keep_n[None, :].expand(32, 40))
    assert not any("embeddings" in n or "pooler" in n for n in ms)    # not removable: left dense
    # the alias: heads_neurons over the same groups gives the same masks as the hand-written families
    from prunekit.algorithms import get_algorithm_class
    cls = get_algorithm_class("heads_neurons")
    a = cls(cls.Params(), PruneSpec("unstructured", 0.5, groups=groups)).final_masks(m)
    from prunekit.graph.families import head_neuron_masks
    b = head_neuron_masks(m, 0.5, 0.5)
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_channels_residual_cnn(cnn):
    m, groups = cnn
    ms = compute_masks(m, PruneSpec("channels", 0.5, groups=groups))
    # the residual stream (stem + conv2 + their consumers conv1, fc) is one group: pruned together
    stem_rows = ms["stem.weight"].reshape(8, -1).any(1)
    assert int(stem_rows.sum()) == 4
    assert torch.equal(ms["conv2.weight"].reshape(8, -1).any(1), stem_rows)
    assert torch.equal(ms["conv1.weight"].any(0).reshape(8, -1).any(1), stem_rows)
    assert torch.equal(ms["fc.weight"].any(0), stem_rows)
    sd = dict(m.named_parameters())
    n = _unit_norms(sd, [("stem.weight", 0), ("conv2.weight", 0), ("conv1.weight", 1), ("fc.weight", 1)], 8)
    assert set(stem_rows.nonzero().reshape(-1).tolist()) == set(n.argsort(descending=True)[:4].tolist())
    assert int(ms["conv1.weight"].reshape(12, -1).any(1).sum()) == 6          # conv1's own 12 channels: 6 kept
    # one-shot + compaction: outputs equal the masked model, fewer parameters
    masked = copy.deepcopy(m)
    ms.apply(masked)
    res = prunekit.compact(copy.deepcopy(m), ms, X, inplace=False)
    assert {g.name: g.removed for g in res.groups if g.removed} == {"channels:stem": 4, "channels:conv1": 6}
    with torch.no_grad():
        torch.testing.assert_close(res.model(X), masked(X), atol=1e-5, rtol=1e-4)
    assert res.params_after < res.params_before and res.macs_after < res.macs_before


# ------------------------------------------------------------------------------------------- options
def test_min_keep_and_multiple_of(bert):
    m, groups = bert
    ms = compute_masks(m, PruneSpec("heads", 0.9, groups=groups, min_keep=2))
    assert int(ms[f"{_layer(0)}attention.self.query.weight"].any(1).sum()) == 16       # 2 of 4 heads kept
    ms = compute_masks(m, PruneSpec("neurons", 0.3, groups=groups, multiple_of=8))
    assert int(ms[f"{_layer(0)}intermediate.dense.weight"].any(1).sum()) == 32         # 28 → 32
    ms = compute_masks(m, PruneSpec("neurons", 0.75, groups=groups, multiple_of=8))
    assert int(ms[f"{_layer(1)}intermediate.dense.weight"].any(1).sum()) == 8          # 10 → 8
    assert kept_count(40, 0, min_keep=1, multiple_of=8) == 8 and kept_count(6, 5, 1, 8) == 6


def test_ignore_and_overrides_by_group_name(bert):
    m, groups = bert
    spec = PruneSpec("heads+neurons", 0.5, groups=groups, ignore=["heads:*layer.0*"],
                     overrides={"neurons:*layer.1*": 0.25})
    ms = compute_masks(m, spec)
    assert f"{_layer(0)}attention.self.query.weight" not in ms                       # ignored: dense
    assert int(ms[f"{_layer(1)}attention.self.query.weight"].any(1).sum()) == 16
    assert int(ms[f"{_layer(1)}intermediate.dense.weight"].any(1).sum()) == 30
    _, skipped = spec.group_plan()
    assert skipped["heads:encoder.layer.0.attention.self"] == "ignored (prune.ignore)"
    with pytest.raises(ValueError, match="match no prunable group"):
        compute_masks(m, PruneSpec("heads", 0.5, groups=groups, overrides={"nope*": 0.1}))


def _scaled_bert(groups_from):
    m = tiny_bert()
    with torch.no_grad():                   # layer 1's FFN 10x larger: a global ranking prunes layer 0 first
        m.encoder.layer[1].intermediate.dense.weight.mul_(10)
        m.encoder.layer[1].output.dense.weight.mul_(10)
    return m, coupled_groups(m, IDS)


def test_global_scope_and_uniform():
    m, groups = _scaled_bert(None)
    def kept(ms):
        return [int(ms[f"{_layer(i)}intermediate.dense.weight"].any(1).sum()) for i in range(2)]
    ms = compute_masks(m, PruneSpec("neurons", 0.4, scope="global", groups=groups))
    assert kept(ms) == [8, 40]                              # one ranking over both layers: 32 of 80 go
    assert kept(compute_masks(m, PruneSpec("neurons", 0.4, groups=groups))) == [24, 24]     # layer scope
    ms = compute_masks(m, PruneSpec("neurons", 0.4, scope="global", uniform=True, groups=groups))
    assert kept(ms) == [24, 24]                             # the same count in every layer
    assert kept(compute_masks(m, PruneSpec("neurons", 0.4, scope="global", groups=groups, min_keep=10))) == [10, 40]


def test_not_removable_groups_are_left_dense_and_reported(bert):
    m, groups = bert
    spec = PruneSpec("channels+neurons", 0.5, groups=groups)
    plan, skipped = spec.group_plan()
    assert "not removable" in skipped["channels:embeddings.word_embeddings"]
    assert skipped["neurons:pooler.dense"] == "not removable: model output"
    assert {g.name for g, _, _ in plan} == {"neurons:encoder.layer.0.intermediate.dense",
                                            "neurons:encoder.layer.1.intermediate.dense"}


# ------------------------------------------------------------------------------------------- algorithms
def _train(model, spec, algorithm, params, x, steps=12, example_inputs=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = prunekit.Pruner(model, spec, opt, algorithm=algorithm, params=params, total_steps=steps,
                             steps_per_epoch=4, example_inputs=example_inputs)
    for i in range(steps):
        out = model(**x) if isinstance(x, dict) else model(x)
        out = out.last_hidden_state if hasattr(out, "last_hidden_state") else out
        loss = pruner.loss(out.pow(2).mean(), x, out)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
        if (i + 1) % 4 == 0:
            pruner.epoch_end()
    return pruner.finalize(opt)


def _whole_units_zero(model, groups, kinds, frac):
    sd = dict(model.named_parameters())
    for g in groups:
        if g.kind not in kinds or not g.removable:
            continue
        names = [t for t in g.tensors if t in sd and sd[t].dim() >= 2]
        alive = g.partition({n: sd[n].detach() for n in names}, only=names).abs().sum(1) > 0
        assert int((~alive).sum()) == round(frac * g.count), g.name   # whole units zero, at the target


@pytest.mark.parametrize("algorithm,params", [("gradual", {"end": 0.5, "frequency": 2}),
                                              ("admm", {"rho": 0.05, "update_every": 3}),
                                              ("group_lasso", {"lam": 1e-3, "reweight_every": 4})])
def test_algorithms_with_heads_neurons_on_bert(algorithm, params):
    m = tiny_bert().train()
    spec = {"structure": "heads+neurons", "sparsity": 0.5}
    masks = _train(m, spec, algorithm, params, IDS, example_inputs=IDS)
    groups = coupled_groups(m.eval(), IDS)
    assert {masks.structures[n] for n in masks} == {"heads", "neurons"}
    _whole_units_zero(m, groups, ("heads", "neurons"), 0.5)


@pytest.mark.parametrize("algorithm,params", [("gradual", {"end": 0.5, "frequency": 2}),
                                              ("admm", {"rho": 0.05, "update_every": 3})])
def test_algorithms_with_channels_on_cnn(algorithm, params):
    torch.manual_seed(0)
    m = ResCNN()
    groups = coupled_groups(m.eval(), X)
    m.train()
    masks = _train(m, PruneSpec("channels", 0.5, groups=groups), algorithm, params, X)
    _whole_units_zero(m, groups, ("channels",), 0.5)
    res = prunekit.compact(m.eval(), masks, X)
    assert res.removed == {"channels:stem": 4, "channels:conv1": 6}


def test_prune_api_and_compact_bert():
    m = tiny_bert()
    masks = prunekit.prune(m, "heads+neurons", 0.5, example_inputs=IDS)
    ref = copy.deepcopy(m)
    res = prunekit.compact(m, masks, IDS)
    assert m.encoder.layer[0].attention.self.num_attention_heads == 2
    assert m.encoder.layer[1].intermediate.dense.out_features == 20
    with torch.no_grad():
        torch.testing.assert_close(m(**IDS).last_hidden_state, ref(**IDS).last_hidden_state, atol=1e-5, rtol=1e-4)
    assert res.params_after < res.params_before
    with pytest.raises(ValueError, match="example_inputs"):
        prunekit.prune(tiny_bert(), "heads", 0.5)


# ------------------------------------------------------------------------------------------- end to end
def _cli(*args):
    from prunekit.cli.main import main
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        mp.setenv("PRUNEKIT_NO_PROGRESS", "1")
        rc = main(list(args))
    return rc, buf.getvalue()


def test_run_channels_lenet_then_compact(tmp_path):
    from prunekit.cli.compact import load_run
    from prunekit.deploy.compact import load_compacted
    from prunekit.models.registry import get_model
    run, out = tmp_path / "run", tmp_path / "c"
    rc, _ = _cli("run", "recipes/lenet5_oneshot.yaml", "--set", "data.limit=200", "--set", "train.epochs=0.1",
                 "--set", "dense.epochs=0.1", "--set", "retrain.epochs=0.1", "--set", "prune.structure=channels",
                 "--set", "prune.sparsity=0.5", "--out", str(run))
    assert rc == 0
    res = json.loads((run / "results.json").read_text())
    assert res["structure"] == "channels" and res["group_kinds"] == ["channels"]
    assert {g["name"]: g["status"] for g in res["groups"]} == {"channels:conv1": "pruned", "channels:conv2": "pruned"}
    assert {l["structure"] for l in res["layers"] if l["name"] in ("conv1.weight", "conv2.weight")} == {"channels"}
    assert res["macs"]["compacted"] < res["macs"]["dense"]
    rc, stdout = _cli("compact", str(run), "--out", str(out))
    assert rc == 0 and "graph-driven, verified" in stdout and "| channels:conv2 | channels | 50 | 25 | 25 |" in stdout
    masked, _, _, _ = load_run(run)
    model = load_compacted(out, lambda: get_model("lenet5")).eval()
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked(x), atol=1e-5, rtol=1e-4)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in masked.parameters())
    # a failed verification: the error names the group, exit 2, nothing written
    out2 = tmp_path / "c2"
    with pytest.MonkeyPatch.context() as mp:
        from prunekit.deploy import surgery
        mp.setattr(surgery, "_select", lambda t, dim, idx: t.detach().index_select(dim, idx.flip(0)).contiguous())
        rc, stdout = _cli("compact", str(run), "--out", str(out2))
    assert rc == 2 and "offending group(s): channels:conv" in stdout and "nothing was written" in stdout
    assert not out2.exists()
