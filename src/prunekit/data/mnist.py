"""MNIST from the standard IDX files (LeCun et al. 1998).

Files, gzipped or raw, in ``<root>/mnist/`` (also ``<root>/MNIST/raw/`` as torchvision lays it out):
``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte`` (each optionally with ``.gz``).

The IDX format: a 4-byte magic ``0x00 0x00 <dtype> <ndim>`` then ``ndim`` big-endian uint32 sizes,
then the data in C order. MNIST uses dtype ``0x08`` (uint8): images ``0x00000803`` with sizes
``(N, 28, 28)``, labels ``0x00000801`` with ``(N,)``. Every check below raises :class:`DataError`
naming the file, because a silently wrong data set is the worst failure a benchmark can have.
Decoding is one ``numpy.frombuffer`` per file (the full 60k train set loads in well under a second);
nothing is cached on disk.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunekit.core.errors import DataError
from prunekit.data.images import ImageDataset
from prunekit.data.paths import resolve_data_root
from prunekit.data.sample import sample_indices

__all__ = ["MEAN", "STD", "CLASSES", "SPLITS", "load_mnist", "read_idx", "find_mnist_dir", "download"]

MEAN = (0.1307,)
STD = (0.3081,)
CLASSES = tuple(str(i) for i in range(10))
SPLITS = {"train": "train", "test": "t10k"}

_IMAGES_MAGIC = 0x00000803
_LABELS_MAGIC = 0x00000801
_IDX_DTYPES: dict[int, np.dtype[Any] | type[np.generic]] = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}

# Well-known MD5s of the four gzipped files, checked by download().
_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://yann.lecun.com/exdb/mnist/")


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _read_exact(f, n: int, path: Path, what: str) -> bytes:
    try:
        data = f.read(n)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot decompress/read {what}: {e}") from e
    if len(data) != n:
        raise DataError(f"{path}: truncated: expected {n} bytes of {what}, found {len(data)}")
    return data


def _read_exact_tail(f, path: Path) -> bytes:
    try:
        return f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot decompress/read the end of the file: {e}") from e


def read_idx(path: str | os.PathLike, magic: int | None = None, limit: int | None = None) -> np.ndarray:
    """Read an IDX file (gzipped if it ends in ``.gz``) into a numpy array.

    ``magic`` (e.g. ``0x00000803``) is the expected magic number; a mismatch raises :class:`DataError`.
    ``limit`` reads only the first ``limit`` items along axis 0 (the rest of the file is not
    decompressed, so trailing corruption is only detected on a full read). A full read also rejects
    trailing bytes after the declared items.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with _open(path) as f:
        head = _read_exact(f, 4, path, "the IDX magic number")
        value = int.from_bytes(head, "big")
        if head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES or head[3] == 0:
            raise DataError(f"{path}: not an IDX file (magic number 0x{value:08x})")
        if magic is not None and value != magic:
            raise DataError(f"{path}: wrong magic number 0x{value:08x}, expected 0x{magic:08x}")
        ndim = head[3]
        dims = tuple(int(d) for d in np.frombuffer(_read_exact(f, 4 * ndim, path, "the IDX sizes"), ">u4"))
        dtype = np.dtype(_IDX_DTYPES[head[2]])
        n = dims[0] if limit is None else min(dims[0], limit)
        item = int(np.prod(dims[1:], dtype=np.int64)) * dtype.itemsize
        data = _read_exact(f, n * item, path, f"data ({n} items of shape {dims[1:]}, header says {dims[0]})")
        if limit is None:
            extra = len(_read_exact_tail(f, path))
            if extra:
                raise DataError(f"{path}: {extra} unexpected bytes after the {dims[0]} items the header declares")
    return np.frombuffer(bytearray(data), dtype=dtype).reshape((n,) + dims[1:])  # bytearray: writable


def find_mnist_dir(root: str | os.PathLike | None = None) -> Path:
    """The folder holding the MNIST IDX files: ``<root>/mnist``, ``<root>/MNIST/raw`` or ``<root>``."""
    base = resolve_data_root(root)
    candidates = [base / "mnist", base / "MNIST" / "raw", base]
    for c in candidates:
        if any((c / f"train-labels-idx1-ubyte{s}").is_file() or (c / f"t10k-labels-idx1-ubyte{s}").is_file()
               for s in (".gz", "")):
            return c
    return candidates[0]


def _file(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder / stem}(.gz): MNIST file not found (run prunekit.data.mnist.download(root) "
                    "on a machine with network access, or point data.root at a folder with mnist/)")


def load_mnist(root: str | os.PathLike | None = None, split: str = "train", limit: int | None = None,
               seed: int = 0) -> ImageDataset:
    """MNIST ``split`` (``train``: 60000, ``test``: 10000) as normalised float32 ``(N, 1, 28, 28)``
    images (mean 0.1307, std 0.3081 of the [0, 1] pixels) and int64 labels; ``limit`` keeps a seeded,
    class-stratified sample of N (:func:`~prunekit.data.sample.sample_indices`), in file order.
    """
    if split not in SPLITS:
        raise DataError(f"unknown MNIST split {split!r}; valid: {', '.join(SPLITS)}")
    folder = find_mnist_dir(root)
    prefix = SPLITS[split]
    img_path = _file(folder, f"{prefix}-images-idx3-ubyte")
    lbl_path = _file(folder, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(img_path, _IMAGES_MAGIC)
    labels = read_idx(lbl_path, _LABELS_MAGIC)
    if images.shape[1:] != (28, 28):
        raise DataError(f"{img_path}: images are {images.shape[1:]}, expected (28, 28)")
    if len(images) != len(labels):
        raise DataError(f"{img_path} has {len(images)} images but {lbl_path} has {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise DataError(f"{lbl_path}: label {int(labels.max())} out of range 0..9")
    if limit is not None and limit < len(labels):
        keep = sample_indices(labels.tolist(), limit, seed)
        images, labels = images[keep], labels[keep]
    x = torch.from_numpy(images).to(torch.float32).unsqueeze(1)  # (N, 1, 28, 28), 0..255
    x.div_(255.0).sub_(MEAN[0]).div_(STD[0])  # in place: the full train set is 188 MB of float32
    y = torch.from_numpy(labels.astype(np.int64))
    return ImageDataset(x, y, name="mnist", split=split, classes=CLASSES, mean=MEAN, std=STD,
                        files=(img_path, lbl_path))


def download(root: str | os.PathLike, mirrors=MIRRORS) -> Path:
    """Fetch the four gzipped IDX files into ``<root>/mnist`` (MD5-checked) and return that folder.

    Needs network access; tries each mirror in turn. Existing files with the right MD5 are kept.
    """
    folder = Path(root).expanduser() / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for name, md5 in _MD5.items():
        target = folder / name
        if target.is_file() and hashlib.md5(target.read_bytes()).hexdigest() == md5:
            continue
        errors = []
        for mirror in mirrors:
            try:
                with urllib.request.urlopen(mirror + name, timeout=60) as r:
                    blob = r.read()
            except OSError as e:
                errors.append(f"{mirror}{name}: {e}")
                continue
            if hashlib.md5(blob).hexdigest() != md5:
                errors.append(f"{mirror}{name}: MD5 mismatch")
                continue
            tmp = target.with_suffix(".part")
            tmp.write_bytes(blob)
            tmp.replace(target)
            break
        else:
            raise DataError(f"could not download {name}: " + "; ".join(errors))
    return folder
