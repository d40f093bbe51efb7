"""The quantized artefact: every byte of a pruned and quantized model, counted (docs/quantization.md).

File layout (``.pkq``)::

    b"PKQ1" | u32 little-endian header length | header (compact UTF-8 JSON, zlib level 9) | blobs, back to back

The header lists every tensor of the model's ``state_dict`` (name, shape, dtype) and, per blob, its kind,
offset and length.  A **quantized weight** is stored as

* **codes** — the kept weights' codes in row-major order, ``K`` bits each (:func:`prunekit.core.bits.pack`,
  LSB first), or their entropy-coded form when smaller (see below);
* **scales** — the quantizer's parameters (scale and zero point per channel, α, a codebook) as float32;
* **positions** — where the kept weights are (nothing when every weight is kept: ``all``), else in the cheapest
  of three encodings for this layer:
  ``bitmap`` (one bit per weight), ``csr`` (row pointers at the smallest unsigned width + column indices at
  ⌈log2 cols⌉ bits) or ``relative`` (Deep Compression's relative indices: the gap to the next kept weight in
  ``g`` bits, ``g`` chosen per layer; a gap that does not fit is split by *filler* entries — the all-ones gap
  ``2^g − 1`` means "advance ``2^g − 1`` positions, no weight here", so a filler costs ``g`` bits and no code);
  the encoding whose bytes are fewest wins (ties: bitmap, csr, relative).

Everything else in the ``state_dict`` (biases, BatchNorm buffers, layers that are not quantized) is stored
raw in its own dtype (**other**).  ``decode`` rebuilds the state dict bit for bit.

**Entropy coding** of the codes and the relative-index gaps, kept per stream only where smaller than the
bit-packed form: ``entropy="huffman"`` — canonical Huffman (Deep Compression's coder; the code lengths, one
byte per symbol, are the only table; within one bit per symbol of the Shannon bound, and good on the short
streams of a pruned layer), or ``entropy="lzma"`` — Python's standard-library LZMA (raw LZMA2, an adaptive
range coder: no table, but a fixed overhead that loses on streams of a few hundred symbols).  No new
dependency either way.  Every layer reports the
**Shannon bound** of its code histogram (``n · H(codes)``) beside what is stored.

Figures (:func:`artefact_report`): **weight data** compression = dense float32 bytes of the quantized weights
/ (codes + scales + positions) — Deep Compression's count (its 39× for LeNet-5 includes the indices);
**weight values** = the same over codes + scales only (no positions; papers differ in whether they count the
indices, so both are reported); **whole artefact** = float32
bytes of the whole ``state_dict`` / every byte of the file (header and other tensors included).
"""
from __future__ import annotations

import heapq
import json
import lzma
import math
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from prunekit.core.bits import bits_for, pack, unpack
from prunekit.core.errors import CheckpointError
from prunekit.core.quant import QCodes, parse_quantizer

__all__ = ["encode_artefact", "decode_artefact", "save_artefact", "load_artefact", "artefact_report",
           "positions_encodings", "huffman_encode", "huffman_decode", "MAGIC"]

MAGIC = b"PKQ1"
_LZMA = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


def _uint(max_value: int) -> np.dtype:
    for t in (np.uint8, np.uint16, np.uint32):
        if max_value <= np.iinfo(t).max:
            return np.dtype(t)
    return np.dtype(np.uint64)


def _gaps(flat_mask: np.ndarray, g: int) -> np.ndarray:
    """Relative-index entries with ``g``-bit gaps: gap ``d < 2^g − 1`` = advance ``d`` then a kept weight;
    ``2^g − 1`` = advance ``2^g − 1`` without a weight (filler)."""
    pos = np.flatnonzero(flat_mask)
    gaps = np.diff(np.concatenate([[-1], pos])) - 1
    full = (1 << g) - 1
    n_fill = gaps // full
    out = np.full(int(n_fill.sum()) + len(gaps), full, dtype=np.int64)
    idx = np.cumsum(n_fill + 1) - 1            # where each kept weight's entry lands
    out[idx] = gaps - n_fill * full
    return out


def _ungaps(entries: np.ndarray, g: int, n: int) -> np.ndarray:
    full = (1 << g) - 1
    mask = np.zeros(n, dtype=bool)
    pos = np.cumsum(np.where(entries == full, full, entries + 1)) - 1
    mask[pos[entries != full]] = True
    return mask


def positions_encodings(mask: Tensor) -> dict[str, tuple[bytes, dict[str, Any]]]:
    """Every positions encoding of a mask (matrix view ``(rows, cols)``): ``name → (bytes, params)``."""
    m = mask.reshape(mask.shape[0], -1).cpu().numpy().astype(bool) if mask.dim() >= 2 else \
        mask.reshape(1, -1).cpu().numpy().astype(bool)
    rows, cols = m.shape
    flat = m.reshape(-1)
    if flat.all():                      # nothing pruned: no positions at all
        return {"all": (b"", {})}
    out: dict[str, tuple[bytes, dict[str, Any]]] = {"bitmap": (pack(flat, 1).tobytes(), {})}
    ptr = np.concatenate([[0], np.cumsum(m.sum(axis=1))]).astype(np.int64)
    pdt = _uint(int(ptr[-1]))
    cbits = max(1, bits_for(cols))
    col = np.nonzero(m)[1]
    out["csr"] = (ptr.astype(pdt).tobytes() + pack(col, cbits).tobytes(),
                  {"ptr_dtype": pdt.name, "col_bits": cbits})
    best: tuple[bytes, dict[str, Any]] | None = None
    for g in range(1, 17):
        e = _gaps(flat, g)
        b = pack(e, g).tobytes()
        if best is None or len(b) < len(best[0]):
            best = (b, {"gap_bits": g, "entries": int(e.size)})
    assert best is not None
    out["relative"] = best
    return out


def _decode_positions(kind: str, blob: bytes, p: Mapping[str, Any], shape: tuple[int, ...]) -> np.ndarray:
    rows = shape[0] if len(shape) >= 1 else 1
    n = math.prod(shape)
    cols = n // max(rows, 1)
    a = np.frombuffer(blob, dtype=np.uint8)
    if kind == "all":
        return np.ones(n, dtype=bool)
    if kind == "bitmap":
        return unpack(a, 1, n, bitorder="little").astype(bool)
    if kind == "csr":
        pdt = np.dtype(p["ptr_dtype"])
        ptr = np.frombuffer(blob[:(rows + 1) * pdt.itemsize], dtype=pdt).astype(np.int64)
        col = unpack(np.frombuffer(blob[(rows + 1) * pdt.itemsize:], dtype=np.uint8), p["col_bits"], int(ptr[-1]))
        m = np.zeros((rows, cols), dtype=bool)
        r = np.repeat(np.arange(rows), np.diff(ptr))
        m[r, col.astype(np.int64)] = True
        return m.reshape(-1)
    return _ungaps(unpack(a, p["gap_bits"], p["entries"]).astype(np.int64), p["gap_bits"], n)


def _entropy_bits(sym: np.ndarray) -> float:
    """Shannon bound ``n · H`` (bits) of a symbol stream's histogram."""
    if sym.size == 0:
        return 0.0
    _, cnt = np.unique(sym, return_counts=True)
    p = cnt / sym.size
    return float(-(cnt * np.log2(p)).sum())


def _huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Code length per symbol of a Huffman code for ``counts`` (0 for unused symbols; 1 for a lone symbol)."""
    used = [i for i in range(len(counts)) if counts[i] > 0]
    lengths = np.zeros(len(counts), dtype=np.int64)
    if len(used) == 1:
        lengths[used[0]] = 1
        return lengths
    heap = [(int(counts[i]), i, [i]) for i in used]
    heapq.heapify(heap)
    tie = len(counts)
    while len(heap) > 1:
        c1, _, a = heapq.heappop(heap)
        c2, _, b = heapq.heappop(heap)
        lengths[a + b] += 1
        heapq.heappush(heap, (c1 + c2, tie, a + b))
        tie += 1
    return lengths


def _canonical(lengths: np.ndarray) -> np.ndarray:
    codes = np.zeros(len(lengths), dtype=np.int64)
    code, prev = 0, 0
    for sym in sorted((i for i in range(len(lengths)) if lengths[i] > 0), key=lambda i: (lengths[i], i)):
        code <<= int(lengths[sym]) - prev
        codes[sym], prev = code, int(lengths[sym])
        code += 1
    return codes


HUFFMAN_MAX_SYMBOLS = 1 << 20     # longer streams stay bit-packed (the decoder walks symbols in Python)


def huffman_encode(sym: np.ndarray) -> bytes | None:
    """Canonical Huffman coding (Deep Compression's entropy coder) of non-negative integer symbols < 65536:
    ``u16 S | S code lengths (u8) | the bit stream, MSB first``; None when a code would exceed 16 bits or the
    stream is longer than :data:`HUFFMAN_MAX_SYMBOLS`."""
    if sym.size == 0 or sym.size > HUFFMAN_MAX_SYMBOLS or int(sym.max()) >= 1 << 16:
        return None
    lengths = _huffman_lengths(np.bincount(sym, minlength=int(sym.max()) + 1))
    if int(lengths.max()) > 16:
        return None
    codes, ln = _canonical(lengths)[sym], lengths[sym]
    start = np.cumsum(ln) - ln
    stream = np.zeros(int(ln.sum()), dtype=np.uint8)
    for j in range(int(ln.max())):
        sel = ln > j
        stream[start[sel] + j] = (codes[sel] >> (ln[sel] - 1 - j)) & 1
    return struct.pack("<H", len(lengths)) + lengths.astype(np.uint8).tobytes() + np.packbits(stream).tobytes()


def huffman_decode(blob: bytes, n: int) -> np.ndarray:
    """Inverse of :func:`huffman_encode` (``n`` symbols), through a 2^L-entry lookup table."""
    (S,) = struct.unpack("<H", blob[:2])
    lengths = np.frombuffer(blob[2:2 + S], dtype=np.uint8).astype(np.int64)
    codes, L = _canonical(lengths), int(lengths.max())
    sym_of = np.zeros(1 << L, dtype=np.int64)
    len_of = np.zeros(1 << L, dtype=np.int64)
    for s_, (c, ln) in enumerate(zip(codes.tolist(), lengths.tolist())):
        if ln:
            lo = c << (L - ln)
            sym_of[lo:lo + (1 << (L - ln))], len_of[lo:lo + (1 << (L - ln))] = s_, ln
    bits = np.unpackbits(np.frombuffer(blob[2 + S:], dtype=np.uint8))
    bits = np.concatenate([bits, np.zeros(L, dtype=np.uint8)]).astype(np.int64)
    # the L-bit window at every bit offset, then walk the offsets symbol by symbol
    win = np.zeros(len(bits) - L + 1, dtype=np.int64)
    for k in range(L):
        win = (win << 1) | bits[k:len(bits) - L + 1 + k]
    out = np.zeros(n, dtype=np.int64)
    pos = 0
    syms, lens = sym_of[win].tolist(), len_of[win].tolist()
    for i in range(n):
        out[i] = syms[pos]
        pos += lens[pos]
    return out


def _codes_blob(sym: np.ndarray, bits: int, entropy: str | None) -> tuple[bytes, str]:
    """The smallest of the bit-packed stream and, with ``entropy``, its Huffman or LZMA coding."""
    best = (pack(sym, bits).tobytes(), "packed")
    if entropy == "huffman":
        h = huffman_encode(sym)
        if h is not None and len(h) < len(best[0]):
            best = (h, "huffman")
    if entropy == "lzma" and bits <= 8 and sym.size:
        z = lzma.compress(sym.astype(np.uint8).tobytes(), format=lzma.FORMAT_RAW, filters=_LZMA)
        if len(z) < len(best[0]):
            best = (z, "lzma")
    return best


def _codes_unblob(blob: bytes, how: str, bits: int, n: int) -> np.ndarray:
    if how == "huffman":
        return huffman_decode(blob, n)
    if how == "lzma":
        return np.frombuffer(lzma.decompress(blob, format=lzma.FORMAT_RAW, filters=_LZMA), dtype=np.uint8).astype(np.int64)
    return unpack(np.frombuffer(blob, dtype=np.uint8), bits, n).astype(np.int64)


def _encode_layer(qc: QCodes, entropy: str | None) -> tuple[dict[str, Any], dict[str, bytes]]:
    mask = qc.mask.cpu()
    sym = qc.codes.cpu()[mask].numpy().astype(np.int64)
    encs = positions_encodings(mask)
    kind = min(encs, key=lambda k: (len(encs[k][0]), ["all", "bitmap", "csr", "relative"].index(k)))
    pos_blob, pos_p = encs[kind]
    if entropy is not None and "relative" in encs:     # entropy-coded relative indices: the best gap width for the coder
        flat = mask.reshape(-1).numpy().astype(bool)
        for g in range(1, 17):
            e = _gaps(flat, g)
            z, how_pos = _codes_blob(e, g, entropy)
            if how_pos != "packed" and len(z) < len(pos_blob):
                kind, pos_blob, pos_p = "relative", z, {"gap_bits": g, "entries": int(e.size), "coder": how_pos}
    codes_blob, how = _codes_blob(sym, qc.bits, entropy)
    params = {k: v.detach().cpu().float().contiguous() for k, v in qc.params.items()}
    scale_blob = b"".join(t.numpy().tobytes() for t in params.values())
    meta = {"quantizer": qc.quantizer, "bits": qc.bits, "kept": int(sym.size), "codes": how,
            "positions": kind, "positions_params": pos_p, "params": {k: list(v.shape) for k, v in params.items()},
            "shannon_bits": round(_entropy_bits(sym), 1)}
    return meta, {"codes": codes_blob, "scales": scale_blob, "positions": pos_blob}


def encode_artefact(state: Mapping[str, Tensor], qcodes: Mapping[str, QCodes],
                    entropy: str | None = None) -> bytes:
    """The ``.pkq`` bytes of a state dict whose entries in ``qcodes`` are quantized (each must equal
    ``decode`` of its codes — :func:`prunekit.algorithms.quantize.check_quantized` gives such codes)."""
    if entropy not in (None, "huffman", "lzma"):
        raise CheckpointError(f"entropy coding {entropy!r}: expected None, 'huffman' or 'lzma'")
    tensors, blobs, offset = [], [], 0
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        entry: dict[str, Any] = {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        parts: dict[str, bytes]
        if name in qcodes:
            meta, parts = _encode_layer(qcodes[name], entropy)
            entry.update(meta)
        else:
            parts = {"other": t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""}
        entry["blobs"] = {}
        for kind, b in parts.items():
            entry["blobs"][kind] = [offset, len(b)]
            blobs.append(b)
            offset += len(b)
        tensors.append(entry)
    header = zlib.compress(json.dumps({"format": "prunekit-quantized", "version": 1, "entropy": entropy,
                                       "tensors": tensors}, separators=(",", ":")).encode(), 9)
    return MAGIC + struct.pack("<I", len(header)) + header + b"".join(blobs)


def _read_header(data: bytes) -> tuple[dict[str, Any], int]:
    if data[:4] != MAGIC or len(data) < 8:
        raise CheckpointError("not a prunekit quantized artefact (bad magic)")
    (n,) = struct.unpack("<I", data[4:8])
    try:
        raw = data[8:8 + n]
        return json.loads(raw if raw[:1] == b"{" else zlib.decompress(raw)), 8 + n   # plain JSON is read too
    except (ValueError, zlib.error) as e:
        raise CheckpointError(f"corrupt artefact header: {e}") from None


def _decode_entry(e: Mapping[str, Any], blob: Mapping[str, bytes]) -> Tensor:
    shape, dtype = tuple(e["shape"]), getattr(torch, e["dtype"])
    if "quantizer" not in e:
        raw = torch.frombuffer(bytearray(blob["other"]), dtype=torch.uint8) if blob["other"] else torch.zeros(0, dtype=torch.uint8)
        return raw.view(dtype).reshape(shape).clone()
    pp = e["positions_params"]
    if pp.get("coder"):
        ent = _codes_unblob(blob["positions"], pp["coder"], pp["gap_bits"], pp["entries"])
        flat = _ungaps(ent.astype(np.int64), pp["gap_bits"], math.prod(shape))
    else:
        flat = _decode_positions(e["positions"], blob["positions"], pp, shape)
    mask = torch.from_numpy(flat.copy()).reshape(shape)
    codes = torch.zeros(shape, dtype=torch.int64)
    codes[mask] = torch.from_numpy(_codes_unblob(blob["codes"], e["codes"], e["bits"], e["kept"]))
    params: dict[str, Tensor] = {}
    off, sblob = 0, blob["scales"]
    for k, shp in e["params"].items():
        n = math.prod(shp)
        params[k] = torch.from_numpy(np.frombuffer(sblob[off:off + 4 * n], dtype=np.float32).copy()).reshape(shp)
        off += 4 * n
    q = parse_quantizer(e["quantizer"])
    return q.decode(QCodes(codes, mask, params, e["quantizer"], e["bits"], dtype))


def decode_artefact(data: bytes) -> dict[str, Tensor]:
    """The state dict (bit for bit what was encoded)."""
    header, start = _read_header(data)
    out: dict[str, Tensor] = {}
    for e in header["tensors"]:
        blob = {k: data[start + o:start + o + n] for k, (o, n) in e["blobs"].items()}
        out[e["name"]] = _decode_entry(e, blob)
    return out


def save_artefact(path: str | Path, state: Mapping[str, Tensor], qcodes: Mapping[str, QCodes],
                  entropy: str | None = None) -> dict[str, Any]:
    """Write the artefact, check that it decodes to ``state`` bit for bit, return :func:`artefact_report`."""
    data = encode_artefact(state, qcodes, entropy)
    back = decode_artefact(data)
    for n, t in state.items():
        a, b = t.detach().cpu().contiguous(), back[n]
        if a.shape != b.shape or not torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)):
            raise CheckpointError(f"artefact does not reproduce {n} bit for bit")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(p)
    return artefact_report(data)


def load_artefact(path: str | Path) -> dict[str, Tensor]:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"artefact {p} does not exist")
    return decode_artefact(p.read_bytes())


def artefact_report(data: bytes) -> dict[str, Any]:
    """Bytes by kind (codes / scales / positions / other / header), bits per weight per layer, and the two
    compression figures (see the module docstring)."""
    header, start = _read_header(data)
    kinds = {"codes": 0, "scales": 0, "positions": 0, "other": 0, "header": start}
    layers, dense_q, dense_all = [], 0, 0
    for e in header["tensors"]:
        n = math.prod(e["shape"])
        dense_all += 4 * n
        for k, (_, ln) in e["blobs"].items():
            kinds[k] += ln
        if "quantizer" in e:
            dense_q += 4 * n
            b = {k: ln for k, (_, ln) in e["blobs"].items()}
            stored = sum(b.values())
            layers.append({"name": e["name"], "quantizer": e["quantizer"], "numel": n, "kept": e["kept"],
                           "positions": e["positions"], "codes": e["codes"], **{f"{k}_bytes": v for k, v in b.items()},
                           "bits_per_weight": round(8 * stored / n, 4),
                           "bits_per_kept_weight": round(8 * stored / max(e["kept"], 1), 3),
                           "shannon_code_bytes": round(e["shannon_bits"] / 8, 1),
                           "compression": round(4 * n / max(stored, 1), 2)})
    weight_bytes = kinds["codes"] + kinds["scales"] + kinds["positions"]
    return {"file_bytes": len(data), "bytes": kinds, "layers": layers, "entropy": header.get("entropy"),
            "dense_fp32_weight_bytes": dense_q, "dense_fp32_bytes": dense_all,
            "weight_data_compression": round(dense_q / max(weight_bytes, 1), 2),
            "weight_values_compression": round(dense_q / max(kinds["codes"] + kinds["scales"], 1), 2),
            "whole_artefact_compression": round(dense_all / max(len(data), 1), 2)}
