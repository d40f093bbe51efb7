"""The user's own text data sets: CSV, TSV or JSONL files, or a folder written by ``datasets.save_to_disk``.

Every example has one text column or a pair (``text_columns: [sentence]`` or ``[sentence1, sentence2]``)
and a label column.  ``task_type: classification`` maps the distinct labels of the **train** split to
class ids — sorted numerically when every label is an integer (``"0", "1", "10"``), else as strings —
so an eval label that train lacks is an error naming the file and the row.  A label written as an
integral number (``1``, ``"1"``, ``1.0``, ``"1.0"``) is one class however it is spelled.  A train split
with more than two classes and more classes than half its rows warns ("regression?").
``task_type: regression`` reads the label as a float target.

File formats (from the extension, or ``fmt``):

* ``.csv`` — comma-separated, the first row the header, standard CSV quoting;
* ``.tsv`` — tab-separated, the first row the header, **no quote handling** (as GLUE: text may hold
  unbalanced quotes); every row must have the header's column count;
* ``.jsonl`` / ``.json`` — one JSON object per line; blank lines are skipped.

Errors (:class:`DataError`) name the file and, where it applies, the line: a missing file, an empty
split (no rows under the header), a missing column (with the available ones), a malformed JSONL line,
an empty or null label (an empty CSV cell, a JSON ``null``), a label that is not a number (regression)
or not seen in train (classification).  Rows are numbered
as lines of the file (the header is line 1).
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunekit.core.errors import DataError
from prunekit.data.glue import GlueExample

__all__ = ["TableData", "FORMATS", "TASK_TYPES", "read_table", "label_key", "check_labels", "build_label_map",
           "to_examples", "load_table", "load_table_splits", "load_hf_disk"]

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}
TASK_TYPES = ("classification", "regression")
_INT = re.compile(r"[-+]?\d+")
_DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")   # no nan/inf/underscores

Row = tuple[int, dict[str, Any]]      # (line number, {column: value})


@dataclass
class TableData:
    """The examples of one split: ``examples[i] = (text_a, text_b | None, label)`` with ``label`` a class
    id (classification) or a float (regression); ``label_names[i]`` is the label text of class ``i``."""

    path: str
    examples: list[GlueExample]
    task_type: str
    label_names: tuple[str, ...]
    label_map: dict[Any, int]

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def is_regression(self) -> bool:
        return self.task_type == "regression"

    @property
    def num_labels(self) -> int:
        """Model outputs needed: 1 for regression, else the number of classes."""
        return 1 if self.is_regression else len(self.label_names)

    @property
    def labels(self) -> list[int | float]:
        return [e.label for e in self.examples]


def _format(path: Path, fmt: str | None) -> str:
    if fmt:
        if fmt not in FORMATS.values():
            raise DataError(f"{path}: unknown format {fmt!r}; valid: csv, tsv, jsonl")
        return fmt
    if path.suffix.lower() not in FORMATS:
        raise DataError(f"{path}: cannot tell the format from the extension {path.suffix!r}; "
                        f"use {', '.join(FORMATS)} or set data.format")
    return FORMATS[path.suffix.lower()]


def _read_delimited(path: Path, fmt: str) -> tuple[list[str], list[Row]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t" if fmt == "tsv" else ",",
                            quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL)
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: empty file (expected a header row with the column names)")
        rows: list[Row] = []
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{path}:{reader.line_num}: {len(row)} columns, expected {len(header)} "
                                f"({', '.join(header)})")
            rows.append((reader.line_num, dict(zip(header, row))))
    return header, rows


def _read_jsonl(path: Path) -> tuple[list[str], list[Row]]:
    rows: list[Row] = []
    with open(path, encoding="utf-8-sig") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: malformed JSON line ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{i}: expected a JSON object per line, got {type(obj).__name__}")
            rows.append((i, obj))
    columns = list(rows[0][1]) if rows else []
    return columns, rows


def read_table(path: str | os.PathLike, fmt: str | None = None) -> tuple[list[str], list[Row]]:
    """``(columns, rows)`` of a CSV/TSV/JSONL file; each row is ``(line number, {column: value})``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: data file not found")
    kind = _format(p, fmt)
    return _read_jsonl(p) if kind == "jsonl" else _read_delimited(p, kind)


def label_key(value: Any) -> int | str:
    """The canonical form of a raw label: integers (``3``, ``"3"``, ``3.0``, ``"3.0"``, ``"3e0"``) become
    ``int`` — one class however the file spells it — and the rest ``str``."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    text = str(value).strip()
    if _INT.fullmatch(text):
        return int(text)
    if _DECIMAL.fullmatch(text) and float(text).is_integer():
        return int(float(text))
    return text


def _is_empty(value: Any) -> bool:
    """A missing label: JSON ``null``, an empty or blank cell, a float NaN."""
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, float) and math.isnan(value))


def check_labels(rows: Sequence[Row], path: str, label_column: str) -> None:
    """:class:`DataError` naming the file and line of the first row whose label is empty or null."""
    for line, row in rows:
        if label_column in row and _is_empty(row[label_column]):
            kind = "null" if row[label_column] is None else "empty"
            raise DataError(f"{path}:{line}: {kind} label in column {label_column!r}; every example needs a "
                            "label (remove the row or fill it in)")


def _warn_many_classes(n_classes: int, n_rows: int, path: str) -> None:
    if n_classes > max(2, n_rows / 2):        # two values are a binary task, never a regression
        warnings.warn(f"{path}: {n_classes} classes in {n_rows} rows (more classes than half the rows) — "
                      "regression? set data.task_type: regression if the label is a number to predict",
                      UserWarning, stacklevel=2)


def build_label_map(raw: Sequence[Any]) -> tuple[dict[int | str, int], tuple[str, ...]]:
    """Class ids for the distinct labels of a train split: integers in numeric order, then strings."""
    keys = sorted({label_key(v) for v in raw}, key=lambda k: (isinstance(k, str), k))
    return {k: i for i, k in enumerate(keys)}, tuple(str(k) for k in keys)


def _check_columns(columns: Sequence[str], needed: Sequence[str], path: str) -> None:
    for c in needed:
        if c not in columns:
            raise DataError(f"{path}: no column {c!r}; available columns: {list(columns)}")


def _regression_target(value: Any, where: str, column: str) -> float:
    try:
        target = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: regression label {column!r} = {value!r} is not a number") from None
    if not math.isfinite(target):
        raise DataError(f"{where}: regression label {column!r} = {value!r} is not a finite number")
    return target


def to_examples(rows: Sequence[Row], path: str, text_columns: Sequence[str], label_column: str, task_type: str,
                label_map: dict[int | str, int]) -> list[GlueExample]:
    """Rows -> examples; every row must have the columns, a text (not null) and a known label."""
    out: list[GlueExample] = []
    for line, row in rows:
        where = f"{path}:{line}"
        missing = [c for c in (*text_columns, label_column) if c not in row]
        if missing:
            raise DataError(f"{where}: row has no column {missing[0]!r}; available columns: {list(row)}")
        texts = [row[c] for c in text_columns]
        for c, t in zip(text_columns, texts):
            if t is None or isinstance(t, (dict, list)):
                raise DataError(f"{where}: text column {c!r} is {t!r}, expected a string")
        raw = row[label_column]
        if task_type == "regression":
            label: int | float = _regression_target(raw, where, label_column)
        else:
            key = label_key(raw)
            if key not in label_map:
                raise DataError(f"{where}: label {raw!r} does not occur in the train split "
                                f"(train labels: {sorted(label_map, key=lambda k: (isinstance(k, str), k))})")
            label = label_map[key]
        out.append(GlueExample(str(texts[0]), str(texts[1]) if len(texts) > 1 else None, label))
    return out


def _check_spec(text_columns: Sequence[str], task_type: str) -> None:
    if not 1 <= len(text_columns) <= 2:
        raise DataError(f"data.text_columns must name one text column or a pair, got {list(text_columns)}")
    if task_type not in TASK_TYPES:
        raise DataError(f"data.task_type {task_type!r} is not one of {list(TASK_TYPES)}")


def _from_rows(columns: Sequence[str], rows: Sequence[Row], path: str, text_columns: Sequence[str],
               label_column: str, task_type: str, label_map: dict | None) -> TableData:
    _check_spec(text_columns, task_type)
    if not rows:
        raise DataError(f"{path}: empty split (no rows{' under the header' if columns else ''})")
    _check_columns(columns, [*text_columns, label_column], path)
    check_labels(rows, path, label_column)
    names: tuple[str, ...] = ()
    if task_type == "classification":
        if label_map is None:
            label_map, names = build_label_map([r[label_column] for _, r in rows if label_column in r])
            _warn_many_classes(len(names), len(rows), path)
        else:
            names = tuple(str(k) for k in sorted(label_map, key=label_map.__getitem__))
    label_map = label_map or {}
    examples = to_examples(rows, path, text_columns, label_column, task_type, label_map)
    return TableData(path, examples, task_type, names, dict(label_map))


def load_table(path: str | os.PathLike, text_columns: Sequence[str], label_column: str = "label",
               task_type: str = "classification", label_map: dict | None = None, fmt: str | None = None) -> TableData:
    """Read one split.  ``label_map`` (the train split's) is required for an eval split of a
    classification task; without it the map is built from this file's labels."""
    columns, rows = read_table(path, fmt)
    return _from_rows(columns, rows, str(Path(path).expanduser()), text_columns, label_column, task_type, label_map)


def load_table_splits(train: str | os.PathLike, eval: str | os.PathLike, text_columns: Sequence[str],  # noqa: A002
                      label_column: str = "label", task_type: str = "classification",
                      fmt: str | None = None) -> tuple[TableData, TableData]:
    """The train split (which fixes the classes) and the eval split mapped with train's classes."""
    tr = load_table(train, text_columns, label_column, task_type, None, fmt)
    ev = load_table(eval, text_columns, label_column, task_type, tr.label_map if not tr.is_regression else None, fmt)
    return tr, ev


# --- datasets.save_to_disk folders ---------------------------------------------------------------
EVAL_SPLITS = ("validation", "eval", "test", "dev")


def _hf_split(dd, name: str | None, default: Sequence[str], folder: Path):
    keys = list(dd.keys())
    if name is None:
        name = next((k for k in default if k in keys), None)
        if name is None:
            raise DataError(f"{folder}: none of the splits {list(default)} exists (splits: {keys}); "
                            "name one with data.train / data.eval")
    if name not in keys:
        raise DataError(f"{folder}: no split {name!r}; splits: {keys}")
    return name, dd[name]


def _hf_rows(ds) -> list[Row]:
    return [(i + 1, row) for i, row in enumerate(ds)]


def load_hf_disk(folder: str | os.PathLike, text_columns: Sequence[str], label_column: str = "label",
                 task_type: str = "classification", train_split: str | None = None,
                 eval_split: str | None = None) -> tuple[TableData, TableData]:
    """Train and eval splits of a ``DatasetDict`` saved with ``save_to_disk`` (needs ``datasets``).

    The default eval split is the first of ``validation``, ``eval``, ``test``, ``dev``.  A
    ``ClassLabel`` label column keeps its own class names and ids; other labels are mapped from train
    like a table.  Rows are numbered from 1 in error messages (``folder[split]:row``)."""
    try:
        from datasets import ClassLabel, DatasetDict, load_from_disk  # noqa: PLC0415
    except ImportError:
        raise DataError("data.name hf_disk needs the optional package 'datasets': pip install datasets") from None
    p = Path(folder).expanduser()
    if not p.is_dir():
        raise DataError(f"{p}: hf_disk folder not found")
    try:
        dd = load_from_disk(str(p))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise DataError(f"{p}: not a folder written by datasets' save_to_disk ({e})") from None
    if not isinstance(dd, DatasetDict):
        raise DataError(f"{p}: holds a single Dataset; save a DatasetDict with train and eval splits")
    tr_name, tr = _hf_split(dd, train_split, ("train",), p)
    ev_name, ev = _hf_split(dd, eval_split, EVAL_SPLITS, p)
    feature = tr.features.get(label_column)
    label_map = None
    if task_type == "classification" and isinstance(feature, ClassLabel):
        label_map = {i: i for i in range(feature.num_classes)}
    train = _from_rows(tr.column_names, _hf_rows(tr), f"{p}[{tr_name}]", text_columns, label_column, task_type,
                       label_map)
    if label_map is not None:
        train.label_names = tuple(feature.names)
    ev_map = train.label_map if task_type == "classification" else None
    evd = _from_rows(ev.column_names, _hf_rows(ev), f"{p}[{ev_name}]", text_columns, label_column, task_type, ev_map)
    evd.label_names = train.label_names
    return train, evd
