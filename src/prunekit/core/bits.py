"""The one bit-packer: non-negative integers of ``k`` bits each ↔ a ``uint8`` byte array.

Every on-disk format that packs bits uses it (checkpoint masks, storage indices and codebooks,
shared-weight level maps), so the layouts are defined once:

* ``k`` bits per value, the value's bits **least-significant first**, values in order;
* the resulting bit stream is cut into bytes by :func:`numpy.packbits` with ``bitorder``:
  ``"little"`` (bit 0 of a byte is the first bit of the stream) or ``"big"`` (numpy's default, the
  first bit of the stream is the byte's most significant bit).  A 1-bit ``"big"`` stream is exactly
  ``numpy.packbits(mask)``; the last byte is zero-padded.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = ["pack", "unpack", "bits_for", "pack_mask", "unpack_mask"]


def bits_for(n_symbols: int) -> int:
    """Bits needed to tell ``n_symbols`` symbols apart (0 for one symbol)."""
    return max(0, int(n_symbols - 1).bit_length())


def pack(values: np.ndarray, bits: int, *, bitorder: Literal["big", "little"] = "little") -> np.ndarray:
    """Pack non-negative integers (or bools, ``bits=1``) with ``bits`` bits each → ``uint8`` array."""
    v = np.asarray(values).reshape(-1)
    if bits == 0 or v.size == 0:
        return np.zeros(0, dtype=np.uint8)
    if bits == 1:
        planes = v.astype(bool)
    else:
        planes = ((v.astype(np.uint64)[:, None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder=bitorder)


def unpack(packed: np.ndarray, bits: int, count: int, *, bitorder: Literal["big", "little"] = "little") -> np.ndarray:
    """Inverse of :func:`pack`: ``count`` values (``uint64``; ``bool`` when ``bits == 1``)."""
    if bits == 1:
        return np.unpackbits(np.asarray(packed, dtype=np.uint8), count=count, bitorder=bitorder).astype(bool)
    if bits == 0 or count == 0:
        return np.zeros(count, dtype=np.uint64)
    planes = np.unpackbits(np.asarray(packed, dtype=np.uint8), count=count * bits, bitorder=bitorder)
    bit_planes = planes.reshape(count, bits).astype(np.uint64)
    out: np.ndarray = (bit_planes << np.arange(bits, dtype=np.uint64)).sum(axis=1, dtype=np.uint64)
    return out


def pack_mask(m: Tensor) -> Tensor:
    """Bool mask → ``uint8`` 1-D tensor, 8 entries per byte in ``numpy.packbits`` order (MSB first)."""
    return torch.from_numpy(pack(m.detach().cpu().numpy().astype(bool), 1, bitorder="big"))


def unpack_mask(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`pack_mask`."""
    n = math.prod(shape) if len(shape) else 1
    return torch.from_numpy(unpack(packed.cpu().numpy(), 1, n, bitorder="big")).reshape(tuple(shape))
