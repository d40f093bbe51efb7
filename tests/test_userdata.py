"""The user's own models and data sets: imagefolder / table / hf_disk / factory readers, import-path
models, ``model.checkpoint`` (strict), percent metrics, and ``run_pipeline`` end to end on tiny files."""
from __future__ import annotations

import math
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from prunekit.core.errors import CheckpointError, DataError, RecipeError
from prunekit.data.factory import load_factory
from prunekit.data.imagefolder import load_imagefolder
from prunekit.data.table import load_hf_disk, load_table, load_table_splits
from prunekit.data.task_metrics import task_metrics
from prunekit.io.checkpoint import load_checkpoint, save_checkpoint
from prunekit.models.user import ModelImportError, build_model, build_user_model, load_weights
from prunekit.pipelines.recipe import parse_recipe
from prunekit.pipelines.runner import run_pipeline
from prunekit.pipelines.user_workloads import UserTask
from prunekit.pipelines.workloads import build_workload

os.environ.setdefault("PRUNEKIT_NO_PROGRESS", "1")

# --------------------------------------------------------------------------------------------- fixtures
CNN_MODULE = textwrap.dedent("""
    import torch
    from torch import nn

    class TinyCNN(nn.Module):
        def __init__(self, num_classes=2, width=8, in_channels=3):
            super().__init__()
            self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
            self.fc = nn.Linear(width * 4 * 4, num_classes)

        def forward(self, x):
            x = torch.relu(self.conv(x))
            x = nn.functional.adaptive_avg_pool2d(x, 4)
            return self.fc(x.flatten(1))

    def make(num_classes=2, width=8, in_channels=3):
        return TinyCNN(num_classes, width, in_channels)

    def not_a_model():
        return 42

    def data(n=12, size=8):
        g = torch.Generator().manual_seed(0)
        xs = torch.randn(2 * n, 3, size, size, generator=g)
        ys = [i % 3 for i in range(2 * n)]
        pairs = [(xs[i], ys[i]) for i in range(2 * n)]
        return {"train": pairs[:n], "eval": pairs[n:]}

    def bad_pairs():
        return [(torch.zeros(3), 0, 1)], [(torch.zeros(3), 0)]
""")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module ``usermods_<id>`` with the CNN factory and data factories, importable from tmp_path."""
    name = f"usermods_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(CNN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def _png(path: Path, color: tuple[int, int, int], size=(8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def make_imagefolder(root: Path, n_train: int = 3, n_val: int = 2, size=(8, 8)) -> Path:
    """Class ``cat`` = dark red images, ``dog`` = bright blue images (learnable in one epoch)."""
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            _png(root / split / "dog" / f"{i}.png", (0, 10 * i, 250), size)
            _png(root / split / "cat" / f"{i}.jpg" if i % 2 else root / split / "cat" / f"{i}.png", (200, 0, 5 * i), size)
    return root


def write_csv(path: Path, rows: list[list], header: list[str]) -> Path:
    import csv
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


# --------------------------------------------------------------------------------------------- imagefolder
def test_imagefolder_reads_exact_tensors_and_sorted_classes(tmp_path):
    root = tmp_path / "imgs"
    _png(root / "train" / "b" / "x.png", (255, 0, 51))
    _png(root / "train" / "a" / "y.png", (0, 102, 255))
    _png(root / "val" / "b" / "z.png", (10, 20, 30))
    tr = load_imagefolder(root, "train")
    assert tr.classes == ("a", "b")
    assert tr.labels.tolist() == [0, 1]
    assert tr.images.shape == (2, 3, 8, 8)
    assert torch.allclose(tr.images[0, :, 0, 0], torch.tensor([0.0, 0.4, 1.0]))
    assert torch.allclose(tr.images[1, :, 3, 5], torch.tensor([1.0, 0.0, 0.2]))
    va = load_imagefolder(root, "val")
    assert va.labels.tolist() == [1] and va.classes == ("a", "b")
    assert torch.allclose(va.images[0, :, 0, 0], torch.tensor([10, 20, 30]) / 255.0)


def test_imagefolder_resize_normalise_grayscale(tmp_path):
    root = tmp_path / "imgs"
    _png(root / "train" / "a" / "p.png", (255, 255, 255), size=(10, 6))
    _png(root / "train" / "b" / "q.png", (0, 0, 0), size=(4, 4))
    _png(root / "val" / "a" / "r.png", (255, 255, 255), size=(4, 4))
    tr = load_imagefolder(root, "train", image_size=[5, 7], mean=[0.5, 0.25, 0.0], std=[0.5, 0.25, 2.0])
    assert tr.images.shape == (2, 3, 5, 7)
    assert torch.allclose(tr.images[0], torch.tensor([1.0, 3.0, 0.5])[:, None, None].expand(3, 5, 7))
    assert torch.allclose(tr.images[1], torch.tensor([-1.0, -1.0, 0.0])[:, None, None].expand(3, 5, 7))
    g = load_imagefolder(root, "train", image_size=4, grayscale=True, mean=[0.5], std=[0.5])
    assert g.images.shape == (2, 1, 4, 4)
    assert g.images[0].eq(1.0).all() and g.images[1].eq(-1.0).all()
    with pytest.raises(DataError, match=r"q\.png: image is 4x4 but .*p\.png is 10x6; set data.image_size"):
        load_imagefolder(root, "train")


def test_imagefolder_errors_name_the_file_or_class(tmp_path):
    root = make_imagefolder(tmp_path / "imgs")
    _png(root / "val" / "bird" / "0.png", (1, 2, 3))
    with pytest.raises(DataError, match=r"class 'bird' is not a class of the train folder .*\['cat', 'dog'\]"):
        load_imagefolder(root, "val")
    root2 = make_imagefolder(tmp_path / "imgs2")
    bad = root2 / "train" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError, match=r"broken\.png: unreadable or corrupt image"):
        load_imagefolder(root2, "train")
    truncated = root2 / "val" / "cat" / "cut.png"
    data = (root2 / "val" / "dog" / "0.png").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.png: unreadable or corrupt image"):
        load_imagefolder(root2, "val")
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no images"):
        load_imagefolder(empty, "train")
    with pytest.raises(DataError, match=r"no eval folder"):
        load_imagefolder(make_imagefolder(tmp_path / "noval", n_val=0), "val")


# --------------------------------------------------------------------------------------------- tables
def test_table_csv_label_mapping_from_train(tmp_path):
    tr = write_csv(tmp_path / "train.csv", [["good, really", "pos"], ["bad", "neg"], ["meh", "neutral"],
                                            ["fine", "pos"]], ["sentence", "label"])
    ev = write_csv(tmp_path / "eval.csv", [["great", "pos"], ["awful", "neg"]], ["sentence", "label"])
    a, b = load_table_splits(tr, ev, ["sentence"])
    assert a.label_names == ("neg", "neutral", "pos") and a.num_labels == 3
    assert a.labels == [2, 0, 1, 2] and b.labels == [2, 0]
    assert a.examples[0].text_a == "good, really" and a.examples[0].text_b is None


def test_table_int_labels_sorted_numerically_and_pairs(tmp_path):
    rows = [[f"a{i}", f"b{i}", str(lab)] for i, lab in enumerate([10, 2, 0, 2, 10])]
    tr = write_csv(tmp_path / "train.csv", rows, ["s1", "s2", "y"])
    t = load_table(tr, ["s1", "s2"], "y")
    assert t.label_names == ("0", "2", "10") and t.labels == [2, 1, 0, 1, 2]
    assert (t.examples[3].text_a, t.examples[3].text_b) == ("a3", "b3")


def test_table_tsv_and_jsonl_regression(tmp_path):
    tsv = tmp_path / "train.tsv"
    tsv.write_text('text\tscore\nsays "hi\t1.5\nother\t-2\n', encoding="utf-8")
    t = load_table(tsv, ["text"], "score", task_type="regression")
    assert t.labels == [1.5, -2.0] and t.examples[0].text_a == 'says "hi' and t.num_labels == 1
    jl = tmp_path / "train.jsonl"
    jl.write_text('{"q": "x", "a": "y", "t": 3}\n\n{"q": "z", "a": "w", "t": 0.25}\n', encoding="utf-8")
    j = load_table(jl, ["q", "a"], "t", task_type="regression")
    assert j.labels == [3.0, 0.25] and j.examples[1].text_b == "w"
    jc = tmp_path / "c.jsonl"
    jc.write_text('{"s": "x", "label": 1}\n{"s": "y", "label": "1"}\n{"s": "z", "label": 0}\n', encoding="utf-8")
    c = load_table(jc, ["s"])
    assert c.labels == [1, 1, 0] and c.label_names == ("0", "1")


def test_table_errors(tmp_path):
    head_only = tmp_path / "h.csv"
    head_only.write_text("sentence,label\n")
    with pytest.raises(DataError, match=r"h\.csv: empty split"):
        load_table(head_only, ["sentence"])
    tr = write_csv(tmp_path / "train.csv", [["a", "x"], ["b", "y"]], ["sentence", "label"])
    with pytest.raises(DataError, match=r"train\.csv: no column 'text'; available columns: \['sentence', 'label'\]"):
        load_table(tr, ["text"])
    with pytest.raises(DataError, match=r"no column 'gold'"):
        load_table(tr, ["sentence"], "gold")
    ev = write_csv(tmp_path / "eval.csv", [["c", "x"], ["d", "z"]], ["sentence", "label"])
    with pytest.raises(DataError, match=r"eval\.csv:3: label 'z' does not occur in the train split"):
        load_table_splits(tr, ev, ["sentence"])
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"s": "a", "label": 0}\n{"s": "b", "label": 1\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON line"):
        load_table(jl, ["s"])
    jm = tmp_path / "m.jsonl"
    jm.write_text('{"s": "a", "label": 0}\n{"label": 1}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"m\.jsonl:2: row has no column 's'"):
        load_table(jm, ["s"])
    reg = write_csv(tmp_path / "r.csv", [["a", "1.0"], ["b", "high"]], ["s", "v"])
    with pytest.raises(DataError, match=r"r\.csv:3: regression label 'v' = 'high' is not a number"):
        load_table(reg, ["s"], "v", task_type="regression")
    with pytest.raises(DataError, match=r"nope\.csv: data file not found"):
        load_table(tmp_path / "nope.csv", ["s"])
    (tmp_path / "train.txt").write_text("s,label\na,0\n")
    with pytest.raises(DataError, match=r"train\.txt: cannot tell the format from the extension '\.txt'"):
        load_table(tmp_path / "train.txt", ["s"])
    assert load_table(tmp_path / "train.txt", ["s"], fmt="csv").labels == [0]


def test_hf_disk_classlabel_and_missing_package_message(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"text": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["neg", "pos", "mixed"])})
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [1, 0, 1]}, features=feats),
        "validation": datasets.Dataset.from_dict({"text": ["d"], "label": [2]}, features=feats)})
    dd.save_to_disk(str(tmp_path / "ds"))
    tr, ev = load_hf_disk(tmp_path / "ds", ["text"])
    assert tr.label_names == ("neg", "pos", "mixed") and tr.labels == [1, 0, 1] and ev.labels == [2]
    with pytest.raises(DataError, match=r"no column 'sentence'; available columns: \['text', 'label'\]"):
        load_hf_disk(tmp_path / "ds", ["sentence"])
    with pytest.raises(DataError, match=r"no split 'dev'"):
        load_hf_disk(tmp_path / "ds", ["text"], eval_split="dev")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"needs the optional package 'datasets': pip install datasets"):
        load_hf_disk(tmp_path / "ds", ["text"])


# --------------------------------------------------------------------------------------------- factory data
def test_data_factory_dict_and_errors(user_module):
    fd = load_factory(f"{user_module}:data", {"n": 6, "size": 4})
    assert fd.num_classes == 3 and len(fd.train) == 6 and len(fd.eval) == 6
    with pytest.raises(DataError, match=r"bad_pairs train\[0\]: expected an \(input, label\) pair, got tuple of length 3"):
        load_factory(f"{user_module}:bad_pairs")
    with pytest.raises(DataError, match=r"cannot import data factory 'no_such_mod_xyz:data': module 'no_such_mod_xyz' not found"):
        load_factory("no_such_mod_xyz:data")


# --------------------------------------------------------------------------------------------- models
def test_import_path_model_and_errors(user_module, tmp_path):
    m = build_user_model(f"{user_module}:make", {"num_classes": 5, "width": 4})
    assert m.fc.out_features == 5 and m.conv.out_channels == 4
    assert build_model(f"{user_module}:TinyCNN", {"num_classes": 3}).fc.out_features == 3
    with pytest.raises(ModelImportError, match=r"'no_such_pkg_q:make'.*module 'no_such_pkg_q' not found"):
        build_user_model("no_such_pkg_q:make")
    with pytest.raises(ModelImportError, match=rf"module '{user_module}' has no attribute 'nothing'"):
        build_user_model(f"{user_module}:nothing")
    with pytest.raises(ModelImportError, match=r"returned a int, not a torch.nn.Module"):
        build_user_model(f"{user_module}:not_a_model")
    with pytest.raises(ModelImportError, match=r"rejected model.args \['depth'\]"):
        build_user_model(f"{user_module}:make", {"depth": 3})
    (tmp_path / "boom_mod_z.py").write_text("raise RuntimeError('no GPU here')\n")
    with pytest.raises(ModelImportError, match=r"importing 'boom_mod_z' raised RuntimeError: no GPU here"):
        build_user_model("boom_mod_z:make")


def test_checkpoint_safetensors_and_run_folder_strict(user_module, tmp_path):
    src = build_user_model(f"{user_module}:make", {"num_classes": 2})
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    dst = build_user_model(f"{user_module}:make", {"num_classes": 2})
    assert "safetensors file" in load_weights(dst, tmp_path / "w.safetensors")
    assert torch.equal(dst.fc.weight, src.fc.weight) and torch.equal(dst.conv.bias, src.conv.bias)
    save_checkpoint(tmp_path / "run", src)
    dst2 = build_user_model(f"{user_module}:make", {"num_classes": 2})
    assert "prunekit checkpoint" in load_weights(dst2, tmp_path / "run")
    assert torch.equal(dst2.conv.weight, src.conv.weight)
    wide = build_user_model(f"{user_module}:make", {"num_classes": 3})
    with pytest.raises(CheckpointError, match=r"tensor 'fc.weight' has shape \(2, 128\) in the checkpoint but \(3, 128\)"):
        load_weights(wide, tmp_path / "w.safetensors")
    partial = {k: v for k, v in src.state_dict().items() if k != "conv.bias"}
    save_file(partial, str(tmp_path / "p.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing \['conv.bias'\]"):
        load_weights(dst, tmp_path / "p.safetensors")
    with pytest.raises(CheckpointError, match=r"gone\.safetensors does not exist"):
        load_weights(dst, tmp_path / "gone.safetensors")
    (tmp_path / "plain").mkdir()
    with pytest.raises(CheckpointError, match=r"not a prunekit run folder \(no manifest.json\)"):
        load_weights(dst, tmp_path / "plain")


# --------------------------------------------------------------------------------------------- metrics
def test_metrics_are_percentages():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])   # predictions 0 1 0 1
    m = task_metrics("classification", logits, torch.tensor([0, 1, 1, 1]), num_classes=2)
    assert m["accuracy"] == pytest.approx(75.0)
    assert m["f1"] == pytest.approx(100.0 * 2 * 2 / (2 * 2 + 0 + 1))
    assert m["matthews_correlation"] == pytest.approx(100.0 / math.sqrt(3))
    m3 = task_metrics("classification", torch.eye(3), torch.tensor([0, 1, 1]), num_classes=3)
    assert m3["accuracy"] == pytest.approx(200 / 3) and "f1" not in m3
    r = task_metrics("regression", torch.tensor([[1.0], [2.0], [4.0]]), torch.tensor([1.0, 3.0, 2.0]))
    assert r["spearmanr"] == pytest.approx(50.0)
    assert r["pearson"] == pytest.approx(100 * np.corrcoef([1, 2, 4], [1, 3, 2])[0, 1])
    assert r["combined"] == pytest.approx((r["pearson"] + r["spearmanr"]) / 2)
    task = UserTask("regression")
    loader = [{"input_ids": torch.zeros(3, 2), "labels": torch.tensor([1.0, 3.0, 2.0])}]

    class Fixed(torch.nn.Module):
        def forward(self, input_ids):
            return torch.tensor([[1.0], [2.0], [4.0]])

    ev = task.evaluate(Fixed(), loader)
    assert task.metric == "combined" and ev["combined"] == pytest.approx(r["combined"])
    assert ev["loss"] == pytest.approx((0 + 1 + 4) / 3) and ev["examples"] == 3
    cls = UserTask("classification", 2)

    class Lookup(torch.nn.Module):
        def forward(self, idx):
            return logits[idx]

    ev2 = cls.evaluate(Lookup(), [(torch.tensor([0, 1]), torch.tensor([0, 0])),
                                           (torch.tensor([2, 3]), torch.tensor([0, 1]))])
    assert ev2["accuracy"] == pytest.approx(75.0) and ev2["f1"] == pytest.approx(200 / 3) and ev2["examples"] == 4


# --------------------------------------------------------------------------------------------- recipes
def _recipe(**kw) -> dict:
    r = {"name": "u", "seed": 0, "prune": {"structure": "unstructured", "sparsity": 0.5},
         "algorithm": {"name": "oneshot"},
         "train": {"optimizer": "adam", "lr": 0.01, "epochs": 1, "scheduler": "none"}}
    r.update(kw)
    return r


def test_recipe_validation_of_new_keys(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown recipe key data.text_column;"):
        parse_recipe(_recipe(model={"name": "m:f"}, data={"name": "table", "text_column": "s"}))
    with pytest.raises(RecipeError, match=r"unknown recipe key model.remote_code"):
        parse_recipe(_recipe(model={"name": "m:f", "remote_code": True}))
    with pytest.raises(RecipeError, match=r"data.train and data.eval"):
        parse_recipe(_recipe(model={"name": "minilm-l6"}, data={"name": "table", "text_columns": ["s"]}))
    with pytest.raises(RecipeError, match=r"text_columns: table needs one text column or a pair"):
        parse_recipe(_recipe(model={"name": "minilm-l6"}, data={"name": "table", "train": "a.csv", "eval": "b.csv"}))
    with pytest.raises(RecipeError, match=r"needs a Hugging Face model"):
        parse_recipe(_recipe(model={"name": "pkg.mod:make"},
                             data={"name": "table", "train": "a", "eval": "b", "text_columns": ["s"]}))
    with pytest.raises(RecipeError, match=r"data.root: imagefolder needs data.root"):
        parse_recipe(_recipe(model={"name": "pkg.mod:make"}, data={"name": "imagefolder"}))
    with pytest.raises(RecipeError, match=r"data.image_size is an imagefolder option"):
        parse_recipe(_recipe(model={"name": "minilm-l6"}, data={"name": "table", "train": "a", "eval": "b",
                                                               "text_columns": ["s"], "image_size": 8}))
    with pytest.raises(RecipeError, match=r"task_type: 'ranking' is not one of"):
        parse_recipe(_recipe(data={"name": "table", "task_type": "ranking"}))
    with pytest.raises(RecipeError, match=r"model.name: unknown model 'resnet99'.*or an import path"):
        parse_recipe(_recipe(model={"name": "resnet99"}))
    r = parse_recipe(_recipe(model={"name": "pkg.mod:make", "args": {"width": 4}, "trust_remote_code": False},
                             data={"factory": "pkg.data:build", "factory_args": {"n": 3}}))
    assert r.data.factory == "pkg.data:build" and r.model.args == {"width": 4}
    assert parse_recipe(_recipe(model={"name": "lenet5"})).model.trust_remote_code is False


def test_run_pipeline_imagefolder_user_cnn(user_module, tmp_path):
    torch.set_num_threads(1)
    root = make_imagefolder(tmp_path / "imgs", n_train=8, n_val=4)
    recipe_data = {"name": "imagefolder", "root": str(root), "image_size": 8, "mean": [0.5, 0.5, 0.5],
                   "std": [0.5, 0.5, 0.5], "batch_size": 4}
    recipe = parse_recipe(_recipe(
        model={"name": f"{user_module}:make", "args": {"num_classes": 2, "width": 8}}, data=recipe_data,
        prune={"structure": "unstructured", "sparsity": 0.6}, retrain={"epochs": 1}))
    res = run_pipeline(recipe, tmp_path / "out", log=lambda *_: None)
    assert res["workload"]["classes"] == ["cat", "dog"] and res["workload"]["train_examples"] == 16
    assert res["metric"] == "accuracy" and 0.0 <= res["score"] <= 100.0
    assert res["metrics"]["final"]["examples"] == 8
    assert res["score"] == 100.0                     # colour classes are separable after a few steps
    model = build_user_model(f"{user_module}:make", {"num_classes": 2, "width": 8})
    _, masks, _ = load_checkpoint(tmp_path / "out", model)
    for name in ("conv.weight", "fc.weight"):
        w = dict(model.named_parameters())[name]
        assert float((~masks[name]).float().mean()) == pytest.approx(0.6, abs=0.01)
        assert torch.all(w[~masks[name]] == 0)          # pruned weights are exactly zero after retraining
    assert res["sparsity"] == pytest.approx(0.6, abs=0.01)
    # the written run folder is a valid model.checkpoint for a later recipe (strict load)
    again = parse_recipe(_recipe(model={"name": f"{user_module}:make", "args": {"num_classes": 2, "width": 8},
                                        "checkpoint": str(tmp_path / "out")},
                                 data=recipe_data, dense={"epochs": 0}, retrain={"epochs": 0}))
    r2 = run_pipeline(again, tmp_path / "out2", log=lambda *_: None)
    assert r2["metrics"]["dense"]["loss"] == pytest.approx(res["metrics"]["final"]["loss"], rel=1e-6)
    bad = parse_recipe(_recipe(model={"name": f"{user_module}:make", "args": {"num_classes": 2, "width": 4},
                                      "checkpoint": str(tmp_path / "out")},
                               data={"name": "imagefolder", "root": str(root), "image_size": 8}))
    with pytest.raises(CheckpointError, match=r"tensor 'conv.weight' has shape \(8, 3, 3, 3\) in the checkpoint"):
        run_pipeline(bad, tmp_path / "out3", log=lambda *_: None)


def test_run_pipeline_csv_table_tiny_bert(tmp_path):
    pytest.importorskip("transformers")
    torch.set_num_threads(1)
    pos = ["a wonderful film", "great acting", "i loved it", "superb and moving", "a delight", "very good fun"]
    neg = ["a dreadful film", "awful acting", "i hated it", "boring and dull", "a mess", "very bad fun"]
    rows = [[t, "pos"] for t in pos] + [[t, "neg"] for t in neg]
    write_csv(tmp_path / "train.csv", rows, ["review", "sentiment"])
    write_csv(tmp_path / "eval.csv", rows[::3], ["review", "sentiment"])
    tiny = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
            "max_position_embeddings": 64}
    recipe = parse_recipe(_recipe(
        model={"name": "bert-base-config", "args": tiny},
        data={"name": "table", "root": str(tmp_path), "train": "train.csv", "eval": "eval.csv",
              "text_columns": ["review"], "label_column": "sentiment", "batch_size": 4, "max_length": 16},
        prune={"structure": "unstructured", "sparsity": 0.5},
        train={"optimizer": "adamw", "lr": 1e-3, "epochs": 1, "scheduler": "none"}))
    res = run_pipeline(recipe, tmp_path / "out", log=lambda *_: None)
    wl = res["workload"]
    assert wl["labels"] == ["neg", "pos"] and wl["train_examples"] == 12 and wl["eval_examples"] == 4
    final = res["metrics"]["final"]
    assert set(final) >= {"accuracy", "f1", "matthews_correlation", "loss"}
    assert final["accuracy"] in (0.0, 25.0, 50.0, 75.0, 100.0)        # 4 eval examples, in percent
    assert 0.0 <= final["f1"] <= 100.0
    assert res["sparsity"] == pytest.approx(0.5, abs=1e-3)           # over the default encoder targets
    assert all(t.startswith("re:") for t in wl["targets"])


def test_run_pipeline_data_factory_with_user_cnn(user_module, tmp_path):
    torch.set_num_threads(1)
    recipe = parse_recipe(_recipe(
        model={"name": f"{user_module}:make", "args": {"num_classes": 3, "width": 4}},
        data={"factory": f"{user_module}:data", "factory_args": {"n": 12, "size": 8}, "batch_size": 6},
        prune={"structure": "unstructured", "sparsity": 0.25}, retrain={"epochs": 0}))
    res = run_pipeline(recipe, tmp_path / "out", log=lambda *_: None)
    assert res["workload"]["num_classes"] == 3 and res["workload"]["train_examples"] == 12
    final = res["metrics"]["final"]
    assert final["examples"] == 12 and "f1" not in final                 # 3 classes: no binary F1
    assert final["accuracy"] * 12 / 100 == pytest.approx(round(final["accuracy"] * 12 / 100))  # k/12 in percent
    assert res["sparsity"] == pytest.approx(0.25, abs=0.01)
    wrong = parse_recipe(_recipe(model={"name": f"{user_module}:make", "args": {"num_classes": 2}},
                                 data={"factory": f"{user_module}:data"}))
    with pytest.raises(RecipeError, match=r"gives 2 output\(s\) per example but the data set needs 3"):
        run_pipeline(wrong, tmp_path / "out2", log=lambda *_: None)


def test_hf_disk_regression_workload_tiny_bert(tmp_path):
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("transformers")
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"a": ["x y", "z", "w v"], "b": ["p", "q", "r"], "score": [0.5, 4.0, 2.5]}),
        "test": datasets.Dataset.from_dict({"a": ["u"], "b": ["t"], "score": [1.0]})})
    dd.save_to_disk(str(tmp_path / "sts"))
    tiny = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
    recipe = parse_recipe(_recipe(model={"name": "bert-base-config", "args": tiny},
                                  data={"name": "hf_disk", "root": str(tmp_path / "sts"), "text_columns": ["a", "b"],
                                        "label_column": "score", "task_type": "regression", "max_length": 16}))
    wl = build_workload(recipe)
    assert wl.task.metric == "combined" and wl.model.config.num_labels == 1
    batch = next(iter(wl.eval_loader))
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [1.0]
    assert batch["token_type_ids"].max().item() == 1                  # a sentence pair
    train_labels = sorted(float(y) for b in wl.train_loader for y in b["labels"])
    assert train_labels == [0.5, 2.5, 4.0]


def test_user_errors_are_prunekit_errors_shown_as_one_line(user_module):
    from prunekit.core.errors import PrunekitError, UnknownNameError
    with pytest.raises(UnknownNameError, match=r"unknown model 'nope'.*or an import path"):
        build_model("nope")
    with pytest.raises(DataError, match=r"rejected data.factory_args \['colour'\]"):
        load_factory(f"{user_module}:data", {"colour": 1})
    for err in (ModelImportError, DataError, CheckpointError, RecipeError):
        assert issubclass(err, PrunekitError)
