"""Lossless sparse storage encodings for (mostly zero) weight tensors.

Every encoding is a pair of pure functions, ``encode(tensor, name, **opts) -> Encoded`` and
``decode(Encoded) -> torch.Tensor``; ``decode(encode(t, ...))`` is *bitwise* equal to ``t``
(same dtype, same shape, same bit patterns: NaN payloads and ``-0.0`` included).

Conventions shared by all encodings
-----------------------------------
* **Matrix view.** A tensor of shape ``(d0, d1, ...)`` is viewed as a row-major matrix with
  ``rows = d0`` (output units) and ``cols = d1 * d2 * ...``; a 1-d tensor is one row, a 0-d tensor
  is ``1 x 1``. Row-based formats (csr, relative, bcsr) and group-based formats (nm, pattern) work
  on this view, so a conv weight ``(out, in, kh, kw)`` has one row per output channel and its
  ``kh * kw`` kernels are consecutive groups of a row.
* **Zero.** An element is zero when it compares equal to ``0`` (so ``-0.0`` is zero; masking by
  multiplication, ``w * 0``, produces ``-0.0`` for negative ``w``). Sparsity = fraction of zeros.
* **Values are stored as raw bits** (``uint8/16/32/64`` arrays of the element width), so every
  dtype - bfloat16 and float8 included - round-trips exactly.
* **Negative zeros.** To stay bitwise lossless, the sparse encodings (everything but ``dense``)
  record the positions of ``-0.0`` elements in one extra index array, only when there are any:
  ``negzero_idx`` (flat indices, smallest unsigned dtype) or ``negzero_mask`` (one packed bit per
  element), whichever is smaller. Its bytes count as index bytes. Call ``canonicalize_zeros``
  first if you would rather drop the sign of zero.
* **Byte accounting.** ``Encoded.value_bytes`` is the size of the stored ``values`` array - what
  the format stores as weight values, *including* zeros it has to store explicitly (relative-index
  fillers, zeros inside bcsr blocks, N:M padding slots); ``index_bytes`` is everything else
  (masks, pointers, indices, codebooks). ``overhead_bytes = nbytes - nnz * itemsize`` is the cost
  beyond the true nonzero values. Shape/dtype/options live in JSON metadata and are not counted.
* **Index dtypes.** Pointer arrays use the smallest unsigned dtype holding their largest value
  (uint8/uint16/uint32/uint64); column indices use the smallest one holding ``cols - 1`` (a
  function of the shape, not of the data). Sub-byte indices are bit-packed, LSB first.

Encodings (see each ``_encode_*`` docstring for the exact layout):
``dense``, ``bitmask``, ``csr``, ``relative``, ``bcsr``, ``nm``, ``pattern``.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from prunekit.core.bits import bits_for as _bits_for
from prunekit.core.bits import pack, unpack
from prunekit.core.errors import ModelError
from prunekit.core.structures import NM, Pattern, Structure

__all__ = [
    "ENCODINGS",
    "Encoded",
    "encode",
    "decode",
    "encode_dense",
    "encode_bitmask",
    "encode_csr",
    "encode_relative",
    "encode_bcsr",
    "encode_nm",
    "encode_pattern",
    "is_applicable",
    "best_encoding",
    "encoding_table",
    "theoretical_min_bytes",
    "breakeven_sparsity",
    "canonicalize_zeros",
    "to_safetensors_dict",
    "from_safetensors_dict",
    "encode_state_dict",
    "decode_state_dict",
]

# Tie-break order for best_encoding: simplest first.
ENCODINGS: tuple[str, ...] = ("dense", "bitmask", "csr", "bcsr", "nm", "relative", "pattern")

_BITS_DTYPE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_SIGNED_TORCH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_NP_TO_TORCH = {
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.int8): torch.int8,
    np.dtype(np.int16): torch.int16,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.int64): torch.int64,
}
_STATE_DICT_FORMAT = "prunekit.storage/1"


# --------------------------------------------------------------------------------------------
# The container
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)  # eq on numpy arrays is ambiguous
class Encoded:
    """One encoded tensor: named numpy arrays plus what is needed to rebuild the tensor.

    ``arrays["values"]`` always holds the stored values as raw bits; every other array is index
    data. ``params`` holds JSON-able encoding options (block size, bit width, N, M, ...).
    """

    encoding: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    arrays: dict[str, np.ndarray]
    params: dict[str, Any] = field(default_factory=dict)
    nnz: int = 0

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values()))

    @property
    def value_bytes(self) -> int:
        return int(self.arrays["values"].nbytes)

    @property
    def index_bytes(self) -> int:
        return self.nbytes - self.value_bytes

    @property
    def dense_bytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)

    @property
    def overhead_bytes(self) -> int:
        """Bytes beyond the true nonzero values (indices, masks, explicitly stored zeros)."""
        return self.nbytes - self.nnz * _itemsize(self.dtype)

    @property
    def meta(self) -> dict[str, Any]:
        """JSON-able description (everything but the array contents)."""
        return {
            "encoding": self.encoding,
            "shape": list(self.shape),
            "dtype": _dtype_name(self.dtype),
            "params": self.params,
            "nnz": self.nnz,
            "arrays": {k: [a.dtype.str, list(a.shape)] for k, a in self.arrays.items()},
        }

    def __repr__(self) -> str:
        return (
            f"Encoded({self.encoding}, shape={self.shape}, dtype={_dtype_name(self.dtype)}, "
            f"nnz={self.nnz}, nbytes={self.nbytes}, index_bytes={self.index_bytes}, "
            f"value_bytes={self.value_bytes}, params={self.params})"
        )


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ModelError(f"unknown torch dtype {name!r}")
    return dt


def _uint_for(max_value: int) -> type:
    """Smallest unsigned numpy dtype that holds ``max_value``."""
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if max_value <= np.iinfo(dt).max:
            return dt
    raise ModelError(f"index value {max_value} does not fit in uint64")


def _matrix_dims(shape: Sequence[int]) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, int(shape[0])
    return int(shape[0]), math.prod(shape[1:])


def _to_bits(t: torch.Tensor) -> np.ndarray:
    """Flat numpy array of the raw bit patterns of ``t`` (unsigned, same element width)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"expected a strided (dense-layout) tensor, got layout {t.layout}")
    if t.is_complex() or t.is_quantized:
        raise TypeError(f"unsupported dtype {t.dtype}")
    t = t.detach().to("cpu").contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    size = t.element_size()
    if t.dtype != torch.uint8:
        t = t.view(_SIGNED_TORCH[size])
    return t.numpy().view(_BITS_DTYPE[size]).copy()


def _from_bits(bits: np.ndarray, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    size = _itemsize(dtype)
    arr = np.ascontiguousarray(bits.reshape(-1)).view(_BITS_DTYPE[size])
    if size == 1:
        t = torch.from_numpy(arr.copy())
    else:
        t = torch.from_numpy(arr.view(np.dtype(f"int{8 * size}")).copy())
    if dtype != t.dtype:
        t = t.view(dtype)
    return t.reshape(tuple(shape))


def _zero_mask(t: torch.Tensor) -> np.ndarray:
    """Flat bool array: element compares equal to 0 (``-0.0`` counts as zero)."""
    t = t.detach().to("cpu").reshape(-1)
    if t.is_floating_point() and t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        t = t.to(torch.float32)  # float8 and friends: compare through float32 (exact)
    return (t == 0).numpy()


def _row_ptr(row_of_entry: np.ndarray, rows: int) -> np.ndarray:
    counts = np.bincount(row_of_entry, minlength=rows) if row_of_entry.size else np.zeros(rows, np.int64)
    ptr = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    return ptr.astype(_uint_for(int(ptr[-1])))


# --------------------------------------------------------------------------------------------
# Encoders. Each gets the raw bits as a (rows, cols) matrix, the nonzero mask of the same shape
# and the tensor shape; returns (arrays, params). ``values`` must be present in arrays.
# --------------------------------------------------------------------------------------------
def _encode_dense_impl(bits2d, nz2d, shape, **opts):
    """``values``: all elements, raw bits, in the tensor's shape. No index data."""
    _no_opts("dense", opts)
    return {"values": bits2d.reshape(tuple(shape))}, {}


def _decode_dense_impl(arrays, params, rows, cols):
    return arrays["values"].reshape(rows, cols)


def _encode_bitmask_impl(bits2d, nz2d, shape, **opts):
    """``mask``: ``numpy.packbits`` of the row-major nonzero mask (ceil(numel / 8) bytes, MSB
    first); ``values``: the nonzero values in row-major order."""
    _no_opts("bitmask", opts)
    return {"mask": pack(nz2d, 1, bitorder="big"), "values": bits2d[nz2d]}, {}


def _decode_bitmask_impl(arrays, params, rows, cols):
    mask = unpack(arrays["mask"], 1, rows * cols, bitorder="big").reshape(rows, cols)
    out = np.zeros((rows, cols), dtype=arrays["values"].dtype)
    out[mask] = arrays["values"]
    return out


def _encode_csr_impl(bits2d, nz2d, shape, **opts):
    """``row_ptr`` (rows + 1, smallest uint holding nnz), ``col_idx`` (nnz, smallest uint holding
    cols - 1), ``values`` (nnz)."""
    _no_opts("csr", opts)
    rows, cols = nz2d.shape
    r, c = np.nonzero(nz2d)
    return {
        "row_ptr": _row_ptr(r, rows),
        "col_idx": c.astype(_uint_for(max(cols - 1, 0))),
        "values": bits2d[r, c],
    }, {}


def _decode_csr_impl(arrays, params, rows, cols):
    ptr = arrays["row_ptr"].astype(np.int64)
    out = np.zeros((rows, cols), dtype=arrays["values"].dtype)
    r = np.repeat(np.arange(rows), np.diff(ptr))
    out[r, arrays["col_idx"].astype(np.int64)] = arrays["values"]
    return out


def _relative_gaps(nz2d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and zero-gap (zeros skipped since the previous nonzero of the same row) per nonzero."""
    r, c = np.nonzero(nz2d)
    prev = np.empty_like(c)
    if c.size:
        prev[1:] = c[:-1]
        prev[0] = -1
        prev[np.r_[True, r[1:] != r[:-1]]] = -1
    return r, c - prev - 1


def _relative_size(gaps: np.ndarray, bits: int, itemsize: int) -> int:
    entries = int(gaps.size + (gaps >> bits).sum())
    return math.ceil(entries * bits / 8) + entries * itemsize + np.dtype(_uint_for(entries)).itemsize


def _encode_relative_impl(bits2d, nz2d, shape, *, bits: int | None = None, **opts):
    """Relative (delta) column indices within each row, as in Han et al., *Deep Compression*
    (ICLR 2016), Sec. 3 / Fig. 2.

    Each stored entry carries a ``bits``-wide *gap* = number of zero columns skipped since the
    previous entry of the same row (or since column 0 for the first entry of a row), so its
    column is ``previous_column + gap + 1``. **Filler rule:** a gap ``G`` larger than
    ``2**bits - 1`` is split by ``G // 2**bits`` filler entries, each with gap ``2**bits - 1``
    and an explicit zero value, followed by the real entry with gap ``G % 2**bits``.
    Trailing zeros of a row need no entry.

    Arrays: ``row_ptr`` (rows + 1, entries incl. fillers), ``gaps`` (bit-packed, LSB first),
    ``values`` (entries incl. filler zeros). ``bits`` in 1..16; ``None`` (default) picks the
    width giving the fewest total bytes for this tensor (Deep Compression used 8 for conv and 5
    for fully connected layers).
    """
    _no_opts("relative", opts)
    rows, cols = nz2d.shape
    r, g = _relative_gaps(nz2d)
    itemsize = bits2d.dtype.itemsize
    if bits is None:
        bits = min(range(1, 17), key=lambda b: (_relative_size(g, b, itemsize), b))
    if not (isinstance(bits, int) and 1 <= bits <= 16):
        raise ModelError(f"relative: bits must be an int in 1..16, got {bits!r}")
    span = 1 << bits
    count = g // span + 1  # fillers + the real entry, per nonzero
    total = int(count.sum())
    owner = np.repeat(np.arange(g.size), count)
    last = np.cumsum(count) - 1
    is_real = np.zeros(total, dtype=bool)
    is_real[last] = True
    gaps = np.full(total, span - 1, dtype=np.int64)
    gaps[last] = g % span
    values = np.zeros(total, dtype=bits2d.dtype)
    values[last] = bits2d[nz2d]
    return {
        "row_ptr": _row_ptr(r[owner] if total else np.zeros(0, np.int64), rows),
        "gaps": pack(gaps, bits),
        "values": values,
    }, {"bits": bits}


def _decode_relative_impl(arrays, params, rows, cols):
    ptr = arrays["row_ptr"].astype(np.int64)
    total = int(ptr[-1])
    step = unpack(arrays["gaps"], params["bits"], total).astype(np.int64) + 1
    cs = np.cumsum(step)
    base = np.r_[0, cs][ptr[:-1]]  # cumulative steps before each row starts
    r = np.repeat(np.arange(rows), np.diff(ptr))
    col = cs - base[r] - 1
    out = np.zeros((rows, cols), dtype=arrays["values"].dtype)
    out[r, col] = arrays["values"]
    return out


def _encode_bcsr_impl(bits2d, nz2d, shape, *, block: Sequence[int] = (4, 4), **opts):
    """Block CSR with ``block = (R, C)`` blocks over the matrix view.

    A block is stored when any of its elements is nonzero. **Edge blocks:** when R or C does not
    divide the matrix, the matrix is conceptually zero-padded up to the next multiple; edge
    blocks are stored full size (their padding counts in ``values``) and ``decode`` crops.
    Arrays: ``block_row_ptr`` (ceil(rows/R) + 1), ``block_col_idx`` (smallest uint holding
    ceil(cols/C) - 1), ``values`` (n_blocks x R x C, row-major inside a block).
    """
    _no_opts("bcsr", opts)
    R, C = _parse_block(block)
    rows, cols = nz2d.shape
    nbr, nbc = -(-rows // R), -(-cols // C)
    pb = np.zeros((nbr * R, nbc * C), dtype=bits2d.dtype)
    pb[:rows, :cols] = bits2d
    pm = np.zeros((nbr * R, nbc * C), dtype=bool)
    pm[:rows, :cols] = nz2d
    occupied = pm.reshape(nbr, R, nbc, C).any(axis=(1, 3))
    br, bc = np.nonzero(occupied)
    blocks = pb.reshape(nbr, R, nbc, C).transpose(0, 2, 1, 3)[br, bc]
    return {
        "block_row_ptr": _row_ptr(br, nbr),
        "block_col_idx": bc.astype(_uint_for(max(nbc - 1, 0))),
        "values": np.ascontiguousarray(blocks),
    }, {"block": [R, C]}


def _decode_bcsr_impl(arrays, params, rows, cols):
    R, C = params["block"]
    nbr, nbc = -(-rows // R), -(-cols // C)
    ptr = arrays["block_row_ptr"].astype(np.int64)
    br = np.repeat(np.arange(nbr), np.diff(ptr))
    bc = arrays["block_col_idx"].astype(np.int64)
    out = np.zeros((nbr, nbc, R, C), dtype=arrays["values"].dtype)
    out[br, bc] = arrays["values"].reshape(-1, R, C)
    return out.transpose(0, 2, 1, 3).reshape(nbr * R, nbc * C)[:rows, :cols]


def _parse_block(block, what: str = "bcsr: block") -> tuple[int, int]:
    try:
        R, C = (int(b) for b in block)
    except (TypeError, ValueError):
        raise ModelError(f"{what} must be a pair (R, C) of positive ints, got {block!r}") from None
    if R < 1 or C < 1:
        raise ModelError(f"{what} must be a pair (R, C) of positive ints, got {block!r}")
    return R, C


def _layout(st: Structure, shape: Sequence[int]) -> np.ndarray:
    """``(G, S)`` flat row-major element indices of ``st``'s groups on ``shape`` (its
    :meth:`~prunekit.core.structures.Structure.group_index`), padding slots pointing at ``numel``: one
    extra, always-zero slot past the end.  The group layout is the structure's, never re-derived here."""
    n = math.prod(shape)
    if n == 0:
        return np.zeros((0, 1), dtype=np.int64)
    idx = st.group_index(tuple(shape)).numpy()
    return np.where(idx >= 0, idx, n)


def _gather(a2d: np.ndarray, idx: np.ndarray, fill: Any = 0) -> np.ndarray:
    """``a2d`` (rows x cols) gathered into the ``(G, S)`` layout ``idx`` (padding = ``fill``)."""
    flat = np.append(a2d.reshape(-1), np.array([fill], dtype=a2d.dtype))
    return flat[idx]


def _scatter(groups: np.ndarray, idx: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Inverse of :func:`_gather`: the ``(G, S)`` values placed back in a ``rows x cols`` matrix."""
    flat = np.zeros(rows * cols + 1, dtype=groups.dtype)
    flat[idx.reshape(-1)] = groups.reshape(-1)
    return flat[:-1].reshape(rows, cols)


def _combinations(m: int, n: int) -> np.ndarray:
    combos = list(itertools.combinations(range(m), n))
    return np.array(combos, dtype=np.int64).reshape(len(combos), n)


def _encode_nm_impl(bits2d, nz2d, shape, *, n: int | None = None, m: int = 4, index: str = "combination", **opts):
    """N:M storage: every group of ``m`` consecutive elements of a row keeps exactly ``n`` slots.

    The groups are those of the N:M structure (:class:`prunekit.core.structures.NM`): the M-runs of
    each row of the matrix view, the last run of a row partial (zero-padded) when ``m`` does not divide
    the row length.  ``n=None`` (default) uses the largest nonzero count of any group, so the encoding
    is lossless for any tensor. Groups with fewer than ``n``
    nonzeros are padded with their lowest-index zero positions (stored as explicit zero values).
    ``values``: n per group, in position order. Index data, exactly:

    * ``index="combination"`` (default): ``groups`` = the rank of the group's kept-position set
      among the C(m, n) subsets in lexicographic order, packed with ceil(log2 C(m, n)) bits per
      group: **3 bits per group of 4 for 2:4** (C(4,2) = 6), 0 bits when n = m.
    * ``index="positions"``: ``positions`` = each kept slot's position in its group, packed with
      ceil(log2 m) bits: **2 bits per kept value, 4 bits per group for 2:4** (the layout of
      NVIDIA sparse tensor-core metadata).
    """
    _no_opts("nm", opts)
    if not (isinstance(m, int) and 1 <= m <= 16):
        raise ModelError(f"nm: m must be an int in 1..16, got {m!r}")
    if index not in ("combination", "positions"):
        raise ModelError(f"nm: index must be one of ['combination', 'positions'], got {index!r}")
    idx = _layout(NM(1, m), nz2d.shape)
    g = _gather(nz2d, idx, False)
    bg = _gather(bits2d, idx)
    counts = g.sum(axis=1)
    max_count = int(counts.max()) if counts.size else 0
    if n is None:
        n = max_count
    if not (isinstance(n, int) and 0 <= n <= m):
        raise ModelError(f"nm: n must be an int in 0..m={m}, got {n!r}")
    if max_count > n:
        raise ModelError(f"nm: tensor is not {n}:{m} sparse (a group has {max_count} nonzeros)")
    pos = np.arange(m)
    # Prefer nonzeros, then the lowest positions; keep n slots, in position order.
    key = g.astype(np.int64) * (2 * m) + (m - pos)
    kept = np.sort(np.argsort(-key, axis=1, kind="stable")[:, :n], axis=1)
    values = np.take_along_axis(bg, kept, axis=1).reshape(-1)
    params = {"n": n, "m": m, "index": index}
    if index == "positions":
        return {"positions": pack(kept.reshape(-1), _bits_for(m)), "values": values}, params
    combos = _combinations(m, n)
    rank_of = np.zeros(1 << m, dtype=np.int64)
    rank_of[(1 << combos).sum(axis=1)] = np.arange(len(combos))
    ranks = rank_of[(1 << kept).sum(axis=1)] if kept.size else np.zeros(len(kept), np.int64)
    return {"groups": pack(ranks, _bits_for(len(combos))), "values": values}, params


def _decode_nm_impl(arrays, params, rows, cols):
    n, m = params["n"], params["m"]
    idx = _layout(NM(1, m), (rows, cols))
    n_groups = len(idx)
    if params["index"] == "positions":
        kept = unpack(arrays["positions"], _bits_for(m), n_groups * n).astype(np.int64).reshape(n_groups, n)
    else:
        combos = _combinations(m, n)
        ranks = unpack(arrays["groups"], _bits_for(len(combos)), n_groups).astype(np.int64)
        kept = combos[ranks]
    out = np.zeros((n_groups, m), dtype=arrays["values"].dtype)
    np.put_along_axis(out, kept, arrays["values"].reshape(n_groups, n), axis=1)
    return _scatter(out, idx, rows, cols)


def _pattern_layout(shape: Sequence[int], m: int | None, tile: Sequence[int] | None) -> tuple[np.ndarray, dict]:
    """The pattern groups: the pattern structure's tiles (:class:`prunekit.core.structures.Pattern`).

    ``tile=(R, C)``: R×C tiles of the matrix view (recorded as ``tile``); ``m``: runs of ``m``
    elements of a row (tile ``1×m``, the layout of files that record no ``tile``); neither: the
    structure's default, a conv kernel (``kh*kw`` consecutive elements) for a 4-d weight, a 4×4 tile
    for a 2-d one, else runs of 4."""
    rows, cols = _matrix_dims(shape)
    if tile is not None and m is not None:
        raise ModelError("pattern: give m (runs of m) or tile (R, C), not both")
    if tile is None and m is None:
        if len(shape) == 4 and 1 < shape[2] * shape[3] <= 64:
            m = int(shape[2] * shape[3])           # = Pattern() on the conv weight: one kernel per group
        elif len(shape) == 2:
            tile = Pattern().tile_shape(shape)
        else:
            m = 4
    if tile is not None:
        r, c = _parse_block(tile, "pattern: tile")
        if r * c > 64:
            raise ModelError(f"pattern: a tile holds at most 64 elements, got {r}x{c}")
        return _layout(Pattern(tile=(r, c)), (rows, cols)), {"m": r * c, "tile": [r, c]}
    if not (isinstance(m, int) and 1 <= m <= 64):
        raise ModelError(f"pattern: m must be an int in 1..64, got {m!r}")
    return _layout(Pattern(tile=(1, m)), (rows, cols)), {"m": m}


def _encode_pattern_impl(bits2d, nz2d, shape, *, m: int | None = None, tile: Sequence[int] | None = None, **opts):
    """Pattern (dictionary-coded group mask) storage, for kernel-pattern sparsity.

    Groups are the pattern structure's tiles (see :func:`_pattern_layout`; a partial edge tile is
    zero-padded). The distinct group masks form a codebook of K patterns.
    Arrays: ``patterns`` (K x m mask bits, ``numpy.packbits``), ``ids`` (pattern id per group,
    packed with ceil(log2 K) bits), ``values`` (the nonzeros, row-major; no padding).
    Params: ``m`` (entries per group), ``n_patterns``, and ``tile`` ([R, C]) when the groups are
    R×C tiles rather than runs of ``m``.
    """
    _no_opts("pattern", opts)
    idx, params = _pattern_layout(shape, m, tile)
    m = params["m"]
    g = _gather(nz2d, idx, False)
    codes = (g.astype(np.uint64) << np.arange(m, dtype=np.uint64)).sum(axis=1, dtype=np.uint64)
    book, ids = np.unique(codes, return_inverse=True)
    book_bits = ((book.reshape(-1, 1) >> np.arange(m, dtype=np.uint64)) & np.uint64(1)).astype(bool)
    return {
        "patterns": pack(book_bits, 1, bitorder="big"),
        "ids": pack(ids.reshape(-1), _bits_for(len(book))),
        "values": bits2d[nz2d],
    }, {**params, "n_patterns": int(len(book))}


def _decode_pattern_impl(arrays, params, rows, cols):
    m, k = params["m"], params["n_patterns"]
    tile = params.get("tile")
    st = Pattern(tile=(int(tile[0]), int(tile[1])) if tile else (1, m))
    idx = _layout(st, (rows, cols))
    n_groups = len(idx) if rows * cols else 0
    book = unpack(arrays["patterns"], 1, k * m, bitorder="big").reshape(k, m)
    ids = unpack(arrays["ids"], _bits_for(k), n_groups).astype(np.int64)
    mask = _scatter(book[ids], idx, rows, cols) if n_groups else np.zeros((rows, cols), bool)
    out = np.zeros((rows, cols), dtype=arrays["values"].dtype)
    out[mask] = arrays["values"]
    return out


def _no_opts(name: str, opts: Mapping[str, Any]) -> None:
    if opts:
        raise TypeError(f"{name}: unexpected options {sorted(opts)}")


_CODECS: dict[str, tuple[Callable, Callable]] = {
    "dense": (_encode_dense_impl, _decode_dense_impl),
    "bitmask": (_encode_bitmask_impl, _decode_bitmask_impl),
    "csr": (_encode_csr_impl, _decode_csr_impl),
    "relative": (_encode_relative_impl, _decode_relative_impl),
    "bcsr": (_encode_bcsr_impl, _decode_bcsr_impl),
    "nm": (_encode_nm_impl, _decode_nm_impl),
    "pattern": (_encode_pattern_impl, _decode_pattern_impl),
}
assert set(_CODECS) == set(ENCODINGS)


def _codec(name: str) -> tuple[Callable, Callable]:
    try:
        return _CODECS[name]
    except (KeyError, TypeError):
        raise ModelError(f"unknown encoding {name!r}; valid encodings: {list(ENCODINGS)}") from None


# --------------------------------------------------------------------------------------------
# Public encode / decode
# --------------------------------------------------------------------------------------------
def encode(tensor: torch.Tensor, encoding: str, **opts: Any) -> Encoded:
    """Encode ``tensor`` losslessly with the named encoding (options: see the module docstring)."""
    enc_fn, _ = _codec(encoding)
    bits = _to_bits(tensor)
    zero = _zero_mask(tensor)
    shape = tuple(int(s) for s in tensor.shape)
    rows, cols = _matrix_dims(shape)
    arrays, params = enc_fn(bits.reshape(rows, cols), ~zero.reshape(rows, cols), shape, **opts)
    if encoding != "dense":
        neg = np.flatnonzero(zero & (bits != 0))
        if neg.size:
            as_idx: np.ndarray = neg.astype(_uint_for(max(bits.size - 1, 0)))
            flags = np.zeros(bits.size, dtype=bool)
            flags[neg] = True
            as_mask = pack(flags, 1, bitorder="big")
            if as_idx.nbytes <= as_mask.nbytes:
                arrays["negzero_idx"] = as_idx
            else:
                arrays["negzero_mask"] = as_mask
    return Encoded(encoding, shape, tensor.dtype, arrays, params, nnz=int((~zero).sum()))


def decode(enc: Encoded) -> torch.Tensor:
    """Rebuild the exact tensor (bitwise, same dtype and shape) from an ``Encoded``."""
    _, dec_fn = _codec(enc.encoding)
    rows, cols = _matrix_dims(enc.shape)
    out = np.ascontiguousarray(dec_fn(enc.arrays, enc.params, rows, cols)).reshape(-1)
    size = _itemsize(enc.dtype)
    sign = np.array(1 << (8 * size - 1), dtype=np.uint64).astype(_BITS_DTYPE[size])
    if "negzero_idx" in enc.arrays:
        out[enc.arrays["negzero_idx"].astype(np.int64)] = sign
    if "negzero_mask" in enc.arrays:
        out[unpack(enc.arrays["negzero_mask"], 1, out.size, bitorder="big")] = sign
    return _from_bits(out, enc.shape, enc.dtype)


def encode_dense(tensor: torch.Tensor) -> Encoded:
    return encode(tensor, "dense")


def encode_bitmask(tensor: torch.Tensor) -> Encoded:
    return encode(tensor, "bitmask")


def encode_csr(tensor: torch.Tensor) -> Encoded:
    return encode(tensor, "csr")


def encode_relative(tensor: torch.Tensor, *, bits: int | None = None) -> Encoded:
    return encode(tensor, "relative", bits=bits)


def encode_bcsr(tensor: torch.Tensor, *, block: Sequence[int] = (4, 4)) -> Encoded:
    return encode(tensor, "bcsr", block=block)


def encode_nm(tensor: torch.Tensor, *, n: int | None = None, m: int = 4, index: str = "combination") -> Encoded:
    return encode(tensor, "nm", n=n, m=m, index=index)


def encode_pattern(tensor: torch.Tensor, *, m: int | None = None, tile: Sequence[int] | None = None) -> Encoded:
    return encode(tensor, "pattern", m=m, tile=tile)


for _name, (_impl, _) in _CODECS.items():
    globals()[f"encode_{_name}"].__doc__ = _impl.__doc__
del _name, _impl


def canonicalize_zeros(tensor: torch.Tensor) -> torch.Tensor:
    """Return ``tensor`` with every ``-0.0`` replaced by ``+0.0`` (other values untouched)."""
    if not tensor.is_floating_point():
        return tensor
    return torch.where(tensor == 0, torch.zeros((), dtype=tensor.dtype, device=tensor.device), tensor)


# --------------------------------------------------------------------------------------------
# Choosing and comparing
# --------------------------------------------------------------------------------------------
def is_applicable(tensor: torch.Tensor, encoding: str, **opts: Any) -> bool:
    """Whether ``encoding`` (with ``opts``) can encode ``tensor`` (nm with an explicit ``n`` needs
    every group to fit)."""
    try:
        encode(tensor, encoding, **opts)
    except ValueError as e:
        if str(e).startswith("unknown encoding"):
            raise
        return False
    return True


def _encode_candidates(
    tensor: torch.Tensor,
    candidates: Iterable[str] | None,
    options: Mapping[str, Mapping[str, Any]] | None,
) -> list[Encoded]:
    names = list(ENCODINGS if candidates is None else candidates)
    options = dict(options or {})
    for name in list(names) + list(options):
        _codec(name)
    out = []
    for name in names:
        try:
            out.append(encode(tensor, name, **options.get(name, {})))
        except ValueError:
            continue  # not applicable to this tensor (e.g. group size does not divide rows)
    return out


def best_encoding(
    tensor: torch.Tensor,
    candidates: Iterable[str] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> Encoded:
    """Encode with every applicable candidate (default: all of ``ENCODINGS``, default options;
    ``options`` maps an encoding name to its keyword options) and return the smallest.
    Ties go to the simplest, in the order of ``ENCODINGS``."""
    encs = _encode_candidates(tensor, candidates, options)
    if not encs:
        raise ModelError(f"no candidate encoding applies to a tensor of shape {tuple(tensor.shape)}")
    return min(encs, key=lambda e: (e.nbytes, ENCODINGS.index(e.encoding)))


def encoding_table(
    tensor: torch.Tensor,
    candidates: Iterable[str] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One row per applicable encoding: {encoding, nbytes, index_bytes, value_bytes,
    ratio_vs_dense (= nbytes / dense bytes)}, in candidate order."""
    rows = []
    for e in _encode_candidates(tensor, candidates, options):
        dense = e.dense_bytes
        rows.append({
            "encoding": e.encoding,
            "nbytes": e.nbytes,
            "index_bytes": e.index_bytes,
            "value_bytes": e.value_bytes,
            "ratio_vs_dense": e.nbytes / dense if dense else (1.0 if e.nbytes == 0 else math.inf),
        })
    return rows


def theoretical_min_bytes(tensor: torch.Tensor) -> float:
    """Information-theoretic floor for storing ``tensor`` losslessly without compressing values:
    ``k * itemsize + log2(C(n, k)) / 8`` bytes, for ``n`` elements of which ``k`` are nonzero.

    ``log2 C(n, k)`` bits is the entropy of the mask when every placement of ``k`` nonzeros is
    equally likely and ``k`` is known (the few bytes to store ``k`` and the shape are not
    counted, nor is the sign of zero). Structure (N:M, blocks, patterns) can beat it, since the
    uniform-placement assumption no longer holds; entropy coding of the values is a separate saving.
    """
    n = tensor.numel()
    k = n - int(_zero_mask(tensor).sum())
    log2_binom = (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)
    return k * tensor.element_size() + max(log2_binom, 0.0) / 8


def breakeven_sparsity(numel: int | Sequence[int], dtype: torch.dtype, encoding: str) -> float:
    """The smallest sparsity at which ``encoding`` is strictly smaller than dense.

    Below it, the index data costs more than the zeros it saves. The result is exact: ``z / n``
    for the smallest zero count ``z`` (``n`` = numel) with ``encoded bytes < n * itemsize``; a
    tensor with ``z - 1`` zeros encodes at least as large as dense. ``math.inf`` if never smaller.

    * ``bitmask`` (``numel`` may be an int): bytes = ceil(n / 8) + (n - z) * e, so smaller
      iff ``z * e > ceil(n / 8)``; about ``1 / (8 e)``: 3.1 % for float32, 6.25 % for float16.
    * ``csr`` (``numel`` must be a shape; ``rows`` pointers depend on it): bytes =
      (rows + 1) * p + k * (c + e) with k = n - z nonzeros, c the column-index width (from cols)
      and p the row-pointer width (smallest uint holding k); about ``c / (c + e)``, e.g. 33 % for
      float32 with uint16 columns, 20 % with uint8 columns.

    Other encodings depend on where the zeros are (gaps, blocks, groups), not only on how many,
    and raise ``ValueError``.
    """
    _codec(encoding)
    e = _itemsize(dtype)
    if isinstance(numel, int):
        shape: tuple[int, ...] | None = None
        n = numel
    else:
        shape = tuple(int(s) for s in numel)
        n = math.prod(shape)
    dense = n * e
    if n == 0:
        return math.inf
    if encoding == "bitmask":
        z = (math.ceil(n / 8)) // e + 1
        return z / n if z <= n else math.inf
    if encoding == "csr":
        if shape is None:
            raise ModelError("breakeven_sparsity for csr needs the tensor shape (rows matter), not just numel")
        rows, cols = _matrix_dims(shape)
        c = np.dtype(_uint_for(max(cols - 1, 0))).itemsize
        best_k = -1
        lo = 0
        for p_dt in (np.uint8, np.uint16, np.uint32, np.uint64):
            hi = min(int(np.iinfo(p_dt).max), n)  # k range served by this pointer width
            p = np.dtype(p_dt).itemsize
            # largest k with (rows + 1) * p + k * (c + e) < dense
            k = (dense - (rows + 1) * p - 1) // (c + e)
            k = min(k, hi)
            if k >= lo:
                best_k = max(best_k, k)
            lo = hi + 1
            if lo > n:
                break
        return (n - best_k) / n if best_k >= 0 else math.inf
    raise ModelError(
        f"breakeven_sparsity is analytic only for ['bitmask', 'csr']; {encoding!r} depends on "
        "where the zeros are, not only on how many"
    )


# --------------------------------------------------------------------------------------------
# safetensors and whole state dicts
# --------------------------------------------------------------------------------------------
def to_safetensors_dict(prefix: str, enc: Encoded) -> dict[str, torch.Tensor]:
    """Tensors ``{f"{prefix}.{array}": tensor}`` for ``safetensors.torch.save_file``.

    ``values`` is stored in the original dtype (so the file is readable by any tool); unsigned
    index arrays are stored bit-identically as the signed dtype of the same width. Keep
    ``enc.meta`` (JSON) alongside to decode.
    """
    out = {}
    for name, arr in enc.arrays.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype.kind == "u" and arr.dtype.itemsize > 1:
            arr = arr.view(np.dtype(f"int{8 * arr.dtype.itemsize}"))
        t = torch.from_numpy(arr.copy())
        if name == "values" and enc.dtype != t.dtype and _itemsize(enc.dtype) == t.element_size():
            t = t.view(enc.dtype)
        out[f"{prefix}.{name}"] = t
    return out


def from_safetensors_dict(prefix: str, d: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Encoded:
    """Inverse of ``to_safetensors_dict`` given the encoding's ``meta``."""
    arrays = {}
    for name, (np_dtype, shape) in meta["arrays"].items():
        key = f"{prefix}.{name}"
        if key not in d:
            raise KeyError(f"missing tensor {key!r} for encoded {meta['encoding']!r} tensor {prefix!r}")
        t = d[key].detach().to("cpu").contiguous()
        want = np.dtype(np_dtype)
        if t.dtype == torch.bool:
            t = t.view(torch.uint8)
        if t.element_size() != want.itemsize:
            raise ModelError(f"{key}: stored element size {t.element_size()} != expected {want}")
        if t.dtype not in _NP_TO_TORCH.values():
            t = t.view(_SIGNED_TORCH[t.element_size()] if t.element_size() > 1 else torch.uint8)
        arrays[name] = t.numpy().view(want).reshape(shape).copy()
    return Encoded(
        encoding=meta["encoding"],
        shape=tuple(meta["shape"]),
        dtype=_parse_dtype(meta["dtype"]),
        arrays=arrays,
        params=dict(meta.get("params", {})),
        nnz=int(meta.get("nnz", 0)),
    )


def encode_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    choose: str = "best",
    *,
    min_sparsity: float = 0.0,
    candidates: Iterable[str] | None = None,
) -> tuple[dict[str, torch.Tensor], str]:
    """Encode every tensor of a state dict; returns ``(tensors, meta_json)``.

    ``choose="best"`` picks ``best_encoding`` per tensor (among ``candidates``); an encoding
    name applies that encoding. Either way a tensor stays ``dense`` when it is not a floating
    weight matrix (``ndim < 2``: biases, norms; integer buffers), when its sparsity is below
    ``min_sparsity``, when the named encoding does not apply, or when the encoding would not be
    smaller than dense. Tensors that alias another entry (tied weights: same storage, offset,
    shape, strides and dtype) are stored once. Save with
    ``safetensors.torch.save_file(tensors, path, metadata={"prunekit": meta_json})``.
    """
    if choose != "best":
        _codec(choose)
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, Any] = {}
    seen: dict[tuple, str] = {}
    for key, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{key}: expected a tensor, got {type(t).__name__}")
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and ident in seen:
            entries[key] = {"alias_of": seen[ident]}
            continue
        seen[ident] = key
        enc = encode(t, "dense")
        if t.is_floating_point() and t.dim() >= 2 and t.numel():
            sparsity = float(_zero_mask(t).mean())
            if sparsity >= min_sparsity:
                if choose == "best":
                    cand = best_encoding(t, candidates)
                else:
                    cand = encode(t, choose) if is_applicable(t, choose) else enc
                if cand.nbytes < enc.nbytes:
                    enc = cand
        new = to_safetensors_dict(key, enc)
        clash = set(new) & set(tensors)
        if clash:
            raise ModelError(f"encoded key collision for {key!r}: {sorted(clash)}")
        tensors.update(new)
        entries[key] = enc.meta
    meta = {"format": _STATE_DICT_FORMAT, "order": list(entries), "tensors": entries}
    return tensors, json.dumps(meta)


def decode_state_dict(tensors: Mapping[str, torch.Tensor], meta: str | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Inverse of ``encode_state_dict``; ``meta`` is the JSON string or its parsed dict.
    Aliased (tied) entries come back as the same tensor object."""
    md: Mapping[str, Any] = json.loads(meta) if isinstance(meta, str) else meta
    if md.get("format") != _STATE_DICT_FORMAT:
        raise ModelError(f"unsupported storage format {md.get('format')!r}; expected {_STATE_DICT_FORMAT!r}")
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for key, m in md["tensors"].items():
        if "alias_of" in m:
            aliases[key] = m["alias_of"]
        else:
            out[key] = decode(from_safetensors_dict(key, tensors, m))
    for key, target in aliases.items():
        out[key] = out[target]
    return {k: out[k] for k in md.get("order", md["tensors"])}
