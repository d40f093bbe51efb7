"""The image data set every image reader returns."""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import TensorDataset

__all__ = ["ImageDataset"]


class ImageDataset(TensorDataset):
    """A :class:`~torch.utils.data.TensorDataset` of ``(image, label)`` with the facts a run needs.

    ``tensors[0]`` holds the normalised float32 images ``(N, C, H, W)``; ``tensors[1]`` the int64
    labels ``(N,)``. ``transform`` (if given) is applied to one image in ``__getitem__`` — used for
    train-time augmentation, so the stored tensors stay the deterministic, normalised data.
    ``note`` is a human-readable remark about where the data came from when that is not the
    standard files (e.g. the CIFAR-10 200-image sample); it is ``None`` for standard data.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        name: str,
        split: str,
        classes: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        note: str | None = None,
        files: Sequence[os.PathLike | str] = (),
    ) -> None:
        super().__init__(images, labels)
        self.name = name
        self.split = split
        self.classes = tuple(classes)
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.transform = transform
        self.note = note
        self.files = tuple(str(f) for f in files)

    @property
    def images(self) -> torch.Tensor:
        return self.tensors[0]

    @property
    def labels(self) -> torch.Tensor:
        return self.tensors[1]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __getitem__(self, index):
        image, label = self.tensors[0][index], self.tensors[1][index]
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    def __repr__(self) -> str:
        extra = f", note={self.note!r}" if self.note else ""
        return (f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"shape={tuple(self.images.shape[1:])}, classes={self.num_classes}{extra})")
