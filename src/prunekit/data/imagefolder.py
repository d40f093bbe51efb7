"""The user's own images in torchvision's ``ImageFolder`` layout, read with Pillow::

    root/train/<class>/*.png|*.jpg|*.jpeg
    root/val/<class>/...            (``test`` or ``eval`` are accepted as the eval folder too)

Classes are the sub-folders of ``train``, sorted by name; class id ``i`` is the ``i``-th of them.
A ``val`` class that ``train`` lacks is an error (its id would mean nothing); a ``train`` class with no
``val`` images is fine.  Images are converted to RGB (or ``L`` with ``grayscale``), resized to
``image_size`` (bilinear, Pillow) when given, scaled to [0, 1], then normalised per channel with
``mean``/``std`` (defaults 0 and 1: no change).  Without ``image_size`` every image must already have
the same size.  Every problem — no images, an unreadable or corrupt file, mixed sizes — raises
:class:`DataError` naming the file before any training.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch

from prunekit.core.errors import DataError
from prunekit.data.cifar10 import random_crop_flip
from prunekit.data.images import ImageDataset
from prunekit.data.sample import sample_indices

__all__ = ["IMAGE_EXTENSIONS", "EVAL_DIRS", "list_classes", "list_images", "read_image", "load_imagefolder"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
EVAL_DIRS = ("val", "test", "eval")


def list_classes(split_dir: Path) -> list[str]:
    """Sorted names of the sub-folders of ``split_dir`` (hidden folders ignored)."""
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: image folder not found (expected <root>/train/<class>/ and <root>/val/<class>/)")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{split_dir}: no class sub-folders (expected {split_dir}/<class>/*.png)")
    return classes


def list_images(class_dir: Path) -> list[Path]:
    """Image files of one class folder (extensions :data:`IMAGE_EXTENSIONS`, any case), sorted."""
    return sorted(p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def read_image(path: Path, image_size: tuple[int, int] | None, grayscale: bool) -> np.ndarray:
    """One image as float32 ``(C, H, W)`` in [0, 1]; :class:`DataError` naming ``path`` if unreadable."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415  (Pillow: optional, only for image folders)
    try:
        with Image.open(path) as im:
            im = im.convert("L" if grayscale else "RGB")
            if image_size is not None:
                im = im.resize((image_size[1], image_size[0]), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable or corrupt image ({type(e).__name__}: {e})") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _size(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return (image_size, image_size)
    if len(image_size) != 2:
        raise DataError(f"image_size must be an int or [height, width], got {list(image_size)}")
    return (int(image_size[0]), int(image_size[1]))


def _eval_dir(root: Path) -> Path:
    for name in EVAL_DIRS:
        if (root / name).is_dir():
            return root / name
    raise DataError(f"{root}: no eval folder; expected one of {', '.join(f'{root}/{n}/' for n in EVAL_DIRS)}")


def _channel_stats(values: Sequence[float] | None, channels: int, default: float, key: str) -> torch.Tensor:
    if values is None:
        return torch.full((channels,), default)
    vals = [float(v) for v in values]
    if len(vals) == 1:
        vals = vals * channels
    if len(vals) != channels:
        raise DataError(f"data.{key} has {len(vals)} values but the images have {channels} channel(s)")
    if key == "std" and any(v <= 0 for v in vals):
        raise DataError(f"data.std must be > 0, got {vals}")
    return torch.tensor(vals)


def load_imagefolder(root: str | os.PathLike, split: str = "train", *, image_size: int | Sequence[int] | None = None,
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                     grayscale: bool = False, limit: int | None = None, augment: bool = False,
                     seed: int = 0) -> ImageDataset:
    """Read split ``train`` or ``val`` (aliases ``test``/``eval``) into an :class:`ImageDataset`.

    ``limit`` keeps a seeded, class-stratified sample of ``limit`` images
    (:func:`~prunekit.data.sample.sample_indices`: every class in proportion to its size, ``seed`` picks
    the files); only those files are read.  ``augment`` (train only)
    adds the CIFAR-style random crop of the (H/8)-padded image plus a horizontal flip."""
    root = Path(root).expanduser()
    classes = list_classes(root / "train")
    split_dir = root / "train" if split == "train" else _eval_dir(root)
    present = list_classes(split_dir)
    unknown = [c for c in present if c not in classes]
    if unknown:
        raise DataError(f"{split_dir / unknown[0]}: class {unknown[0]!r} is not a class of the train folder "
                        f"{root / 'train'} (train classes: {classes})")
    files = [(f, classes.index(c)) for c in present for f in list_images(split_dir / c)]
    if not files:
        raise DataError(f"{split_dir}: no images ({'/'.join(IMAGE_EXTENSIONS)}) in the class folders {present}")
    files = [files[i] for i in sample_indices([y for _, y in files], limit, seed)]
    size = _size(image_size)
    arrays = [read_image(f, size, grayscale) for f, _ in files]
    first = arrays[0].shape
    for (f, _), a in zip(files, arrays):
        if a.shape != first:
            raise DataError(f"{f}: image is {a.shape[2]}x{a.shape[1]} but {files[0][0]} is {first[2]}x{first[1]}; "
                            "set data.image_size to resize every image")
    images = torch.from_numpy(np.stack(arrays))
    m = _channel_stats(mean, images.shape[1], 0.0, "mean")
    s = _channel_stats(std, images.shape[1], 1.0, "std")
    images = (images - m[None, :, None, None]) / s[None, :, None, None]
    labels = torch.tensor([y for _, y in files], dtype=torch.long)
    transform = None
    if augment and split == "train":
        transform = partial(random_crop_flip, padding=max(1, images.shape[2] // 8), fill=(-m / s).tolist())
    return ImageDataset(images, labels, name="imagefolder", split="train" if split == "train" else split_dir.name,
                        classes=classes, mean=m.tolist(), std=s.tolist(), transform=transform,
                        files=[f for f, _ in files])
