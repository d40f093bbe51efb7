"""CIFAR-10 from the standard binary batches (Krizhevsky 2009).

Files in ``<root>/cifar10/`` or ``<root>/cifar-10-batches-bin/`` (as the binary tarball unpacks):
``data_batch_1.bin`` … ``data_batch_5.bin`` (train, 50000) and ``test_batch.bin`` (test, 10000).
Each record is 3073 bytes: 1 label byte (0–9) then 3072 pixel bytes (1024 R, 1024 G, 1024 B, each a
row-major 32×32 plane), so a record reshapes straight to ``(3, 32, 32)``.

**Sample fallback.** The shared data folder only holds ``data_batch_1_first200.bin`` (the first 200
training records, no test set). When a split's standard files are all absent but that sample is
present, the sample is split deterministically — records 0–159 are ``train``, 160–199 are ``test`` —
and the dataset's ``note`` says so and a :class:`UserWarning` is issued. Numbers measured on it are
smoke-test numbers, never CIFAR-10 results.

Augmentation (``augment=True``, train only) is the usual random 32×32 crop of the 4-pixel zero-padded
image plus a horizontal flip with probability ½, written with torch ops (no torchvision here). It
draws from torch's global RNG, which ``DataLoader`` seeds per worker, so ``torch.manual_seed`` makes
runs reproducible.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
import urllib.request
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from prunekit.core.errors import DataError
from prunekit.data.images import ImageDataset
from prunekit.data.paths import resolve_data_root
from prunekit.data.sample import sample_indices

__all__ = ["MEAN", "STD", "CLASSES", "RECORD_BYTES", "SAMPLE_FILE", "SAMPLE_TRAIN", "load_cifar10",
           "read_batches", "random_crop_flip", "find_cifar10_dir", "download"]

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
RECORD_BYTES = 1 + 3 * 32 * 32
STANDARD_FILES = {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)}
SAMPLE_FILE = "data_batch_1_first200.bin"
SAMPLE_TRAIN = 160  # sample records [0, 160) are train, [160, end) are test
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
URL_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"


def find_cifar10_dir(root: str | os.PathLike | None = None) -> Path:
    """The folder with the batches: ``<root>/cifar10``, ``<root>/cifar-10-batches-bin``,
    ``<root>/cifar10/cifar-10-batches-bin`` or ``<root>`` itself — the first holding any batch file."""
    base = resolve_data_root(root)
    candidates = [base / "cifar10", base / "cifar-10-batches-bin", base / "cifar10" / "cifar-10-batches-bin", base]
    known = STANDARD_FILES["train"] + STANDARD_FILES["test"] + (SAMPLE_FILE,)
    for c in candidates:
        if any((c / f).is_file() for f in known):
            return c
    return candidates[0]


def read_batches(paths, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read binary batch files in order into ``(uint8 images (N, 3, 32, 32), uint8 labels (N,))``.

    Every file's size must be a whole number of 3073-byte records and every label 0–9; otherwise
    :class:`DataError` names the file. ``limit`` stops after that many records in total.
    """
    images, labels, left = [], [], limit
    for path in map(Path, paths):
        if left is not None and left <= 0:
            break
        if not path.is_file():
            raise DataError(f"{path}: CIFAR-10 batch file not found")
        size = path.stat().st_size
        if size % RECORD_BYTES:
            raise DataError(f"{path}: size {size} bytes is not a multiple of the {RECORD_BYTES}-byte record "
                            f"(1 label + 3072 pixels): {size // RECORD_BYTES} whole records and a partial "
                            f"record of {size % RECORD_BYTES} bytes")
        n = size // RECORD_BYTES if left is None else min(size // RECORD_BYTES, left)
        raw = np.fromfile(path, dtype=np.uint8, count=n * RECORD_BYTES).reshape(n, RECORD_BYTES)
        bad = np.flatnonzero(raw[:, 0] > 9)
        if bad.size:
            raise DataError(f"{path}: record {int(bad[0])} has label byte {int(raw[bad[0], 0])}, expected 0-9 "
                            "(is this the CIFAR-100 or python-pickle format?)")
        labels.append(raw[:, 0])
        images.append(raw[:, 1:].reshape(n, 3, 32, 32))
        if left is not None:
            left -= n
    if not images:
        return np.zeros((0, 3, 32, 32), np.uint8), np.zeros((0,), np.uint8)
    return np.concatenate(images), np.concatenate(labels)


def random_crop_flip(images: torch.Tensor, padding: int = 4, fill=None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop of the ``padding``-padded image back to its size, then a random horizontal flip.

    Works on one image ``(C, H, W)`` or a batch ``(N, C, H, W)`` (independent draws per image).
    ``fill`` is the per-channel value of the padding; for normalised images pass the value a black
    pixel takes after normalisation (``-mean/std``), which matches padding the raw image with zeros.
    """
    single = images.dim() == 3
    x = images.unsqueeze(0) if single else images
    n, c, h, w = x.shape
    fill_t = torch.zeros(c, dtype=x.dtype) if fill is None else torch.as_tensor(fill, dtype=x.dtype)
    fill_t = fill_t.to(x.device).view(1, c, 1, 1)
    padded = F.pad(x - fill_t, (padding,) * 4) + fill_t
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = (dy[:, None] + torch.arange(h)).to(x.device)                     # (n, h)
    cols = dx[:, None] + torch.arange(w)                                     # (n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols).to(x.device)
    idx_n = torch.arange(n, device=x.device)[:, None, None]
    out = padded[idx_n, :, rows[:, :, None], cols[:, None, :]]              # (n, h, w, c)
    out = out.permute(0, 3, 1, 2).contiguous()
    return out[0] if single else out


def _class_names(folder: Path) -> tuple[str, ...]:
    meta = folder / "batches.meta.txt"
    if meta.is_file():
        names = tuple(line.strip() for line in meta.read_text().splitlines() if line.strip())
        if len(names) != 10:
            raise DataError(f"{meta}: expected 10 class names, found {len(names)}")
        return names
    return CLASSES


def load_cifar10(root: str | os.PathLike | None = None, split: str = "train", limit: int | None = None,
                 augment: bool = False, seed: int = 0) -> ImageDataset:
    """CIFAR-10 ``split`` (``train``/``test``) as normalised float32 ``(N, 3, 32, 32)`` images and int64 labels.

    Uses the standard batches when the split's files are all there; otherwise the 200-record sample
    (see the module docstring; ``note`` is set and a warning issued). ``limit`` keeps a seeded,
    class-stratified sample of N of the split (:func:`~prunekit.data.sample.sample_indices`), in file order. ``augment=True`` adds random crop + flip in ``__getitem__`` (train split only).
    """
    if split not in STANDARD_FILES:
        raise DataError(f"unknown CIFAR-10 split {split!r}; valid: {', '.join(STANDARD_FILES)}")
    if augment and split != "train":
        raise DataError("augment=True is for the train split only")
    folder = find_cifar10_dir(root)
    wanted = [folder / f for f in STANDARD_FILES[split]]
    present = [p for p in wanted if p.is_file()]
    note = None
    if len(present) == len(wanted):
        images, labels = read_batches(wanted)
        files = wanted
    elif present:
        missing = [p.name for p in wanted if not p.is_file()]
        raise DataError(f"{folder}: incomplete CIFAR-10 {split} set, missing {', '.join(missing)}")
    elif (folder / SAMPLE_FILE).is_file():
        other = "test" if split == "train" else "train"
        if any((folder / f).is_file() for f in STANDARD_FILES[other]):
            raise DataError(f"{folder}: standard {other} files exist but the {split} files "
                            f"({', '.join(STANDARD_FILES[split])}) are missing; refusing to mix in the sample")
        sample = folder / SAMPLE_FILE
        images, labels = read_batches([sample])
        lo, hi = (0, SAMPLE_TRAIN) if split == "train" else (SAMPLE_TRAIN, len(labels))
        if hi <= lo:
            raise DataError(f"{sample}: only {len(labels)} records, too few for the {SAMPLE_TRAIN}-record train part")
        images, labels = images[lo:hi], labels[lo:hi]
        note = (f"CIFAR-10 standard batches not found in {folder}; using the {split} part "
                f"(records {lo}-{hi - 1}) of the {SAMPLE_FILE} sample: {len(labels)} images. "
                "Smoke-test data only; not CIFAR-10 results.")
        warnings.warn(note, UserWarning, stacklevel=2)
        files = [sample]
    else:
        raise DataError(f"{folder}: no CIFAR-10 files ({', '.join(STANDARD_FILES[split])} or {SAMPLE_FILE}); "
                        "run prunekit.data.cifar10.download(root) on a machine with network access")
    if limit is not None and limit < len(labels):
        keep = sample_indices(labels.tolist(), limit, seed)
        images, labels = images[keep], labels[keep]
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0).sub_(mean).div_(std)
    y = torch.from_numpy(labels.astype(np.int64))
    transform = None
    if augment:
        black = [-m / s for m, s in zip(MEAN, STD)]
        transform = partial(random_crop_flip, padding=4, fill=black)
    return ImageDataset(x, y, name="cifar10", split=split, classes=_class_names(folder), mean=MEAN, std=STD,
                        transform=transform, note=note, files=files)


def download(root: str | os.PathLike, url: str = URL) -> Path:
    """Fetch and unpack the binary tarball into ``<root>/cifar-10-batches-bin`` (MD5-checked); needs network."""

    base = Path(root).expanduser()
    base.mkdir(parents=True, exist_ok=True)
    target = base / "cifar-10-batches-bin"
    if all((target / f).is_file() for f in STANDARD_FILES["train"] + STANDARD_FILES["test"]):
        return target
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        archive = Path(tmp) / "cifar-10-binary.tar.gz"
        try:
            urllib.request.urlretrieve(url, archive)
        except OSError as e:
            raise DataError(f"could not download {url}: {e}") from e
        if hashlib.md5(archive.read_bytes()).hexdigest() != URL_MD5:
            raise DataError(f"{url}: MD5 mismatch, expected {URL_MD5}")
        with tarfile.open(archive) as tar:
            tar.extractall(base, filter="data")
    return target
