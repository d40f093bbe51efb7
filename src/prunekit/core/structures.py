"""Sparsity structures: how a weight is cut into groups, and how a group mask maps back.

Every structure works on the *matrix view* of a weight:

* ``nn.Linear`` weight ``(out, in)`` is used as is: rows = output units, columns = input units.
* ``nn.Conv2d`` weight ``(out, in, kh, kw)`` is viewed as the im2col GEMM matrix
  ``(out, in*kh*kw)`` (row-major over ``in, kh, kw``): a *row* is a whole filter, a *column* is one
  ``(in_channel, i, j)`` position across all filters (the "column pruning" of ADMM-NN), N:M groups run
  along that flattened input dimension, and a pattern tile is one ``kh×kw`` kernel.

A structure partitions the matrix into groups (``partition`` → ``(G, S)`` zero-padded when an edge
group is partial) and maps a group-level decision back to elements (``unpartition``).  Scoring,
selection, ADMM projection, group lasso and compaction all go through this one partition.

Partial edge blocks: ``block:RxC`` on a matrix that R or C does not divide gets smaller blocks on the
bottom/right edges (zero padding is used only internally; padded entries never count toward a
group's norm or toward sparsity).  The *number of groups* pruned is ``round(sparsity * G)``, so with
partial blocks the element sparsity can differ slightly from the requested value; the reports always
give the measured element sparsity.

Strings are parsed once, at the boundary, with :func:`parse_structure`::

    unstructured | row | column | block:RxC | nm:N:M | pattern[:K[:P]] [ (Linear tile) @RxC ] [+conn]

N:M means **N kept** in every M consecutive weights along the input dimension (NVIDIA's 2:4 = 2 kept).
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from prunekit.core.scoring import ScoreFn, group_scores, resolve_score, select_keep

__all__ = [
    "Structure", "Unstructured", "Row", "Column", "Block", "NM", "Pattern",
    "parse_structure", "as_matrix", "STRUCTURE_SYNTAX",
]

STRUCTURE_SYNTAX = (
    "unstructured | row | column | block:RxC (e.g. block:4x4) | nm:N:M (N kept of M, e.g. nm:2:4) | "
    "pattern | pattern:K (K kept per tile) | pattern:K:P (set of P patterns) | pattern...@RxC (Linear tile) "
    "| pattern...+conn (connectivity pruning of whole tiles)"
)


def as_matrix(w: Tensor) -> Tensor:
    """The 2-D matrix view (a view, no copy) of a Linear or Conv weight: ``(out, numel/out)``."""
    if w.dim() < 2:
        raise ValueError(f"cannot prune a {w.dim()}-D tensor of shape {tuple(w.shape)}: structures need a Linear or Conv weight")
    return w.reshape(w.shape[0], -1)


def _check_sparsity(sparsity: float) -> float:
    s = float(sparsity)
    if not (0.0 <= s < 1.0) or math.isnan(s):
        raise ValueError(f"sparsity must be in [0, 1) (fraction of weights that are zero); got {sparsity}")
    return s


class Structure:
    """Base class.  Subclasses define ``partition``/``unpartition``; selection is shared."""

    name: str = "structure"

    # -- partition -----------------------------------------------------------------------------
    def partition(self, w: Tensor) -> Tensor:
        """Weight (any supported shape) → ``(G, S)`` tensor of groups, zero-padded."""
        raise NotImplementedError

    def unpartition(self, groups: Tensor, shape: torch.Size | Sequence[int]) -> Tensor:
        """Inverse of :meth:`partition`: ``(G, S)`` → tensor of ``shape`` (padding dropped)."""
        raise NotImplementedError

    def valid(self, shape: Sequence[int]) -> Tensor:
        """``(G, S)`` bool: which group slots are real weights (False = padding)."""
        ones = torch.ones(tuple(shape), dtype=torch.float32)
        return self.partition(ones) > 0

    def num_groups(self, shape: Sequence[int]) -> int:
        return int(self.partition(torch.zeros(tuple(shape))).shape[0])

    def check_shape(self, shape: Sequence[int]) -> None:
        """Raise ``ValueError`` naming the problem if this structure cannot apply to ``shape``."""
        if len(shape) < 2:
            raise ValueError(f"{self} needs a 2-D (Linear) or 4-D (Conv) weight, got shape {tuple(shape)}")

    # -- selection -----------------------------------------------------------------------------
    def group_mask(self, w: Tensor, sparsity: float, score: ScoreFn | str | Tensor = "l2") -> Tensor:
        """``(G,)`` bool keep-decision per group: prune ``round(sparsity*G)`` lowest-scoring groups."""
        scores = self.scores(w, score)
        return select_keep(scores, _check_sparsity(sparsity))

    def scores(self, w: Tensor, score: ScoreFn | str | Tensor = "l2") -> Tensor:
        """``(G,)`` group scores.  ``score`` may be a name, a callable on ``(G,S)``, or an element-wise
        importance tensor of the weight's shape (then grouped and reduced with the L2 norm)."""
        if isinstance(score, Tensor):
            if score.shape != w.shape:
                raise ValueError(f"importance tensor shape {tuple(score.shape)} != weight shape {tuple(w.shape)}")
            return group_scores(self.partition(score.detach()), resolve_score("l2"))
        return group_scores(self.partition(w.detach()), resolve_score(score))

    def mask(self, w: Tensor, sparsity: float, score: ScoreFn | str | Tensor = "l2") -> Tensor:
        """Element keep-mask (True = kept) of ``w.shape``."""
        self.check_shape(w.shape)
        keep = self.group_mask(w, sparsity, score)
        if self._all_valid:
            g = keep[:, None].expand(-1, self.partition(w).shape[1])
        else:
            g = self.valid(w.shape) & keep[:, None]
        return self.unpartition(g, w.shape).bool()

    _all_valid = False  # True where partition() never pads (skips building the validity tensor)

    def project(self, w: Tensor, sparsity: float) -> Tensor:
        """Euclidean projection of ``w`` onto {weights with this structure at ``sparsity``}.

        For group structures the projection keeps the groups of largest L2 norm (the ADMM Z-step)."""
        return w * self.mask(w, sparsity, "l2").to(w.dtype)

    def group_norms(self, w: Tensor) -> Tensor:
        """``(G,)`` L2 norms of the groups (group lasso, ADMM diagnostics).  Differentiable."""
        return self.partition(w).pow(2).sum(1).clamp_min(0).sqrt()

    def fixed_sparsity(self, shape: Sequence[int]) -> float | None:
        """Sparsity the structure implies by itself (N:M, fixed patterns), else None."""
        return None

    def __str__(self) -> str:  # the canonical string form, parseable by parse_structure
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Structure) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))


class Unstructured(Structure):
    """Each weight is its own group (irregular, magnitude pruning)."""

    name = "unstructured"
    _all_valid = True

    def partition(self, w: Tensor) -> Tensor:
        return w.reshape(-1, 1)

    def unpartition(self, groups: Tensor, shape) -> Tensor:
        return groups.reshape(tuple(shape))

    def valid(self, shape) -> Tensor:
        return torch.ones(math.prod(shape), 1, dtype=torch.bool)


class Row(Structure):
    """Whole rows (output units; conv filters)."""

    name = "row"
    _all_valid = True

    def partition(self, w: Tensor) -> Tensor:
        return as_matrix(w)

    def unpartition(self, groups: Tensor, shape) -> Tensor:
        return groups.reshape(tuple(shape))

    def valid(self, shape) -> Tensor:
        return torch.ones(shape[0], math.prod(shape[1:]), dtype=torch.bool)


class Column(Structure):
    """Whole columns (input units of a Linear; im2col columns of a conv)."""

    name = "column"
    _all_valid = True

    def partition(self, w: Tensor) -> Tensor:
        return as_matrix(w).t()

    def unpartition(self, groups: Tensor, shape) -> Tensor:
        return groups.t().reshape(tuple(shape))

    def valid(self, shape) -> Tensor:
        return torch.ones(math.prod(shape[1:]), shape[0], dtype=torch.bool)


def _pad_to(m: Tensor, r: int, c: int) -> Tensor:
    R, C = m.shape
    pr, pc = (-R) % r, (-C) % c
    if pr or pc:
        m = torch.nn.functional.pad(m, (0, pc, 0, pr))
    return m


def _tiles(m: Tensor, r: int, c: int) -> Tensor:
    """``(R, C)`` → ``(nR*nC, r*c)`` tiles in row-major tile order (zero-padded)."""
    m = _pad_to(m, r, c)
    R, C = m.shape
    return m.reshape(R // r, r, C // c, c).permute(0, 2, 1, 3).reshape(-1, r * c)


def _untiles(t: Tensor, R: int, C: int, r: int, c: int) -> Tensor:
    nR, nC = -(-R // r), -(-C // c)
    m = t.reshape(nR, nC, r, c).permute(0, 2, 1, 3).reshape(nR * r, nC * c)
    return m[:R, :C]


@dataclass(frozen=True, eq=False)
class Block(Structure):
    """Whole ``R×C`` blocks of the matrix view (partial blocks on the bottom/right edges)."""

    r: int
    c: int

    def __post_init__(self):
        if self.r < 1 or self.c < 1:
            raise ValueError(f"block shape must be positive, got {self.r}x{self.c}")

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"block:{self.r}x{self.c}"

    def check_shape(self, shape) -> None:
        super().check_shape(shape)
        R, C = shape[0], math.prod(shape[1:])
        if self.r > R or self.c > C:
            raise ValueError(
                f"{self.name} does not fit a weight whose matrix view is {R}x{C} "
                f"(shape {tuple(shape)}); use a block no larger than the matrix")

    def partition(self, w: Tensor) -> Tensor:
        return _tiles(as_matrix(w), self.r, self.c)

    def unpartition(self, groups: Tensor, shape) -> Tensor:
        R, C = shape[0], math.prod(shape[1:])
        return _untiles(groups, R, C, self.r, self.c).reshape(tuple(shape))


@dataclass(frozen=True, eq=False)
class NM(Structure):
    """N kept in every M consecutive weights along the input dimension (per row of the matrix view).

    A row length that M does not divide ends with a partial group of ``k < M`` weights, which keeps
    ``min(N, k)`` of them.  Groups are the M-runs; ``sparsity`` below ``1 - N/M`` (as used by gradual
    schedules on the way to N:M) keeps ``M - round(sparsity*M)`` per run (never fewer than N);
    a sparsity above ``1 - N/M`` is an error.
    """

    n: int
    m: int

    def __post_init__(self):
        if not (1 <= self.n <= self.m):
            raise ValueError(f"N:M needs 1 <= N <= M (N kept of every M); got {self.n}:{self.m}")

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"nm:{self.n}:{self.m}"

    def fixed_sparsity(self, shape) -> float:
        return 1.0 - self.n / self.m

    def partition(self, w: Tensor) -> Tensor:
        m = as_matrix(w)
        return _tiles(m, 1, self.m)

    def unpartition(self, groups: Tensor, shape) -> Tensor:
        R, C = shape[0], math.prod(shape[1:])
        return _untiles(groups, R, C, 1, self.m).reshape(tuple(shape))

    def keep_per_group(self, sparsity: float) -> int:
        s = _check_sparsity(sparsity)
        if s > 1.0 - self.n / self.m + 1e-9:
            raise ValueError(f"{self.name} keeps {self.n} of {self.m} (sparsity {1 - self.n / self.m:.3g}); "
                             f"sparsity {s} is beyond what it allows")
        return max(self.n, self.m - int(round(s * self.m)))

    def mask(self, w: Tensor, sparsity: float | None = None, score="l2") -> Tensor:
        self.check_shape(w.shape)
        k = self.n if sparsity is None else self.keep_per_group(sparsity)
        src = score if isinstance(score, Tensor) else w
        g = self.partition(src.detach().abs().float())
        valid = self.valid(w.shape)
        g = torch.where(valid, g, torch.full_like(g, -1.0))  # padding is chosen last
        # stable, deterministic: sort descending by score, ties → lower index first
        order = torch.argsort(-g, dim=1, stable=True)
        keep = torch.zeros_like(valid)
        keep.scatter_(1, order[:, :k], True)
        return self.unpartition(keep & valid, w.shape).bool()

    def group_mask(self, w, sparsity, score="l2"):
        raise TypeError(f"{self.name} selects inside each group, not whole groups; use mask()")


def _all_patterns(tile: int, keep: int) -> Tensor:
    combos = list(itertools.combinations(range(tile), keep))
    p = torch.zeros(len(combos), tile, dtype=torch.bool)
    for i, cmb in enumerate(combos):
        p[i, list(cmb)] = True
    return p


@dataclass(frozen=True, eq=False)
class Pattern(Structure):
    """Pattern pruning (PatDNN, Niu et al. ASPLOS 2020) with optional connectivity pruning.

    Tiles are the ``kh×kw`` kernels of a Conv2d, or ``R×C`` tiles (``tile``, default 4x4) of a Linear.
    Each tile keeps the pattern from the *pattern set* with the largest L2 norm ``‖W_tile ⊙ P‖₂``.

    * ``keep`` = entries kept per tile.  ``None``: derived from the requested sparsity,
      ``ceil((1-sparsity) * tile_size)``.
    * ``set_size`` = number of patterns in the set.  ``None`` = every ``C(tile, keep)`` pattern when
      there are at most 256 of them (e.g. 126 for 4 of 3×3), else a generated set of 8.  Otherwise the set is *generated* from the weight, as in PatDNN: each tile's own best
      ``keep``-entry pattern is counted and the ``set_size`` most frequent form the set.
      An explicit set can be passed as ``patterns`` (a ``(P, tile)`` bool tensor) in Python.
    * ``conn`` = connectivity pruning: after patterns, whole tiles with the smallest remaining L2
      norm are removed until the requested sparsity is reached.  Without ``conn``, the sparsity is
      the pattern's own ``1 - keep/tile`` and a larger request is an error.  With an explicit ``keep``
      the sparsity is never below ``1 - keep/tile`` (a smaller request gets the pattern's own).
    """

    keep: int | None = None
    set_size: int | None = None
    tile: tuple[int, int] | None = None
    conn: bool = False
    patterns: Tensor | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.keep is not None and self.keep < 1:
            raise ValueError(f"pattern keep must be >= 1, got {self.keep}")
        if self.set_size is not None and self.set_size < 1:
            raise ValueError(f"pattern set size must be >= 1, got {self.set_size}")
        if self.tile is not None and (self.tile[0] < 1 or self.tile[1] < 1):
            raise ValueError(f"pattern tile must be positive, got {self.tile}")

    @property
    def name(self) -> str:  # type: ignore[override]
        s = "pattern"
        if self.keep is not None:
            s += f":{self.keep}"
            if self.set_size is not None:
                s += f":{self.set_size}"
        if self.tile is not None:
            s += f"@{self.tile[0]}x{self.tile[1]}"
        if self.conn:
            s += "+conn"
        return s

    def _tile_shape(self, shape) -> tuple[int, int]:
        if len(shape) == 4:
            return int(shape[2]), int(shape[3])
        return self.tile or (4, 4)

    def check_shape(self, shape) -> None:
        super().check_shape(shape)
        if len(shape) == 4 and self.tile is not None and tuple(self.tile) != (shape[2], shape[3]):
            raise ValueError(f"{self.name}: conv tiles are the kernels ({shape[2]}x{shape[3]}), not {self.tile}")
        tr, tc = self._tile_shape(shape)
        if len(shape) == 2 and (tr > shape[0] or tc > shape[1]):
            raise ValueError(f"{self.name}: tile {tr}x{tc} does not fit a {shape[0]}x{shape[1]} weight")
        if self.keep is not None and self.keep > tr * tc:
            raise ValueError(f"{self.name}: keeps {self.keep} entries but a tile has only {tr * tc}")

    def partition(self, w: Tensor) -> Tensor:
        if w.dim() == 4:
            return w.reshape(-1, w.shape[2] * w.shape[3])
        tr, tc = self._tile_shape(w.shape)
        return _tiles(as_matrix(w), tr, tc)

    def unpartition(self, groups: Tensor, shape) -> Tensor:
        if len(shape) == 4:
            return groups.reshape(tuple(shape))
        tr, tc = self._tile_shape(shape)
        R, C = shape[0], math.prod(shape[1:])
        return _untiles(groups, R, C, tr, tc).reshape(tuple(shape))

    def keep_for(self, shape, sparsity: float) -> int:
        tr, tc = self._tile_shape(shape)
        T = tr * tc
        if self.keep is not None:
            return self.keep
        return max(1, math.ceil((1.0 - _check_sparsity(sparsity)) * T - 1e-9))

    def fixed_sparsity(self, shape) -> float | None:
        if self.keep is None or self.conn:
            return None
        tr, tc = self._tile_shape(shape)
        return 1.0 - self.keep / (tr * tc)

    def pattern_set(self, w: Tensor, keep: int) -> Tensor:
        """The ``(P, tile)`` bool pattern set for this weight (given, all, or generated)."""
        tr, tc = self._tile_shape(w.shape)
        T = tr * tc
        if self.patterns is not None:
            p = self.patterns.reshape(self.patterns.shape[0], -1).bool()
            if p.shape[1] != T:
                raise ValueError(f"pattern set has tiles of {p.shape[1]} entries, weight tiles have {T}")
            return p
        size = self.set_size
        if size is None:
            if math.comb(T, keep) <= 256:
                return _all_patterns(T, keep)
            size = 8
        # generated: most frequent per-tile top-`keep` patterns (PatDNN's pattern-set generation)
        g = self.partition(w.detach().abs().float())
        order = torch.argsort(-g, dim=1, stable=True)[:, :keep]
        own = torch.zeros_like(g, dtype=torch.bool).scatter_(1, order, True)
        uniq, counts = torch.unique(own, dim=0, return_counts=True)
        # most frequent first; ties broken by the pattern's bits (deterministic)
        keys = [(-int(c), tuple(int(x) for x in u.tolist())) for u, c in zip(uniq, counts)]
        idx = sorted(range(len(keys)), key=lambda i: keys[i])[:size]
        return uniq[idx]

    def mask(self, w: Tensor, sparsity: float, score="l2") -> Tensor:
        self.check_shape(w.shape)
        s = _check_sparsity(sparsity)
        keep = self.keep_for(w.shape, s)
        fixed = self.fixed_sparsity(w.shape)
        if fixed is not None and s > fixed + 1e-9:
            raise ValueError(f"{self.name} gives sparsity {fixed:.3g} on this weight; {s} needs connectivity "
                             f"pruning ('{self.name}+conn') or fewer kept entries")
        pats = self.pattern_set(w, keep).to(torch.float32)
        src = score if isinstance(score, Tensor) else w
        g2 = self.partition(src.detach().float()).pow(2)
        valid = self.valid(w.shape)
        # energy of each tile under each pattern; argmax → first best (deterministic)
        energy = g2 @ pats.t()
        best = torch.argmax(energy, dim=1)
        keep_mask = pats.bool()[best] & valid
        if self.conn or self.keep is None:
            connectivity_prune(keep_mask, g2, valid, s)
        return self.unpartition(keep_mask, w.shape).bool()

    def project(self, w: Tensor, sparsity: float) -> Tensor:
        return w * self.mask(w, sparsity).to(w.dtype)

    def group_mask(self, w, sparsity, score="l2"):
        raise TypeError(f"{self.name} selects a pattern per tile, not whole groups; use mask()")


def connectivity_prune(keep_mask: Tensor, g2: Tensor, valid: Tensor, sparsity: float,
                       protected: Tensor | None = None) -> Tensor:
    """Connectivity pruning (PatDNN): drop whole tiles, lowest kept energy first, until the element
    sparsity over ``valid`` entries is nearest ``sparsity``.  ``keep_mask`` ``(G, T)`` is changed in place;
    tiles flagged in ``protected`` ``(G,)`` are never dropped (nested shared-weight levels)."""
    total = int(valid.sum())
    target_kept = total - int(round(sparsity * total))
    kept_per_tile = keep_mask.sum(1)
    tile_energy = (g2 * keep_mask).sum(1)
    if protected is not None:
        tile_energy = tile_energy.masked_fill(protected, math.inf)
    order = torch.argsort(tile_energy, stable=True)
    cum = torch.cumsum(kept_per_tile[order], 0)
    excess = int(kept_per_tile.sum()) - target_kept
    if excess > 0:
        n_drop = int(torch.searchsorted(cum, torch.tensor(excess)).item()) + 1
        # drop the tile count whose removal lands nearest the target
        if n_drop > 1 and abs(int(cum[n_drop - 2]) - excess) <= abs(int(cum[n_drop - 1]) - excess):
            n_drop -= 1
        drop = order[:n_drop]
        if protected is not None:
            drop = drop[~protected[drop]]
        keep_mask[drop] = False
    return keep_mask


_BLOCK_RE = re.compile(r"^block:(\d+)x(\d+)$")
_NM_RE = re.compile(r"^nm:(\d+):(\d+)$")
_PAT_RE = re.compile(r"^pattern(?::(\d+)(?::(\d+))?)?(?:@(\d+)x(\d+))?(\+conn)?$")


def parse_structure(spec: "str | Structure") -> Structure:
    """Parse a structure string (see :data:`STRUCTURE_SYNTAX`) into a typed :class:`Structure`."""
    if isinstance(spec, Structure):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"structure must be a string, got {type(spec).__name__} {spec!r}; valid: {STRUCTURE_SYNTAX}")
    s = spec.strip().lower().replace(" ", "")
    if s in ("unstructured", "irregular"):
        return Unstructured()
    if s == "row":
        return Row()
    if s == "column":
        return Column()
    if m := _BLOCK_RE.match(s):
        r, c = int(m[1]), int(m[2])
        if r < 1 or c < 1:
            raise ValueError(f"bad structure {spec!r}: block shape must be positive")
        return Block(r, c)
    if m := _NM_RE.match(s):
        n, mm = int(m[1]), int(m[2])
        if not (1 <= n <= mm):
            raise ValueError(f"bad structure {spec!r}: N:M needs 1 <= N <= M (N kept of every M)")
        return NM(n, mm)
    if m := _PAT_RE.match(s):
        keep = int(m[1]) if m[1] else None
        size = int(m[2]) if m[2] else None
        tile = (int(m[3]), int(m[4])) if m[3] else None
        return Pattern(keep=keep, set_size=size, tile=tile, conn=bool(m[5]))
    raise ValueError(f"unknown structure {spec!r}; valid: {STRUCTURE_SYNTAX}")


StructureLike = "str | Structure"
ScoreLike = "str | Callable[[Tensor], Tensor] | Tensor"
