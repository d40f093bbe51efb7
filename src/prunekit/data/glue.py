"""GLUE (Wang et al. 2019) readers for the official TSV distribution, plus tokenisation and a
length-bucketed, dynamically padded loader for Hugging Face tokenizers.

Files live in ``<root>/glue/<Task>/`` (or ``<root>/glue_data/<Task>/`` as ``download_glue_data.py``
writes them), with the official names and formats:

=======  ====================  ===================================================================
task     folder / files        format
=======  ====================  ===================================================================
cola     CoLA/{train,dev}      **no header**; source, label 0/1, original mark, sentence
sst2     SST-2/{train,dev}     ``sentence  label``
mrpc     MRPC/{train,dev}      ``\\ufeffQuality  #1 ID  #2 ID  #1 String  #2 String`` (UTF-8 BOM)
stsb     STS-B/{train,dev}     10 columns, ``sentence1``, ``sentence2``, float ``score`` last
qqp      QQP/{train,dev}       ``id qid1 qid2 question1 question2 is_duplicate``
mnli     MNLI/{train,dev_matched,dev_mismatched}  parses, ``sentence1``, ``sentence2``, …, ``gold_label`` last
qnli     QNLI/{train,dev}      ``index question sentence label`` (entailment/not_entailment)
rte      RTE/{train,dev}       ``index sentence1 sentence2 label`` (entailment/not_entailment)
wnli     WNLI/{train,dev}      ``index sentence1 sentence2 label`` (0/1)
=======  ====================  ===================================================================

Files are read with :mod:`csv` and ``quoting=csv.QUOTE_NONE``: GLUE text contains unbalanced quotes
(e.g. MRPC), which the default dialect would swallow across lines, silently merging rows. Every row
must have the header's column count and a known label; otherwise :class:`DataError` names the file,
the line and what was expected. The unlabelled test splits are not supported (nothing to score).
"""
from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Sampler

from prunekit.core.errors import DataError, UnknownNameError
from prunekit.data.paths import resolve_data_root
from prunekit.data.sample import subsample

__all__ = ["GlueTask", "GlueExample", "GlueData", "GLUE_TASKS", "get_task", "list_tasks", "load_glue",
           "read_glue_tsv", "EncodedGlue", "encode_examples", "BucketBatchSampler", "pad_collate", "make_loader"]

GLUE_URL = "https://gluebenchmark.com/tasks"


@dataclass(frozen=True)
class GlueTask:
    """What a GLUE task's files look like and how it is scored.

    ``columns``: the exact header (or, for headerless CoLA, the column names by position). When
    ``fixed_header`` is false (MNLI: train has 12 columns, dev 16) the header must merely contain
    ``text_a``/``text_b``/``label`` with ``label`` last. ``label_values`` are the label strings as
    they appear in the file, in class-id order; ``label_names`` the readable names of those classes.
    Regression tasks (STS-B) have no label values and a ``label_range``.
    """

    name: str
    display: str
    columns: tuple[str, ...]
    text_a: str
    text_b: str | None
    label: str
    label_values: tuple[str, ...]
    label_names: tuple[str, ...]
    metric_names: tuple[str, ...]
    primary_metric: str
    has_header: bool = True
    fixed_header: bool = True
    files: dict[str, str] = field(default_factory=lambda: {"train": "train.tsv", "dev": "dev.tsv"})
    aliases: dict[str, str] = field(default_factory=dict)
    label_range: tuple[float, float] | None = None

    @property
    def is_regression(self) -> bool:
        return not self.label_values

    @property
    def num_labels(self) -> int:
        """Output units a model needs: 1 for regression, else the number of classes."""
        return 1 if self.is_regression else len(self.label_values)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.files) + tuple(self.aliases)


_ACC = ("accuracy",)
_F1_ACC = ("f1", "accuracy", "combined")
_NLI2 = ("entailment", "not_entailment")

GLUE_TASKS: dict[str, GlueTask] = {t.name: t for t in [
    GlueTask("cola", "CoLA", ("source", "label", "original_mark", "sentence"), "sentence", None, "label",
             ("0", "1"), ("unacceptable", "acceptable"), ("matthews_correlation",), "matthews_correlation",
             has_header=False),
    GlueTask("sst2", "SST-2", ("sentence", "label"), "sentence", None, "label",
             ("0", "1"), ("negative", "positive"), _ACC, "accuracy"),
    GlueTask("mrpc", "MRPC", ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"), "#1 String", "#2 String",
             "Quality", ("0", "1"), ("not_equivalent", "equivalent"), _F1_ACC, "f1"),
    GlueTask("stsb", "STS-B", ("index", "genre", "filename", "year", "old_index", "source1", "source2",
                               "sentence1", "sentence2", "score"), "sentence1", "sentence2", "score",
             (), (), ("pearson", "spearmanr", "combined"), "combined", label_range=(0.0, 5.0)),
    GlueTask("qqp", "QQP", ("id", "qid1", "qid2", "question1", "question2", "is_duplicate"), "question1",
             "question2", "is_duplicate", ("0", "1"), ("not_duplicate", "duplicate"), _F1_ACC, "f1"),
    GlueTask("mnli", "MNLI", ("sentence1", "sentence2", "gold_label"), "sentence1", "sentence2", "gold_label",
             ("contradiction", "entailment", "neutral"), ("contradiction", "entailment", "neutral"), _ACC,
             "accuracy", fixed_header=False,
             files={"train": "train.tsv", "dev_matched": "dev_matched.tsv", "dev_mismatched": "dev_mismatched.tsv"},
             aliases={"dev": "dev_matched"}),
    GlueTask("qnli", "QNLI", ("index", "question", "sentence", "label"), "question", "sentence", "label",
             _NLI2, _NLI2, _ACC, "accuracy"),
    GlueTask("rte", "RTE", ("index", "sentence1", "sentence2", "label"), "sentence1", "sentence2", "label",
             _NLI2, _NLI2, _ACC, "accuracy"),
    GlueTask("wnli", "WNLI", ("index", "sentence1", "sentence2", "label"), "sentence1", "sentence2", "label",
             ("0", "1"), ("not_entailment", "entailment"), _ACC, "accuracy"),
]}
# Primary metrics: the GLUE leaderboard reports MRPC/QQP as F1/accuracy and STS-B as Pearson/Spearman;
# we rank MRPC/QQP by F1 and STS-B by the mean of Pearson and Spearman ("combined"), CoLA by MCC.


def list_tasks() -> list[str]:
    """The nine GLUE task names in registry spelling."""
    return list(GLUE_TASKS)


def get_task(name: str | GlueTask) -> GlueTask:
    """Task spec by name; case-insensitive, ``-``/``_`` and a ``glue/`` prefix ignored (``"SST-2"``).
    Unknown -> ``UnknownNameError`` listing the tasks."""
    if isinstance(name, GlueTask):
        return name
    key = name.strip().lower()
    key = key[len("glue/"):] if key.startswith("glue/") else key
    key = key.replace("-", "").replace("_", "")
    if key not in GLUE_TASKS:
        raise UnknownNameError(f"unknown GLUE task {name!r}; valid tasks: {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[key]


class GlueExample(NamedTuple):
    """One example: ``text_b`` is ``None`` for single-sentence tasks; ``label`` is the class id
    (int) or, for STS-B, the similarity score (float)."""

    text_a: str
    text_b: str | None
    label: int | float


@dataclass
class GlueData:
    """The examples of one task split, plus what a model and an evaluator need to know about it."""

    task: GlueTask
    split: str
    path: Path
    examples: list[GlueExample]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]

    def __iter__(self) -> Iterator[GlueExample]:
        return iter(self.examples)

    @property
    def num_labels(self) -> int:
        return self.task.num_labels

    @property
    def is_regression(self) -> bool:
        return self.task.is_regression

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.task.label_names

    @property
    def metric_names(self) -> tuple[str, ...]:
        return self.task.metric_names

    @property
    def primary_metric(self) -> str:
        return self.task.primary_metric

    @property
    def labels(self) -> list[int | float]:
        return [e.label for e in self.examples]

    def __repr__(self) -> str:
        return f"GlueData(task={self.task.name!r}, split={self.split!r}, n={len(self)}, path={str(self.path)!r})"


def _parse_label(task: GlueTask, raw: str, path: Path, line: int) -> int | float:
    if task.is_regression:
        try:
            value = float(raw)
        except ValueError:
            raise DataError(f"{path}:{line}: {task.display} score {raw!r} is not a number") from None
        lo, hi = task.label_range or (float("-inf"), float("inf"))
        if not lo <= value <= hi:
            raise DataError(f"{path}:{line}: {task.display} score {value} outside [{lo}, {hi}]")
        return value
    try:
        return task.label_values.index(raw)
    except ValueError:
        raise DataError(f"{path}:{line}: unknown {task.display} label {raw!r}; valid labels: "
                        f"{', '.join(task.label_values)}") from None


def read_glue_tsv(task: str | GlueTask, path: str | os.PathLike, limit: int | None = None) -> list[GlueExample]:
    """Parse one GLUE TSV file of ``task`` into examples (the first ``limit`` when given).

    The UTF-8 BOM (MRPC) is stripped by reading as ``utf-8-sig``. Blank lines are skipped.
    """
    task, path = get_task(task), Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {task.display} file not found")
    expected = ", ".join(task.columns)
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if task.has_header:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: empty file, expected a {task.display} header ({expected})")
            if task.fixed_header:
                if tuple(header) != task.columns:
                    raise DataError(f"{path}:1: {task.display} header is {header}, expected the columns "
                                    f"[{expected}]")
            else:
                missing = [c for c in task.columns if c not in header]
                if missing or header[-1] != task.label:
                    raise DataError(f"{path}:1: {task.display} header {header} must contain columns "
                                    f"[{expected}] with {task.label!r} last")
        else:
            header = list(task.columns)
        ia = header.index(task.text_a)
        ib = header.index(task.text_b) if task.text_b else None
        il = len(header) - 1 if task.label == header[-1] else header.index(task.label)
        examples: list[GlueExample] = []
        for row in reader:
            if limit is not None and len(examples) >= limit:
                break
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{path}:{reader.line_num}: {len(row)} columns, expected {len(header)} "
                                f"({', '.join(header)})")
            label = _parse_label(task, row[il], path, reader.line_num)
            examples.append(GlueExample(row[ia], row[ib] if ib is not None else None, label))
    if not examples:
        raise DataError(f"{path}: no examples (the file has {'only a header' if task.has_header else 'no rows'}); "
                        f"a {task.display} file needs at least one example")
    return examples


def find_task_dir(task: str | GlueTask, root: str | os.PathLike | None = None) -> Path:
    """``<root>/glue/<Task>`` (or ``<root>/glue_data/<Task>``), the first that exists."""
    task = get_task(task)
    base = resolve_data_root(root)
    candidates = [base / "glue" / task.display, base / "glue_data" / task.display]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def load_glue(task: str | GlueTask, root: str | os.PathLike | None = None, split: str = "train",
              limit: int | None = None, seed: int = 0) -> GlueData:
    """Read split ``split`` of GLUE ``task`` (``train``/``dev``; MNLI ``dev`` = ``dev_matched``).

    ``limit`` keeps a sample of ``limit`` examples drawn with ``seed``, stratified by class (STS-B:
    uniform), in file order (:func:`prunekit.data.sample.subsample`)."""
    task = get_task(task)
    split_key = task.aliases.get(split, split)
    if split_key not in task.files:
        raise DataError(f"unknown {task.display} split {split!r}; valid: {', '.join(task.splits)}")
    path = find_task_dir(task, root) / task.files[split_key]
    if not path.is_file():
        raise DataError(f"{path}: GLUE {task.display} {split_key} file not found. Get the GLUE data "
                        f"(official download_glue_data.py, see {GLUE_URL}) and put {task.display}/"
                        f"{task.files[split_key]} under <data root>/glue/")
    data = GlueData(task, split_key, path, read_glue_tsv(task, path))
    return subsample(data, limit, seed, regression=task.is_regression)


# --- tokenisation and loading ---------------------------------------------------------------------

@dataclass
class EncodedGlue:
    """Tokenised examples, unpadded: ``features[i]`` maps ``input_ids``, ``attention_mask`` (and
    ``token_type_ids`` when the tokenizer gives them) to int lists, plus ``labels``."""

    features: list[dict[str, Any]]
    pad_token_id: int
    is_regression: bool

    def __len__(self) -> int:
        return len(self.features)

    @property
    def lengths(self) -> list[int]:
        return [len(f["input_ids"]) for f in self.features]


def encode_examples(examples: GlueData | Sequence[GlueExample], tokenizer, max_length: int = 128,
                    is_regression: bool | None = None) -> EncodedGlue:
    """Tokenise ``examples`` with a Hugging Face tokenizer (pairs as ``text_a, text_b``), truncating
    to ``max_length`` and **not** padding — padding happens per batch in :func:`pad_collate`.

    ``is_regression`` defaults to the task's (for :class:`GlueData`) or to "any label is a float".
    """
    if is_regression is None:
        is_regression = (examples.is_regression if isinstance(examples, GlueData)
                         else any(isinstance(e.label, float) for e in examples))
    examples = list(examples)
    if tokenizer.pad_token_id is None:
        raise DataError("tokenizer has no pad token; set tokenizer.pad_token before encoding")
    has_b = [e.text_b is not None for e in examples]
    if any(has_b) and not all(has_b):
        raise DataError("examples mix single sentences and sentence pairs")
    texts_a = [e.text_a for e in examples]
    texts_b = [e.text_b for e in examples] if examples and has_b[0] else None
    enc = tokenizer(texts_a, texts_b, truncation=True, max_length=max_length, padding=False) if examples else {}
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    features = [dict({k: enc[k][i] for k in keys}, labels=e.label) for i, e in enumerate(examples)]
    return EncodedGlue(features, int(tokenizer.pad_token_id), bool(is_regression))


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of indices of similar length, so dynamic padding wastes little.

    With ``bucket=True`` the indices are stably sorted by length and cut into consecutive batches
    (the "buckets"). With ``shuffle=True`` the indices are first permuted (so equal lengths are
    grouped differently each epoch) and the order of the batches is shuffled; both draws come from
    a generator seeded with ``seed + epoch``. The epoch advances by one after each full pass, or is
    set with :meth:`set_epoch` (e.g. when resuming). ``bucket=False, shuffle=False`` is plain order.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool = False, seed: int = 0,
                 bucket: bool = True, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.bucket, self.drop_last = bucket, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        n = len(self.lengths)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        if self.bucket:
            order = order[torch.sort(self.lengths[order], stable=True).indices]
        batches = list(order.split(self.batch_size))
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        self.epoch += 1
        for b in batches:
            yield b.tolist()


def pad_collate(features: Sequence[dict[str, Any]], pad_token_id: int, is_regression: bool) -> dict[str, torch.Tensor]:
    """Stack a batch, right-padding to the batch's own longest sequence: ``input_ids`` with
    ``pad_token_id``, ``attention_mask``/``token_type_ids`` with 0. ``labels`` are float32 for
    regression, int64 otherwise."""
    out: dict[str, torch.Tensor] = {}
    for key, pad in (("input_ids", pad_token_id), ("attention_mask", 0), ("token_type_ids", 0)):
        if key in features[0]:
            seqs = [torch.as_tensor(f[key], dtype=torch.long) for f in features]
            out[key] = pad_sequence(seqs, batch_first=True, padding_value=pad)
    out["labels"] = torch.tensor([f["labels"] for f in features],
                                 dtype=torch.float32 if is_regression else torch.long)
    return out


class _Collate:
    """Picklable collate (for ``num_workers > 0``) bound to a pad id and label type."""

    def __init__(self, pad_token_id: int, is_regression: bool) -> None:
        self.pad_token_id, self.is_regression = pad_token_id, is_regression

    def __call__(self, features):
        return pad_collate(features, self.pad_token_id, self.is_regression)


def make_loader(encoded: EncodedGlue, batch_size: int, shuffle: bool = False, seed: int = 0,
                bucket: bool = True, drop_last: bool = False, num_workers: int = 0) -> DataLoader:
    """A :class:`DataLoader` over ``encoded`` yielding dicts of ``input_ids``, ``attention_mask``,
    (``token_type_ids``), ``labels``, batched by :class:`BucketBatchSampler` and padded per batch."""
    sampler = BucketBatchSampler(encoded.lengths, batch_size, shuffle=shuffle, seed=seed, bucket=bucket,
                                 drop_last=drop_last)
    return DataLoader(encoded.features, batch_sampler=sampler,  # type: ignore[arg-type]  # any sequence works num_workers=num_workers,
                      collate_fn=_Collate(encoded.pad_token_id, encoded.is_regression))
