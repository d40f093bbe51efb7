"""Quantizers: one protocol for "which values a kept weight may take", beside :mod:`structures`.

A structure says *which* weights are kept; a quantizer says *what values* the kept weights may take.
Both are projections, and a mask and a quantizer compose into **one constraint set**
(:class:`ConstraintSet`) that ADMM's Z-step, quantization-aware retraining and storage all use:

* **pruned weights stay exactly 0** (``+0.0``) — a quantizer never revives one;
* **survivors lie on the grid** — ``project(w, mask)`` returns the closest grid point of every kept weight;
* **no silent zeros** — a kept weight that the grid sends to 0 is *counted as pruned*: the constraint set
  returns the updated mask beside the values.

The protocol (every quantizer implements it; nothing outside dispatches on its type):

* ``encode(w, mask) → QCodes`` — unsigned integer codes (``bits`` each; the value of a pruned weight's code
  is 0 and never read) plus the parameters (scales, zero points, a codebook), all plain tensors;
* ``decode(QCodes) → Tensor`` — exact: ``decode(encode(w, mask))`` *is* the projection
  (``project = decode ∘ encode``), bit for bit; and the projection is idempotent bit for bit
  (``encode`` of a weight already on a grid recovers that grid's parameters exactly), so after training
  every weight equals ``decode(encode(weight))`` and storage needs no side channel.

Strings are parsed once with :func:`parse_quantizer` (registered in :data:`QUANTIZERS`)::

    int:K[:sym|asym][:tensor|channel]  (K = 1…8; sym: 2^K − 1 levels −q…q, asym: 2^K levels + zero point;
                                        default sym, per output channel)
    pow2:K     0 and ±α·2^-j, j = 0 … 2^(K-1) − 2 (power-of-two levels, ADMM-NN), α = max |w|
    binary     ±α, α = mean |w| (the L2-optimal scale for the signs)
    ternary    −α, 0, +α: the exact L2 projection (keep the k largest |w|, α their mean, best k)
    cluster:K  K shared values per layer (Deep Compression): k-means with linear initialisation
    fp16 | bf16  the half-precision value (codes = its 16 bits)

Scales are per tensor except ``int:…:channel`` (per output unit = row of the matrix view, as
:mod:`structures`).  Scales are fitted on the *kept* weights only.
"""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from prunekit.core.errors import RecipeError, UnknownNameError
from prunekit.core.registry import Registry
from prunekit.core.targets import TargetSpec, find_targets

__all__ = ["QCodes", "Quantizer", "IntQuantizer", "Pow2", "Binary", "Ternary", "Cluster", "HalfFloat",
           "ConstraintSet", "QuantSpec", "QUANTIZERS", "parse_quantizer", "quantizer_syntax", "kmeans_1d"]


@dataclass
class QCodes:
    """A quantized tensor: ``codes`` (int64, the weight's shape, values in ``[0, 2**bits)``; 0 where pruned),
    ``mask`` (bool, True = kept), ``params`` (name → float32 tensor: ``scale``, ``zero_point``,
    ``codebook``, ``alpha``), the quantizer's canonical string and the weight's dtype."""

    codes: Tensor
    mask: Tensor
    params: dict[str, Tensor]
    quantizer: str
    bits: int
    dtype: torch.dtype = torch.float32
    meta: dict[str, int] = field(default_factory=dict)


QUANTIZERS: Registry[type[Quantizer]] = Registry("quantizer")


def _int_argument(text: str, name: str) -> int | None:
    """``K`` of a ``name:K`` string, or None when ``text`` is not of that form."""
    parts = text.split(":")
    return int(parts[1]) if parts[0] == name and len(parts) == 2 and parts[1].isdigit() else None


def quantizer_syntax() -> str:
    """The syntax help of every registered quantizer (for ``prunekit info`` and error messages)."""
    return " | ".join(f"{QUANTIZERS.get(n).syntax} ({QUANTIZERS.get(n).help})" for n in QUANTIZERS.names())


def _rows(w: Tensor) -> Tensor:
    """The matrix view ``(out, rest)`` (a 1-D or 0-D tensor is one row)."""
    return w.reshape(1, -1) if w.dim() < 2 else w.reshape(w.shape[0], -1)


def _finish(values: Tensor, mask: Tensor, like: Tensor) -> Tensor:
    """Decoded values in ``like``'s shape/dtype, ``+0.0`` where pruned."""
    v = values.reshape(like.shape).to(like.dtype)
    return torch.where(mask, v, torch.zeros((), dtype=like.dtype))


def _polish(v: Tensor, n: Tensor, keep: Tensor, s: Tensor) -> Tensor:
    """Per-row scales that reproduce ``v`` exactly as ``n · s`` where possible.

    ``v`` (R, C) target values, ``n`` (R, C) integer multipliers (float), ``keep`` (R, C) which entries
    count, ``s`` (R, 1) fitted scales.  For a weight already on a grid, the fitted scale can differ from the
    grid's by an ulp (the scale is re-derived through rounded arithmetic); this tries the fitted scale,
    then ``v/n`` of each row's largest multiplier and its neighbouring floats, and keeps per row the first
    candidate with ``fl(n·s) == v`` on every kept entry — which makes the projection idempotent bit for bit.
    Rows with no exact candidate keep ``s`` (``v`` is not on any grid: the usual case)."""
    big = (n.abs() * keep).argmax(dim=1, keepdim=True)
    nb = n.gather(1, big)
    base = torch.where(nb != 0, v.gather(1, big) / torch.where(nb != 0, nb, 1.0), s)
    cands = [s, base]
    up, down = base, base
    for _ in range(2):
        up, down = torch.nextafter(up, up + 1), torch.nextafter(down, down - 1)
        cands += [up, down]
    out = s.clone()
    done = torch.zeros_like(s, dtype=torch.bool)
    for c in cands:
        ok = (((n * c) == v) | ~keep).all(dim=1, keepdim=True) & ~done & (c > 0)
        out = torch.where(ok, c, out)
        done |= ok
    return out


class Quantizer:
    """The quantizer protocol (see the module docstring).  Subclasses define :meth:`encode` and
    :meth:`decode`; :meth:`project` is the one template."""

    syntax: ClassVar[str] = ""
    help: ClassVar[str] = ""
    has_zero: ClassVar[bool] = True      # 0 is a value of the grid (a kept weight can round to it)

    @classmethod
    def parse(cls, text: str) -> Quantizer | None:
        """The quantizer ``text`` (lower-case, no spaces) names, or None if it is not this kind."""
        raise NotImplementedError

    @property
    def bits(self) -> int:
        """Bits per code."""
        raise NotImplementedError

    @property
    def n_codes(self) -> int:
        """How many codes are valid (``0 … n_codes − 1``)."""
        return 1 << self.bits

    def levels(self, q: QCodes) -> Tensor:
        """The grid of ``q``'s parameters as a ``(rows, n_codes)`` table: the value of every code in every row
        of the matrix view (GPTQ-style column-by-column rounding onto a fixed grid)."""
        rows = q.codes.shape[0] if q.codes.dim() >= 1 else 1
        codes = torch.arange(self.n_codes).expand(rows, self.n_codes)
        return self.decode(QCodes(codes, torch.ones(rows, self.n_codes, dtype=torch.bool), q.params, q.quantizer,
                                  q.bits))

    def encode(self, w: Tensor, mask: Tensor | None = None) -> QCodes:
        raise NotImplementedError

    def decode(self, q: QCodes) -> Tensor:
        raise NotImplementedError

    def project(self, w: Tensor, mask: Tensor | None = None) -> Tensor:
        """The closest grid point of every kept weight (``decode(encode(w, mask))``), ``+0.0`` where pruned."""
        return self.decode(self.encode(w, mask))

    def _mask(self, w: Tensor, mask: Tensor | None) -> Tensor:
        if mask is None:
            return torch.ones_like(w, dtype=torch.bool)
        if mask.shape != w.shape:
            raise RecipeError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(w.shape)}")
        return mask.to(device=w.device, dtype=torch.bool)

    def _codes(self, codes: Tensor, mask: Tensor, params: dict[str, Tensor], w: Tensor) -> QCodes:
        c = torch.where(mask, codes.reshape(w.shape).to(torch.int64), torch.zeros((), dtype=torch.int64))
        return QCodes(c, mask.clone(), params, str(self), self.bits, w.dtype)

    def __str__(self) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Quantizer) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))


@QUANTIZERS.register("int")
class IntQuantizer(Quantizer):
    """Uniform ``K``-bit grid.  ``sym``: levels ``−q … q`` (q = 2^(K−1) − 1), scale = max |w| / q, code =
    level + q.  ``asym``: levels ``0 … 2^K − 1`` with a zero point, the range [min, max] widened to hold 0
    (so 0 is exact), scale = range / (2^K − 1).  ``granularity``: one scale per ``tensor`` or per
    output ``channel`` (row)."""

    syntax = "int:K[:sym|asym][:tensor|channel]"
    help = "uniform K-bit grid (K = 1…8; sym needs K ≥ 2), scale per tensor or per output channel"

    def __init__(self, k: int, symmetric: bool = True, per_channel: bool = True) -> None:
        if not 1 <= k <= 8:
            raise RecipeError(f"int:K needs K in 1…8 bits, got {k}")
        if symmetric and k < 2:
            raise RecipeError("int:1:sym has no level but 0; use int:1:asym, binary or ternary")
        self.k, self.symmetric, self.per_channel = k, symmetric, per_channel

    @classmethod
    def parse(cls, text: str) -> Quantizer | None:
        parts = text.split(":")
        if parts[0] != "int" or len(parts) < 2 or not parts[1].isdigit():
            return None
        sym, chan = True, True
        for p in parts[2:]:
            if p in ("sym", "asym"):
                sym = p == "sym"
            elif p in ("tensor", "channel"):
                chan = p == "channel"
            else:
                return None
        return cls(int(parts[1]), sym, chan)

    @property
    def bits(self) -> int:
        return self.k

    def __str__(self) -> str:
        return f"int:{self.k}:{'sym' if self.symmetric else 'asym'}:{'channel' if self.per_channel else 'tensor'}"

    @property
    def n_codes(self) -> int:
        return (1 << self.k) - 1 if self.symmetric else 1 << self.k

    def _reduce(self, x: Tensor, keep: Tensor, fn: str) -> Tensor:
        fill = torch.tensor(-math.inf if fn == "max" else math.inf, dtype=x.dtype)
        y = torch.where(keep, x, fill)
        r = y.amax(dim=1, keepdim=True) if fn == "max" else y.amin(dim=1, keepdim=True)
        return torch.where(torch.isfinite(r), r, torch.zeros((), dtype=x.dtype))

    def _view(self, t: Tensor) -> Tensor:
        """One row per scale: the matrix view (per channel) or the whole tensor as one row."""
        return _rows(t) if self.per_channel else t.reshape(1, -1)

    def encode(self, w: Tensor, mask: Tensor | None = None) -> QCodes:
        mask = self._mask(w, mask)
        x, keep = self._view(w.detach()).float(), self._view(mask)
        if self.symmetric:
            q = 2 ** (self.k - 1) - 1
            s = self._reduce(x.abs(), keep, "max") / q
            zp = torch.zeros_like(s)
            lo, hi = -q, q
        else:
            L = 2 ** self.k - 1
            mn = self._reduce(x, keep, "min").clamp(max=0)
            s = (self._reduce(x, keep, "max").clamp(min=0) - mn) / L
            zp = torch.where(s > 0, torch.round(-mn / torch.where(s > 0, s, 1.0)), torch.zeros_like(s)).clamp(0, L) + 0.0
            lo, hi = 0, L
        safe = torch.where(s > 0, s, torch.ones_like(s))
        c = torch.clamp(torch.round(x / safe + zp), lo, hi)
        s = _polish(x, c - zp, keep, safe)
        c = torch.clamp(torch.round(x / s + zp), lo, hi)
        c = torch.where(s > 0, c, zp)                       # an all-zero row: every code is the zero level
        codes = c - lo if self.symmetric else c
        params = {"scale": s.reshape(-1)} if self.symmetric else {"scale": s.reshape(-1), "zero_point": zp.reshape(-1)}
        return self._codes(codes.reshape(w.shape), mask, params, w)

    def decode(self, q: QCodes) -> Tensor:
        s = q.params["scale"].reshape(-1, 1)
        zp = q.params["zero_point"].reshape(-1, 1) if "zero_point" in q.params else torch.zeros_like(s)
        c = self._view(q.codes).to(torch.float32)
        if self.symmetric:
            c = c - (2 ** (self.k - 1) - 1)
        v = (c - zp) * s
        return _finish(v, q.mask, torch.empty(q.codes.shape, dtype=q.dtype))


@QUANTIZERS.register("pow2")
class Pow2(Quantizer):
    """Power-of-two levels (ADMM-NN): 0 and ``±α·2^−j``, ``j = 0 … E−1`` with ``E = 2^(K−1) − 1``;
    α = max |w| of the kept weights (per tensor).  Code 0 = 0, ``1…E`` = +α·2^−(c−1), ``E+1…2E`` = −α·2^−(c−E−1).
    Nearest level in the Euclidean sense (the midpoint between two levels rounds up)."""

    syntax = "pow2:K"
    help = "0 and ±α·2^-j (K = 2…8 bits), α = max |w|"

    def __init__(self, k: int) -> None:
        if not 2 <= k <= 8:
            raise RecipeError(f"pow2:K needs K in 2…8 bits, got {k}")
        self.k = k

    @classmethod
    def parse(cls, text: str) -> Quantizer | None:
        k = _int_argument(text, "pow2")
        return None if k is None else cls(k)

    @property
    def bits(self) -> int:
        return self.k

    def __str__(self) -> str:
        return f"pow2:{self.k}"

    @property
    def n_codes(self) -> int:
        return (1 << self.k) - 1

    def encode(self, w: Tensor, mask: Tensor | None = None) -> QCodes:
        mask = self._mask(w, mask)
        x = w.detach().float()
        E = 2 ** (self.k - 1) - 1
        alpha = x.abs()[mask].max() if bool(mask.any()) else torch.zeros(())
        mags = alpha * torch.pow(2.0, -torch.arange(E, dtype=torch.float32))   # α, α/2, …
        levels = torch.cat([torch.zeros(1), mags])                               # index 0 = zero
        j = (x.abs().reshape(-1, 1) - levels).abs().argmin(dim=1).reshape(x.shape)
        codes = torch.where(j == 0, j, torch.where(x < 0, j + E, j))
        return self._codes(codes, mask, {"alpha": alpha.reshape(1)}, w)

    def decode(self, q: QCodes) -> Tensor:
        E = 2 ** (self.k - 1) - 1
        c = q.codes
        j = torch.where(c > E, c - E, c)
        mag = q.params["alpha"].reshape(()) * torch.pow(2.0, -(j - 1).clamp(min=0).to(torch.float32))
        v = torch.where(j == 0, torch.zeros(()), torch.where(c > E, -mag, mag))
        return _finish(v, q.mask, torch.empty(c.shape, dtype=q.dtype))


def _exact_mean(a: Tensor) -> Tensor:
    """Mean of ``a``; exactly the common value when all entries are equal (summation rounding otherwise
    moves it by an ulp, and the projection would not be idempotent)."""
    if a.numel() == 0:
        return torch.zeros(())
    if bool((a == a[0]).all()):
        return a[0].clone()
    return a.mean()


@QUANTIZERS.register("binary")
class Binary(Quantizer):
    """``±α`` per tensor, α = mean |w| of the kept weights (the L2-optimal scale for the signs, XNOR-Net);
    code 1 = +α (w ≥ 0), 0 = −α.  A kept weight never becomes 0."""

    syntax = "binary"
    help = "±α, α = mean |w|"
    has_zero = False

    @classmethod
    def parse(cls, text: str) -> Quantizer | None:
        return cls() if text == "binary" else None

    @property
    def bits(self) -> int:
        return 1

    def __str__(self) -> str:
        return "binary"

    def encode(self, w: Tensor, mask: Tensor | None = None) -> QCodes:
        mask = self._mask(w, mask)
        x = w.detach().float()
        alpha = _exact_mean(x.abs()[mask])
        return self._codes((x >= 0).to(torch.int64), mask, {"alpha": alpha.reshape(1)}, w)

    def decode(self, q: QCodes) -> Tensor:
        a = q.params["alpha"].reshape(())
        return _finish(torch.where(q.codes == 1, a, -a), q.mask, torch.empty(q.codes.shape, dtype=q.dtype))


@QUANTIZERS.register("ternary")
class Ternary(Quantizer):
    """``{−α, 0, +α}`` per tensor, the exact Euclidean projection: with the kept |w| sorted descending, keep
    the k largest where k maximises (Σ_top-k |w|)² / k, α = their mean; the rest round to 0 (counted as
    pruned by the constraint set).  Codes: 0 = 0, 1 = +α, 2 = −α."""

    syntax = "ternary"
    help = "−α, 0, +α (exact L2 projection)"

    @classmethod
    def parse(cls, text: str) -> Quantizer | None:
        return cls() if text == "ternary" else None

    @property
    def bits(self) -> int:
        return 2

    def __str__(self) -> str:
        return "ternary"

    @property
    def n_codes(self) -> int:
        return 3

    def encode(self, w: Tensor, mask: Tensor | None = None) -> QCodes:
        mask = self._mask(w, mask)
        x = w.detach().float()
        a = torch.where(mask, x.abs(), torch.zeros(())).reshape(-1)
        srt, order = torch.sort(a, descending=True, stable=True)
        n = int(mask.sum())
        if n == 0:
            return self._codes(torch.zeros_like(x, dtype=torch.int64), mask, {"alpha": torch.zeros(1)}, w)
        csum = torch.cumsum(srt[:n].double(), 0)
        k = int(torch.argmax(csum.pow(2) / torch.arange(1, n + 1, dtype=torch.float64))) + 1
        top = torch.zeros(a.numel(), dtype=torch.bool)
        top[order[:k]] = True
        top = top.reshape(x.shape) & mask
        alpha = _exact_mean(x.abs()[top])
        codes = torch.where(top, torch.where(x < 0, 2, 1), 0)
        return self._codes(codes, mask, {"alpha": alpha.reshape(1)}, w)

    def decode(self, q: QCodes) -> Tensor:
        a = q.params["alpha"].reshape(())
        v = torch.where(q.codes == 1, a, torch.where(q.codes == 2, -a, torch.zeros(())))
        return _finish(v, q.mask, torch.empty(q.codes.shape, dtype=q.dtype))


def kmeans_1d(x: Tensor, k: int, iters: int = 30) -> Tensor:
    """1-D k-means (Lloyd) with **linear initialisation** (k centroids evenly spaced over [min, max], the
    initialisation Deep Compression found best).  Returns ``(k,)`` sorted centroids; an empty cluster keeps
    its centroid.  With at most ``k`` distinct values the centroids are exactly those values (padded with
    the largest), which is the optimum and makes the projection idempotent."""
    x = x.detach().float().reshape(-1)
    if x.numel() == 0:
        return torch.zeros(k)
    uniq = torch.unique(x)
    if uniq.numel() <= k:
        return torch.cat([uniq, uniq[-1:].expand(k - uniq.numel())])
    c = torch.linspace(float(x.min()), float(x.max()), k)
    for _ in range(iters):
        assign = (x.reshape(-1, 1) - c).abs().argmin(dim=1)
        sums = torch.zeros(k).index_add_(0, assign, x)
        cnt = torch.zeros(k).index_add_(0, assign, torch.ones_like(x))
        new = torch.where(cnt > 0, sums / cnt.clamp(min=1), c)
        if torch.equal(new, c):
            break
        c = new
    return torch.sort(c).values


@QUANTIZERS.register("cluster")
class Cluster(Quantizer):
    """``K`` shared values per layer (Deep Compression's weight sharing): a codebook from 1-D k-means of the
    kept weights (:func:`kmeans_1d`, linear initialisation), code = index of the nearest centroid
    (⌈log2 K⌉ bits).  The codebook does not contain 0 unless a centroid lands there."""

    syntax = "cluster:K"
    help = "K shared values per layer (k-means, linear init), ⌈log2 K⌉ bits"
    has_zero = False

    def __init__(self, k: int) -> None:
        if not 2 <= k <= 256:
            raise RecipeError(f"cluster:K needs K in 2…256 centroids, got {k}")
        self.k = k

    @classmethod
    def parse(cls, text: str) -> Quantizer | None:
        k = _int_argument(text, "cluster")
        return None if k is None else cls(k)

    @property
    def bits(self) -> int:
        return max(1, (self.k - 1).bit_length())

    def __str__(self) -> str:
        return f"cluster:{self.k}"

    def encode(self, w: Tensor, mask: Tensor | None = None, codebook: Tensor | None = None) -> QCodes:
        """``codebook`` (optional): use these centroids instead of fitting (weight-sharing training)."""
        mask = self._mask(w, mask)
        x = w.detach().float()
        cb = kmeans_1d(x[mask], self.k) if codebook is None else codebook.detach().float().reshape(-1)
        codes = (x.reshape(-1, 1) - cb).abs().argmin(dim=1).reshape(x.shape)
        return self._codes(codes, mask, {"codebook": cb.clone()}, w)

    def decode(self, q: QCodes) -> Tensor:
        return _finish(q.params["codebook"][q.codes], q.mask, torch.empty(q.codes.shape, dtype=q.dtype))


@QUANTIZERS.register("fp16", aliases=("bf16",))
class HalfFloat(Quantizer):
    """The nearest ``float16`` / ``bfloat16`` value (round to nearest even); codes = its 16 raw bits.  A kept
    weight that underflows to 0 is counted as pruned."""

    syntax = "fp16 | bf16"
    help = "the nearest half-precision value (16-bit codes)"

    def __init__(self, kind: str = "fp16") -> None:
        self.kind = kind
        self.dtype = torch.float16 if kind == "fp16" else torch.bfloat16

    @classmethod
    def parse(cls, text: str) -> Quantizer | None:
        return cls(text) if text in ("fp16", "bf16") else None

    @property
    def bits(self) -> int:
        return 16

    def __str__(self) -> str:
        return self.kind

    def encode(self, w: Tensor, mask: Tensor | None = None) -> QCodes:
        mask = self._mask(w, mask)
        raw = w.detach().to(self.dtype).view(torch.int16).to(torch.int64) & 0xFFFF
        return self._codes(raw, mask, {}, w)

    def decode(self, q: QCodes) -> Tensor:
        raw = torch.where(q.codes >= 2 ** 15, q.codes - 2 ** 16, q.codes).to(torch.int16)
        return _finish(raw.view(self.dtype).float(), q.mask, torch.empty(q.codes.shape, dtype=q.dtype))


def parse_quantizer(spec: str | Quantizer) -> Quantizer:
    """Parse a quantizer string (see :func:`quantizer_syntax`) into a typed :class:`Quantizer`."""
    if isinstance(spec, Quantizer):
        return spec
    if not isinstance(spec, str):
        raise RecipeError(f"quantizer must be a string, got {type(spec).__name__} {spec!r}; "
                          f"valid: {quantizer_syntax()}")
    s = spec.strip().lower().replace(" ", "")
    for name in QUANTIZERS.names():
        try:
            q = QUANTIZERS.get(name).parse(s)
        except RecipeError as e:
            raise RecipeError(f"bad quantizer {spec!r}: {e}; valid: {quantizer_syntax()}") from None
        if q is not None:
            return q
    raise UnknownNameError(f"unknown quantizer {spec!r}; valid: {quantizer_syntax()}")


@dataclass(frozen=True)
class ConstraintSet:
    """"Pruned (by ``mask``) and on ``quantizer``'s grid": the one set ADMM's Z-step, quantization-aware
    retraining and storage project onto.

    :meth:`project` returns ``(values, mask')``: pruned weights ``+0.0``, kept weights on the grid, and
    ``mask' = mask & (values != 0)`` — a kept weight that the grid sends to 0 is counted as pruned (the
    mask only shrinks).  The result is a fixed point: ``project(values, mask') == (values, mask')`` bit for bit.

    ``polarize = K`` (> 1) adds FORMS' sign polarization (Yuan et al., ISCA 2021): every fragment of K
    consecutive weights of a column of the matrix view (K consecutive output rows) keeps one sign — the one
    with more energy among its kept weights (the Euclidean projection); the weights of the other sign leave
    the mask (counted as pruned) before quantization."""

    quantizer: Quantizer
    polarize: int = 0

    def polarized(self, w: Tensor, mask: Tensor) -> Tensor:
        """``mask`` without the weights whose sign disagrees with their fragment's (see the class docstring)."""
        k = self.polarize
        x, m = _rows(w.detach()).float(), _rows(mask)
        R, C = x.shape
        pad = (-R) % k
        xp = torch.cat([x, torch.zeros(pad, C)]) if pad else x
        mp = torch.cat([m, torch.zeros(pad, C, dtype=torch.bool)]) if pad else m
        e = torch.where(mp, xp, torch.zeros(())).pow(2).reshape(-1, k, C)
        frag_pos = (torch.where(xp.reshape(-1, k, C) > 0, e, torch.zeros(())).sum(1, keepdim=True)
                    >= torch.where(xp.reshape(-1, k, C) < 0, e, torch.zeros(())).sum(1, keepdim=True))
        agree = torch.where(frag_pos, xp.reshape(-1, k, C) > 0, xp.reshape(-1, k, C) < 0).reshape(-1, C)[:R]
        return mask & agree.reshape(mask.shape)

    def encode(self, w: Tensor, mask: Tensor | None = None) -> QCodes:
        """Codes of the projection, with the updated mask (``QCodes.mask``: kept weights sent to 0 leave it)."""
        q = self.quantizer
        m = q._mask(w, mask)
        if self.polarize > 1:
            m = self.polarized(w, m)
        qc = q.encode(w, m)
        v = q.decode(qc)
        qc.mask = qc.mask & (v != 0)
        qc.codes = torch.where(qc.mask, qc.codes, torch.zeros((), dtype=torch.int64))
        return qc

    def decode(self, qc: QCodes) -> Tensor:
        return self.quantizer.decode(qc)

    def project(self, w: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        qc = self.encode(w, mask)
        v = self.decode(qc)
        return v, qc.mask & (v != 0)

    def check(self, w: Tensor, mask: Tensor) -> QCodes:
        """Codes of ``w`` that decode to ``w`` bit for bit (``w`` must already be in the set: pruned
        weights 0, kept ones on the grid); raises :class:`RecipeError` naming the first difference."""
        qc = self.encode(w, mask & (w != 0))
        v = self.decode(qc)
        x = w.detach().reshape(-1)
        diff = (v.reshape(-1) != x) | ((x != 0) & (torch.signbit(v.reshape(-1)) != torch.signbit(x)))
        if bool(diff.any()):
            i = int(diff.nonzero()[0])
            raise RecipeError(f"weight is not on the {self.quantizer} grid: element {i} is "
                              f"{float(w.reshape(-1)[i])!r}, the grid gives {float(v.reshape(-1)[i])!r}")
        return qc


@dataclass
class QuantSpec:
    """Which weights are quantized and onto which grid: ``scheme`` for every target, ``overrides``
    ``{name_pattern: quantizer}`` per layer (first match; patterns on the module or parameter name, as
    ``prune.overrides``), ``targets`` (default: every Linear/Conv weight).  ``schedule``: the schemes of the
    earlier stages of a progressive run (ADMM-NN's 8 → 4 → 3 → 2 bits: ``schedule = ["int:8", "int:4",
    "int:3"]``, ``scheme = "int:2"``); the run is cut into ``len(schedule) + 1`` equal stages, the last one
    using ``scheme``.  Overridden layers keep their override in every stage."""

    scheme: str | Quantizer
    overrides: dict[str, str] = field(default_factory=dict)
    targets: TargetSpec | None = None
    schedule: list[str] = field(default_factory=list)
    polarize: int = 0            # FORMS sign polarization: fragments of this many weights of a column share a sign

    def __post_init__(self) -> None:
        self.scheme = parse_quantizer(self.scheme)
        if isinstance(self.polarize, bool) or not isinstance(self.polarize, int) or self.polarize < 0:
            raise RecipeError(f"quant.polarize: expected an integer >= 0 (fragment size; 0 = off), got {self.polarize!r}")
        if not isinstance(self.overrides, dict):
            raise RecipeError(f"quant.overrides: expected a mapping of name pattern → quantizer, got {self.overrides!r}")
        for pat, q in self.overrides.items():
            try:
                parse_quantizer(q)
            except RecipeError as e:
                raise RecipeError(f"quant.overrides[{pat!r}]: {e}") from None
        for i, q in enumerate(self.schedule):
            try:
                parse_quantizer(q)
            except RecipeError as e:
                raise RecipeError(f"quant.schedule[{i}]: {e}") from None

    @property
    def stages(self) -> int:
        return len(self.schedule) + 1

    def stage_at(self, fraction: float) -> int:
        """The stage of a run ``fraction`` (0…1) done."""
        return min(self.stages - 1, max(0, int(fraction * self.stages)))

    def layer_plan(self, names: Iterable[str], stage: int | None = None) -> dict[str, ConstraintSet]:
        """``{param_name: ConstraintSet}`` after overrides, at ``stage`` (default: the final scheme)."""
        base = parse_quantizer(self.scheme)
        if stage is not None and stage < len(self.schedule):
            base = parse_quantizer(self.schedule[stage])
        out: dict[str, ConstraintSet] = {}
        used: set[str] = set()
        names = list(names)
        for n in names:
            q = base
            for pat, ov in self.overrides.items():
                if fnmatch.fnmatchcase(n, pat) or fnmatch.fnmatchcase(n.removesuffix(".weight"), pat):
                    q = parse_quantizer(ov)
                    used.add(pat)
                    break
            out[n] = ConstraintSet(q, self.polarize)
        unused = set(self.overrides) - used
        if unused:
            raise RecipeError(f"quant.overrides patterns {sorted(unused)} match no quantized parameter; "
                              f"targets: {names[:20]}")
        return out

    def plan(self, model: nn.Module, stage: int | None = None) -> dict[str, ConstraintSet]:
        """The layer plan over the model's targets."""
        return self.layer_plan(find_targets(model, self.targets or TargetSpec()), stage)
