"""Language-modelling data: text files (or a ``save_to_disk`` folder) cut into fixed-length token windows.

The texts of a split are read in file order — ``.txt``: one text per non-empty line; ``.jsonl``: the
``text_columns[0]`` field of every record (default ``text``); ``.csv`` / ``.tsv``: that column (e.g. the
``sentence`` column of the GLUE SST-2 files); an ``hf_disk`` folder: that column of the split.  Every text is
tokenised without special tokens and followed by one separator token (the tokenizer's ``eos`` token, else
its ``sep`` token), the ids of all texts are concatenated, and the stream is cut into non-overlapping
windows of exactly ``length`` tokens; the last, shorter rest is dropped.  A window is one example
``{"input_ids": (length,)}``; the causal-LM loss predicts every token of a window from the ones before it
(``length - 1`` predictions per window).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from prunekit.core.errors import DataError
from prunekit.data.table import read_table

__all__ = ["LMWindows", "read_texts", "read_hf_disk_texts", "separator_id", "token_windows"]

TEXT_FORMATS = ("txt", "jsonl", "csv", "tsv")


def _format(path: Path, fmt: str | None) -> str:
    f = (fmt or path.suffix.lstrip(".")).lower()
    if f not in TEXT_FORMATS:
        raise DataError(f"{path}: cannot tell the text format from the extension; set data.format to one of "
                        f"{list(TEXT_FORMATS)}")
    return f


def _table_texts(p: Path, f: str, column: str | None) -> list[str]:
    """The ``column`` of a CSV/TSV/JSONL file, read by the one table reader (:func:`~prunekit.data.table.read_table`:
    line-numbered errors for malformed rows)."""
    key = column or ("text" if f == "jsonl" else None)
    if key is None:
        raise DataError(f"{p}: a {f} file needs data.text_columns: [COLUMN]")
    columns, rows = read_table(p, f)
    missing = next((line for line, r in rows if key not in r), None)
    if missing is not None:
        where = f"{p}:{missing}: no field {key!r}" if f == "jsonl" else f"{p}: no column {key!r}; columns: {columns}"
        raise DataError(f"{where} (set data.text_columns: [FIELD])")
    return [str(r[key] or "") for _, r in rows]


def read_texts(path: str | os.PathLike, fmt: str | None = None, column: str | None = None) -> list[str]:
    """The texts of one file (see the module doc); ``column`` = the jsonl/csv/tsv field (jsonl default ``text``)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: text file not found")
    f = _format(p, fmt)
    if f == "txt":
        with p.open(encoding="utf-8") as fh:
            texts = [ln.strip() for ln in fh]
    else:
        texts = _table_texts(p, f, column)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"{p}: no text")
    return texts


def read_hf_disk_texts(folder: str | os.PathLike, split: str, column: str | None) -> list[str]:
    """The ``column`` (default ``text``) of split ``split`` of a ``DatasetDict`` written by ``save_to_disk``."""
    try:
        from datasets import load_from_disk  # noqa: PLC0415
    except ImportError:
        raise DataError("data.name hf_disk needs the optional package 'datasets': pip install datasets") from None
    p = Path(folder).expanduser()
    try:
        dd = load_from_disk(str(p))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise DataError(f"{p}: not a folder written by datasets' save_to_disk ({e})") from None
    if split not in dd:
        raise DataError(f"{p}: no split {split!r}; splits: {list(dd)}")
    key = column or "text"
    if key not in dd[split].column_names:
        raise DataError(f"{p}[{split}]: no column {key!r}; columns: {dd[split].column_names}")
    return [str(t) for t in dd[split][key] if str(t).strip()]


def separator_id(tokenizer: Any) -> int:
    """The token put after every text: ``eos``, else ``sep``."""
    for k in ("eos_token_id", "sep_token_id"):
        v = getattr(tokenizer, k, None)
        if v is not None:
            return int(v)
    raise DataError(f"tokenizer {type(tokenizer).__name__} has neither an eos nor a sep token to separate texts")


def token_windows(texts: Sequence[str], tokenizer: Any, length: int) -> Tensor:
    """``(n, length)`` int64 windows of the concatenated token stream (see the module doc)."""
    if length < 2:
        raise DataError(f"a language-modelling window needs >= 2 tokens, got {length}")
    sep = separator_id(tokenizer)
    enc = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    stream = [i for ids in enc for i in (*ids, sep)]
    n = len(stream) // length
    if n == 0:
        raise DataError(f"{len(stream)} tokens give no window of {length} tokens; use more text or a shorter "
                        "data.max_length")
    return torch.tensor(stream[:n * length], dtype=torch.long).reshape(n, length)


class LMWindows(torch.utils.data.Dataset):
    """Map-style data set of token windows; item ``i`` = ``{"input_ids": windows[i]}``."""

    def __init__(self, windows: Tensor, path: str = ""):
        self.windows, self.path = windows, path

    def __len__(self) -> int:
        return int(self.windows.shape[0])

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.windows[i]}
