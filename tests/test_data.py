"""Data readers: exact values on the shared real data, and clear errors on malformed files.

The shared data folder is required: ``resolve_data_root()`` raises at import if it is absent, so
these tests fail loudly instead of skipping.
"""
from __future__ import annotations

import collections
import gzip
import struct

import numpy as np
import pytest
import torch

from prunekit.core.errors import UnknownNameError
from prunekit.data import DataError, ImageDataset, get_dataset, list_datasets
from prunekit.data.cifar10 import MEAN as C_MEAN
from prunekit.data.cifar10 import STD as C_STD
from prunekit.data.cifar10 import load_cifar10, random_crop_flip
from prunekit.data.glue import (
    BucketBatchSampler,
    GlueExample,
    encode_examples,
    get_task,
    load_glue,
    make_loader,
    read_glue_tsv,
)
from prunekit.data.mnist import load_mnist, read_idx
from prunekit.data.paths import resolve_data_root

ROOT = resolve_data_root()  # FileNotFoundError here = the shared data is missing: fail, do not skip


# --- MNIST ------------------------------------------------------------------------------------------

def test_mnist_first_labels_and_shapes():
    assert read_idx(ROOT / "mnist" / "train-labels-idx1-ubyte.gz", 0x801, limit=10).tolist() == \
        [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    ds = load_mnist(ROOT, "train", limit=10)      # a class-stratified sample: one image of each digit
    assert isinstance(ds, ImageDataset) and len(ds) == 10
    assert sorted(ds.labels.tolist()) == list(range(10))
    x, y = ds[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_mnist_full_train_counts_and_normalisation():
    ds = get_dataset("mnist", ROOT, split="train")
    assert ds.images.shape == (60000, 1, 28, 28)
    assert np.bincount(ds.labels.numpy()).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    # Independent decode of the first 1000 images straight from the gzip bytes: 16-byte header, uint8 pixels.
    with gzip.open(ROOT / "mnist" / "train-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read(16 + 1000 * 784)[16:], np.uint8).reshape(1000, 1, 28, 28) / 255.0
    torch.testing.assert_close(ds.images[:1000], torch.from_numpy((raw - 0.1307) / 0.3081).float())
    # On the [0, 1] scale the whole train set has the usual mean/std constants.
    var, mean = torch.var_mean(ds.images)  # of the normalised values; undo the affine map
    assert abs(mean.item() * 0.3081 + 0.1307 - 0.1307) < 1e-4
    assert abs(var.item() ** 0.5 * 0.3081 - 0.3081) < 1e-4


def test_mnist_test_split():
    ds = get_dataset("mnist", ROOT, split="test")
    assert len(ds) == 10000
    assert np.bincount(ds.labels.numpy()).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _idx(magic: int, dims, data: bytes) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + data


def _write_mnist(folder, n_img=3, n_lbl=3, img_magic=0x803, gz=True):
    """Write a small train split: pixels 0, 1, 2, … (mod 256), labels 7, 3, 1, 0, 9."""
    folder.mkdir(parents=True, exist_ok=True)
    img = _idx(img_magic, (n_img, 28, 28), np.arange(n_img * 784, dtype=np.uint8).tobytes())
    lbl = _idx(0x801, (n_lbl,), bytes([7, 3, 1, 0, 9][:n_lbl]))
    opener = gzip.open if gz else open
    suffix = ".gz" if gz else ""
    with opener(folder / f"train-images-idx3-ubyte{suffix}", "wb") as f:
        f.write(img)
    with opener(folder / f"train-labels-idx1-ubyte{suffix}", "wb") as f:
        f.write(lbl)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_synthetic_raw_and_gz(tmp_path, gz):
    _write_mnist(tmp_path / "mnist", gz=gz)
    ds = load_mnist(tmp_path, "train")
    assert ds.labels.tolist() == [7, 3, 1]
    expected = (np.arange(3 * 784, dtype=np.uint8).reshape(3, 1, 28, 28) / 255.0 - 0.1307) / 0.3081
    torch.testing.assert_close(ds.images, torch.from_numpy(expected).float())


def test_mnist_truncated_file(tmp_path):
    folder = tmp_path / "mnist"
    _write_mnist(folder)
    data = gzip.decompress((folder / "train-images-idx3-ubyte.gz").read_bytes())
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(data[:-100]))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz.*truncated"):
        load_mnist(tmp_path)


def test_mnist_wrong_magic(tmp_path):
    _write_mnist(tmp_path / "mnist", img_magic=0x801)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: wrong magic number 0x00000801, expected 0x00000803"):
        load_mnist(tmp_path)


def test_mnist_count_mismatch(tmp_path):
    _write_mnist(tmp_path / "mnist", n_img=3, n_lbl=2)
    with pytest.raises(DataError, match=r"3 images but .*train-labels-idx1-ubyte\.gz has 2 labels"):
        load_mnist(tmp_path)


def test_mnist_trailing_bytes_and_bad_gzip(tmp_path):
    p = tmp_path / "x-idx1-ubyte"
    p.write_bytes(_idx(0x801, (2,), bytes([1, 2, 3])))
    with pytest.raises(DataError, match=r"x-idx1-ubyte: 1 unexpected bytes"):
        read_idx(p, 0x801)
    assert read_idx(p, 0x801, limit=2).tolist() == [1, 2]
    bad = tmp_path / "y-idx1-ubyte.gz"
    bad.write_bytes(b"not a gzip stream at all")
    with pytest.raises(DataError, match=r"y-idx1-ubyte\.gz"):
        read_idx(bad)


def test_mnist_missing_file(tmp_path):
    (tmp_path / "mnist").mkdir()
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\(\.gz\): MNIST file not found"):
        load_mnist(tmp_path)


# --- CIFAR-10 ---------------------------------------------------------------------------------------

def test_cifar10_sample_split_with_note():
    with pytest.warns(UserWarning, match="data_batch_1_first200.bin"):
        train = get_dataset("cifar10", ROOT, split="train")
    with pytest.warns(UserWarning, match="records 160-199"):
        test = get_dataset("cifar10", ROOT, split="test")
    assert (len(train), len(test)) == (160, 40)
    assert train.labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert "not CIFAR-10 results" in train.note and "test part" in test.note
    raw = np.fromfile(ROOT / "cifar10" / "data_batch_1_first200.bin", np.uint8).reshape(200, 3073)
    assert test.labels.tolist() == raw[160:, 0].tolist()
    mean, std = torch.tensor(C_MEAN).view(3, 1, 1), torch.tensor(C_STD).view(3, 1, 1)
    expected = (torch.from_numpy(raw[161, 1:].reshape(3, 32, 32)).float() / 255 - mean) / std
    torch.testing.assert_close(test.images[1], expected)
    assert train.classes[6] == "frog" and train.images.shape == (160, 3, 32, 32)


def _cifar_records(labels, seed=0):
    rng = np.random.default_rng(seed)
    recs = np.concatenate([np.array(labels, np.uint8)[:, None],
                           rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)], axis=1)
    return recs.tobytes()


def test_cifar10_standard_files_and_limit(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for i in range(1, 6):
        (folder / f"data_batch_{i}.bin").write_bytes(_cifar_records([i, i - 1], seed=i))
    (folder / "test_batch.bin").write_bytes(_cifar_records([9, 8, 7]))
    train = load_cifar10(tmp_path, "train")
    assert train.note is None and train.labels.tolist() == [1, 0, 2, 1, 3, 2, 4, 3, 5, 4]
    three = load_cifar10(tmp_path, "train", limit=3).labels.tolist()   # quotas 0.3/0.6/0.6/0.6/0.6/0.3
    assert len(set(three)) == 3 and set(three) <= {1, 2, 3, 4}          # -> three of the 2-image classes
    assert load_cifar10(tmp_path, "test").labels.tolist() == [9, 8, 7]


def test_cifar10_partial_record(tmp_path):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    (folder / "data_batch_1_first200.bin").write_bytes(_cifar_records([1, 2])[:-10])
    with pytest.raises(DataError, match=r"data_batch_1_first200\.bin: size 6136 bytes .* partial record of 3063 bytes"):
        load_cifar10(tmp_path, "train")


def test_cifar10_bad_label_incomplete_and_missing(tmp_path):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    (folder / "test_batch.bin").write_bytes(_cifar_records([3, 12]))
    with pytest.raises(DataError, match=r"test_batch\.bin: record 1 has label byte 12"):
        load_cifar10(tmp_path, "test")
    (folder / "data_batch_1.bin").write_bytes(_cifar_records([3]))
    with pytest.raises(DataError, match=r"incomplete CIFAR-10 train set, missing data_batch_2\.bin"):
        load_cifar10(tmp_path, "train")
    empty = tmp_path / "empty"
    (empty / "cifar10").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no CIFAR-10 files \(data_batch_1\.bin"):
        load_cifar10(empty, "train")


def test_random_crop_flip_is_a_crop_of_the_padded_image():
    torch.manual_seed(0)
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    fill = [-1.0, -2.0, -3.0]
    padded = torch.stack([torch.nn.functional.pad(x[:, c], (2, 2, 2, 2), value=fill[c]) for c in range(3)], 1)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        out = random_crop_flip(x, padding=2, fill=fill, generator=g)
        assert out.shape == x.shape
        for n in range(2):
            crops = [padded[n, :, i:i + 5, j:j + 5] for i in range(5) for j in range(5)]
            crops += [c.flip(-1) for c in crops]
            assert any(torch.equal(out[n], c) for c in crops)
    single = random_crop_flip(x[0], padding=0)  # no padding: the image or its mirror
    assert torch.equal(single, x[0]) or torch.equal(single, x[0].flip(-1))


def test_cifar10_augment_deterministic_under_seed():
    with pytest.warns(UserWarning):
        ds = load_cifar10(ROOT, "train", limit=4, augment=True)
    torch.manual_seed(3)
    a = torch.stack([ds[i][0] for i in range(4)])
    torch.manual_seed(3)
    b = torch.stack([ds[i][0] for i in range(4)])
    assert torch.equal(a, b) and a.shape == (4, 3, 32, 32)
    assert not torch.equal(a, ds.images)  # stored images stay un-augmented and differ from draws


# --- registry ---------------------------------------------------------------------------------------

def test_registry_names_and_errors():
    assert list_datasets() == sorted(["mnist", "cifar10", "cola", "sst2", "mrpc", "stsb", "qqp", "mnli",
                                      "qnli", "rte", "wnli"])
    with pytest.raises(UnknownNameError, match="unknown dataset 'imagenet'.*cifar10, cola"):
        get_dataset("imagenet")
    assert len(get_dataset("SST-2", ROOT, split="dev", limit=5)) == 5
    with pytest.raises(ValueError, match="valid: train, test"):
        get_dataset("mnist", ROOT, split="dev")
    with pytest.raises(ValueError, match="valid: train, dev"):
        get_dataset("rte", ROOT, split="test")


# --- GLUE -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task,split,rows", [
    ("cola", "train", 8551), ("cola", "dev", 1043), ("sst2", "train", 67349), ("sst2", "dev", 872),
    ("mrpc", "train", 3668), ("mrpc", "dev", 408), ("stsb", "train", 5749), ("stsb", "dev", 1500),
    ("rte", "train", 2490), ("rte", "dev", 277), ("wnli", "train", 635), ("wnli", "dev", 71),
])
def test_glue_row_counts(task, split, rows):
    assert len(load_glue(task, ROOT, split)) == rows


def test_glue_contents_and_metadata():
    sst = load_glue("sst2", ROOT, "dev")
    assert collections.Counter(sst.labels) == {1: 444, 0: 428}
    assert sst[0] == GlueExample("it 's a charming and often affecting journey . ", None, 1)
    assert (sst.num_labels, sst.is_regression, sst.label_names) == (2, False, ("negative", "positive"))
    mrpc = load_glue("mrpc", ROOT, "dev")  # BOM header; unbalanced quotes stay inside the field
    assert mrpc[0].text_b == '"The foodservice pie business does not fit our long-term growth strategy.'
    assert mrpc.metric_names == ("f1", "accuracy", "combined") and mrpc.primary_metric == "f1"
    stsb = load_glue("stsb", ROOT, "dev")
    assert stsb[0] == GlueExample("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0)
    assert stsb.is_regression and stsb.num_labels == 1 and isinstance(stsb[1].label, float)
    cola = load_glue("cola", ROOT, "dev")
    assert cola[0] == GlueExample("The sailors rode the breeze clear of the rocks.", None, 1)
    assert cola.metric_names == ("matthews_correlation",)
    rte = load_glue("rte", ROOT, "dev")
    assert rte[0].text_b == "Christopher Reeve had an accident." and rte[0].label == 1  # not_entailment
    assert get_task("MNLI").label_names == ("contradiction", "entailment", "neutral")


def _tsv(path, lines, bom=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(("\ufeff" if bom else "") + "\n".join("\t".join(r) for r in lines) + "\n", encoding="utf-8")
    return path


def test_glue_qqp_qnli_formats(tmp_path):
    _tsv(tmp_path / "glue/QQP/train.tsv", [
        ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
        ["0", "1", "2", 'How do I "learn Python?', "What is Python?", "0"],
        ["1", "3", "4", "Why is the sky blue?", "What makes the sky blue?", "1"]])
    qqp = load_glue("qqp", tmp_path, "train")
    assert qqp.examples == [GlueExample('How do I "learn Python?', "What is Python?", 0),
                            GlueExample("Why is the sky blue?", "What makes the sky blue?", 1)]
    _tsv(tmp_path / "glue/QNLI/dev.tsv", [
        ["index", "question", "sentence", "label"],
        ["0", "Q?", "S.", "not_entailment"], ["1", "Q2?", "S2.", "entailment"]])
    assert load_glue("qnli", tmp_path, "dev").labels == [1, 0]


MNLI_TRAIN_HEADER = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                     "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER[:11] + ["label2", "label3", "label4", "label5", "gold_label"]


def test_glue_mnli_formats(tmp_path):
    d = tmp_path / "glue/MNLI"
    row = ["0", "1", "1e", "fiction", "( a )", "( b )", "(ROOT a)", "(ROOT b)", "A man.", "A person."]
    _tsv(d / "train.tsv", [MNLI_TRAIN_HEADER, row + ["entailment", "entailment"],
                           row + ["neutral", "neutral"], row + ["contradiction", "contradiction"]])
    _tsv(d / "dev_matched.tsv", [MNLI_DEV_HEADER, row + ["neutral"] * 5 + ["neutral"]])
    _tsv(d / "dev_mismatched.tsv", [MNLI_DEV_HEADER, row + ["entailment"] * 4 + ["contradiction", "entailment"]])
    assert load_glue("mnli", tmp_path, "train").labels == [1, 2, 0]
    dev = load_glue("mnli", tmp_path, "dev")
    assert dev.split == "dev_matched" and dev[0] == GlueExample("A man.", "A person.", 2)
    assert load_glue("mnli", tmp_path, "dev_mismatched").labels == [1]
    _tsv(d / "train.tsv", [MNLI_TRAIN_HEADER[:-1], row + ["entailment"]])
    with pytest.raises(DataError, match=r"MNLI/train\.tsv:1: MNLI header .* with 'gold_label' last"):
        load_glue("mnli", tmp_path, "train")


def test_glue_wrong_columns(tmp_path):
    p = _tsv(tmp_path / "glue/RTE/dev.tsv", [["index", "sentence1", "sentence2", "label"],
                                             ["0", "a", "b", "entailment"], ["1", "a", "b\tc", "entailment"]])
    with pytest.raises(DataError, match=r"RTE/dev\.tsv:3: 5 columns, expected 4 \(index, sentence1, sentence2, label\)"):
        load_glue("rte", tmp_path, "dev")
    assert len(read_glue_tsv("rte", p, limit=1)) == 1  # the bad line is beyond the limit
    _tsv(tmp_path / "glue/SST-2/dev.tsv", [["text", "label"], ["good", "1"]])
    with pytest.raises(DataError, match=r"SST-2/dev\.tsv:1: SST-2 header is \['text', 'label'\], expected the columns \[sentence, label\]"):
        load_glue("sst2", tmp_path, "dev")
    _tsv(tmp_path / "glue/CoLA/train.tsv", [["gj04", "1", "", "ok"], ["gj04", "1", "bad"]])
    with pytest.raises(DataError, match=r"CoLA/train\.tsv:2: 3 columns, expected 4 \(source, label, original_mark, sentence\)"):
        load_glue("cola", tmp_path, "train")


def test_glue_unknown_label(tmp_path):
    _tsv(tmp_path / "glue/WNLI/dev.tsv", [["index", "sentence1", "sentence2", "label"], ["0", "a", "b", "0"],
                                          ["1", "a", "b", "entailment"]])
    with pytest.raises(DataError, match=r"WNLI/dev\.tsv:3: unknown WNLI label 'entailment'; valid labels: 0, 1"):
        load_glue("wnli", tmp_path, "dev")
    _tsv(tmp_path / "glue/MRPC/train.tsv", [["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
                                            ["2", "1", "2", "a", "b"]], bom=True)
    with pytest.raises(DataError, match=r"MRPC/train\.tsv:2: unknown MRPC label '2'; valid labels: 0, 1"):
        load_glue("mrpc", tmp_path, "train")
    head = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"]
    _tsv(tmp_path / "glue/STS-B/dev.tsv", [head, ["0"] * 9 + ["high"]])
    with pytest.raises(DataError, match=r"STS-B/dev\.tsv:2: STS-B score 'high' is not a number"):
        load_glue("stsb", tmp_path, "dev")


def test_glue_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"QNLI/train\.tsv: GLUE QNLI train file not found"):
        load_glue("qnli", tmp_path, "train")
    with pytest.raises(UnknownNameError, match="valid tasks: cola, sst2"):
        get_task("squad")


# --- tokenisation and the bucketed loader ------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    """A tiny offline word-level BERT-style tokenizer built from the RTE/SST-2 words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = {w for t in ("sst2", "rte") for e in load_glue(t, ROOT, "dev") for s in (e.text_a, e.text_b or "")
             for w in s.split()}
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *sorted(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def test_bucket_sampler_each_index_once_and_seeded():
    lengths = [5, 1, 9, 3, 3, 7, 2, 8, 4, 6, 1]
    s = BucketBatchSampler(lengths, batch_size=3, shuffle=True, seed=7)
    epoch0, epoch1 = list(s), list(s)
    for batches in (epoch0, epoch1):
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert len(batches) == len(s) == 4
    assert epoch0 != epoch1
    s.set_epoch(0)
    assert list(s) == epoch0
    plain = list(BucketBatchSampler(lengths, 3, shuffle=False, bucket=False))
    assert plain == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10]]
    sorted_batches = list(BucketBatchSampler(lengths, 3, shuffle=False, bucket=True))
    assert [[lengths[i] for i in b] for b in sorted_batches] == [[1, 1, 2], [3, 3, 4], [5, 6, 7], [8, 9]]


def test_loader_dynamic_padding_single_sentences(tokenizer):
    data = load_glue("sst2", ROOT, "dev", limit=64)
    enc = encode_examples(data, tokenizer, max_length=16)
    assert max(enc.lengths) == 16 and not enc.is_regression
    seen = collections.Counter()
    total_pad = {}
    for bucket in (True, False):
        pad = 0
        for batch in make_loader(enc, batch_size=8, shuffle=True, seed=0, bucket=bucket):
            lengths = batch["attention_mask"].sum(1)
            assert batch["input_ids"].shape[1] == lengths.max()  # padded only to the batch's own max
            assert batch["labels"].dtype == torch.int64
            assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all()
            pad += int((batch["attention_mask"] == 0).sum())
            if bucket:
                for ids, n, y in zip(batch["input_ids"], lengths, batch["labels"]):
                    seen[(tuple(ids[:n].tolist()), int(y))] += 1
        total_pad[bucket] = pad
    expected = collections.Counter((tuple(f["input_ids"]), f["labels"]) for f in enc.features)
    assert seen == expected  # every example exactly once
    assert total_pad[True] < total_pad[False]


def test_loader_pairs_and_regression(tokenizer):
    rte = encode_examples(load_glue("rte", ROOT, "dev", limit=10), tokenizer, max_length=64)
    batch = next(iter(make_loader(rte, batch_size=4)))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["token_type_ids"].max() == 1
    stsb = [GlueExample("a man", "a person", 4.5), GlueExample("good", "bad", 0.25)]
    out = next(iter(make_loader(encode_examples(stsb, tokenizer, max_length=8), batch_size=2, bucket=False)))
    assert out["labels"].dtype == torch.float32 and out["labels"].tolist() == [4.5, 0.25]
