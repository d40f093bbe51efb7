"""Honest data: ``data.limit`` / ``data.eval_limit`` keep one seeded, class-stratified sample in every reader
(image folders, MNIST, CIFAR-10, GLUE, tables, data factories), and table labels never silently make classes
(empty / null labels are errors naming file and line, ``1`` and ``1.0`` are one class, too many classes warn)."""
from __future__ import annotations

import collections
import json
import math
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prunekit.core.errors import DataError
from prunekit.data.imagefolder import load_imagefolder
from prunekit.data.registry import get_dataset
from prunekit.data.sample import class_quotas, sample_indices
from prunekit.data.table import load_table, load_table_splits
from prunekit.pipelines.recipe import parse_recipe
from prunekit.pipelines.user_workloads import _text_splits
from prunekit.pipelines.workloads import build_workload

os.environ.setdefault("PRUNEKIT_NO_PROGRESS", "1")

# 10 classes of unequal size (40, 44, ..., 76 images: 580 in all), as digit folders
SIZES = [40 + 4 * c for c in range(10)]


def _quota_ok(counts: dict[int, int], sizes: list[int], limit: int) -> None:
    """Every class within 1 of its exact stratified share ``limit * n_c / N`` (and the total exact)."""
    total = sum(sizes)
    assert sum(counts.values()) == limit
    for c, n in enumerate(sizes):
        exact = limit * n / total
        assert math.floor(exact) <= counts.get(c, 0) <= math.ceil(exact), (c, counts.get(c, 0), exact)


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory) -> Path:
    """train/<digit>/*.png with SIZES[d] images each; val/<digit>/ with SIZES[d] // 4 (10..19)."""
    root = tmp_path_factory.mktemp("digits")
    for split, div in (("train", 1), ("val", 4)):
        for d, n in enumerate(SIZES):
            folder = root / split / str(d)
            folder.mkdir(parents=True)
            for i in range(n // div):
                Image.new("L", (4, 4), 25 * d).save(folder / f"{i:03d}.png")
    return root


def test_sample_indices_hand_checked_quotas_and_determinism():
    labels = [0] * 5 + [1] * 4 + [2]                  # limit 3: exact shares 1.5, 1.2, 0.3
    idx = sample_indices(labels, 3, seed=0)
    assert idx == sorted(idx) and collections.Counter(labels[i] for i in idx) == {0: 2, 1: 1}
    assert class_quotas([5, 4, 1], 3, __import__("random").Random(0)) == [2, 1, 0]
    assert sample_indices(labels, 3, seed=0) == idx                         # same seed, same sample
    assert {tuple(sample_indices(labels, 3, seed=s)) for s in range(20)} != {tuple(idx)}   # the seed draws
    assert sample_indices(labels, 10, seed=0) == list(range(10)) == sample_indices(labels, None)
    reg = sample_indices(None, 4, seed=3, size=10)                          # regression: uniform, sorted
    assert len(reg) == 4 == len(set(reg)) and reg == sorted(reg) and reg == sample_indices(None, 4, 3, size=10)
    with pytest.raises(DataError, match="limit must be a non-negative int"):
        sample_indices(labels, -1)


def test_imagefolder_limit_keeps_every_class_in_proportion(digit_folder):
    """Limit 300 of 580 images sorted by class: the first 300 files would be classes 0-5 only."""
    ds = load_imagefolder(digit_folder, "train", limit=300, grayscale=True, seed=0)
    counts = collections.Counter(ds.labels.tolist())
    assert len(counts) == 10
    _quota_ok(counts, SIZES, 300)
    again = load_imagefolder(digit_folder, "train", limit=300, grayscale=True, seed=0)
    assert again.files == ds.files and torch.equal(again.images, ds.images)          # same seed, same files
    other = load_imagefolder(digit_folder, "train", limit=300, grayscale=True, seed=1)
    assert other.files != ds.files and collections.Counter(other.labels.tolist()) == counts
    # the pixels are the files' own: class d is grey level 25*d
    assert torch.allclose(ds.images[:, 0, 0, 0], ds.labels.float() * 25 / 255)


def test_imagefolder_workload_eval_limit_uses_the_same_rule(digit_folder):
    recipe = parse_recipe({"model": {"name": "lenet5", "args": {"in_channels": 1}}, "seed": 4,
                           "data": {"name": "imagefolder", "root": str(digit_folder), "grayscale": True,
                                    "image_size": 28, "limit": 100, "eval_limit": 50}})
    wl = build_workload(recipe)
    train_counts = collections.Counter(wl.train_loader.dataset.labels.tolist())
    eval_counts = collections.Counter(wl.eval_loader.dataset.labels.tolist())
    _quota_ok(train_counts, SIZES, 100)
    _quota_ok(eval_counts, [n // 4 for n in SIZES], 50)
    assert len(eval_counts) == 10 and wl.info["eval_examples"] == 50


def test_mnist_cifar_glue_limits_are_stratified():
    mnist_train = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    ds = get_dataset("mnist", split="train", limit=300, seed=2)
    _quota_ok(collections.Counter(ds.labels.tolist()), mnist_train, 300)
    assert torch.equal(get_dataset("mnist", split="train", limit=300, seed=2).images, ds.images)
    sst = get_dataset("sst2", split="dev", limit=100, seed=0)                      # 428 negative, 444 positive
    assert collections.Counter(sst.labels) == {0: 49, 1: 51}
    assert get_dataset("stsb", split="dev", limit=7, seed=0).examples == \
        get_dataset("stsb", split="dev", limit=7, seed=0).examples             # regression: seeded uniform


def _cifar_records(labels) -> bytes:
    recs = np.zeros((len(labels), 3073), np.uint8)
    recs[:, 0] = labels
    recs[:, 1] = np.arange(len(labels))               # first pixel = the record's index
    return recs.tobytes()


def test_cifar_limit_stratified_on_class_sorted_batches(tmp_path):
    """Batches sorted by class (0,0,...,9,9): a prefix of 20 would hold classes 0 and 1 only."""
    folder = tmp_path / "cifar10"
    folder.mkdir()
    labels = np.repeat(np.arange(10), 10)
    for i in range(1, 6):
        (folder / f"data_batch_{i}.bin").write_bytes(_cifar_records(labels))
    (folder / "test_batch.bin").write_bytes(_cifar_records(labels))
    ds = get_dataset("cifar10", tmp_path, "test", limit=20, seed=0)
    assert collections.Counter(ds.labels.tolist()) == {c: 2 for c in range(10)}
    tr = get_dataset("cifar10", tmp_path, "train", limit=50, seed=0)
    assert collections.Counter(tr.labels.tolist()) == {c: 5 for c in range(10)}


# --------------------------------------------------------------------------------------------- tables
def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def test_table_empty_and_null_labels_name_file_and_line(tmp_path):
    csv_path = _write(tmp_path / "t.csv", """
        text,label
        good,1
        bad,
        fine,0
        """)
    with pytest.raises(DataError, match=rf"{csv_path}:3: empty label in column 'label'"):
        load_table(csv_path, ["text"])
    jl = tmp_path / "t.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in [{"text": "a", "label": 0}, {"text": "b", "label": 1},
                                                      {"text": "c", "label": None}]) + "\n")
    with pytest.raises(DataError, match=rf"{jl}:3: null label in column 'label'"):
        load_table(jl, ["text"])
    with pytest.raises(DataError, match=rf"{jl}:3: null label"):                     # regression too
        load_table(jl, ["text"], task_type="regression")


def test_table_integral_float_labels_are_the_integer_class(tmp_path):
    train = _write(tmp_path / "train.csv", """
        text,label
        a,1
        b,1.0
        c,0
        d,0.0
        e,1
        f,0
        """)
    ev = _write(tmp_path / "eval.csv", """
        text,label
        x,1.00
        y,0
        """)
    tr, evd = load_table_splits(train, ev, ["text"])
    assert tr.num_labels == 2 and tr.label_names == ("0", "1")
    assert tr.labels == [1, 1, 0, 0, 1, 0] and evd.labels == [1, 0]
    jl = tmp_path / "t.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in
                            [("a", 1), ("b", 1.0), ("c", "1"), ("d", 0), ("e", "0.0"), ("f", 0)]) + "\n")
    assert load_table(jl, ["text"]).num_labels == 2


def test_table_with_more_classes_than_half_its_rows_warns(tmp_path):
    scores = _write(tmp_path / "scores.csv", "text,label\n" + "".join(f"s{i},{i * 0.37:.2f}\n" for i in range(8)))
    with pytest.warns(UserWarning, match=r"8 classes in 8 rows .*regression\?"):
        assert load_table(scores, ["text"]).num_labels == 8
    fine = _write(tmp_path / "fine.csv", "text,label\n" + "".join(f"s{i},{i % 4}\n" for i in range(8)))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_table(fine, ["text"]).num_labels == 4                       # 4 of 8: no warning


def test_table_workload_train_and_eval_limits_are_stratified(tmp_path):
    """Files sorted by label: the head of eval.csv would be one class."""
    rows = [f"text {i} {c},{c}\n" for c in ("neg", "pos") for i in range(30)]
    _write(tmp_path / "train.csv", "text,label\n" + "".join(rows))
    _write(tmp_path / "eval.csv", "text,label\n" + "".join(rows[::2]))
    recipe = parse_recipe({"model": {"name": "bert-base-config"}, "seed": 0,
                           "data": {"name": "table", "root": str(tmp_path), "train": "train.csv", "eval": "eval.csv",
                                    "text_columns": ["text"], "limit": 10, "eval_limit": 6}})
    train, ev = _text_splits(recipe)              # the table workload's splits (before tokenising)
    assert collections.Counter(train.labels) == {0: 5, 1: 5} and collections.Counter(ev.labels) == {0: 3, 1: 3}
    again, _ = _text_splits(recipe)
    assert again.examples == train.examples


# --------------------------------------------------------------------------------------------- factories
FACTORY = textwrap.dedent("""
    import torch

    def data(n=40):
        ys = sorted(i % 4 for i in range(n))                # sorted by class: a prefix is one class
        pairs = [(torch.full((1, 28, 28), float(y)), y) for y in ys]
        return pairs, pairs[: n // 2] + pairs[n // 2:]
""")


def test_factory_limits_are_stratified(tmp_path, monkeypatch):
    name = f"facmod_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        recipe = parse_recipe({"model": {"name": "lenet5"}, "seed": 0,
                               "data": {"factory": f"{name}:data", "limit": 8, "eval_limit": 12}})
        wl = build_workload(recipe)
    finally:
        sys.modules.pop(name, None)
    assert collections.Counter(int(y) for _, y in wl.train_loader.dataset) == {0: 2, 1: 2, 2: 2, 3: 2}
    assert collections.Counter(int(y) for _, y in wl.eval_loader.dataset) == {0: 3, 1: 3, 2: 3, 3: 3}
    assert all(float(x[0, 0, 0]) == y for x, y in wl.train_loader.dataset)          # inputs stay paired
