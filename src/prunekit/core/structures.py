"""Sparsity structures: one protocol for how a weight is cut into groups and what is kept in them.

Every structure works on the *matrix view* of a weight:

* ``nn.Linear`` weight ``(out, in)`` is used as is: rows = output units, columns = input units.
* ``nn.Conv2d`` weight ``(out, in, kh, kw)`` is viewed as the im2col GEMM matrix
  ``(out, in*kh*kw)`` (row-major over ``in, kh, kw``): a *row* is a whole filter, a *column* is one
  ``(in_channel, i, j)`` position across all filters (the "column pruning" of ADMM-NN), N:M groups run
  along that flattened input dimension, and a pattern tile is one ``kh×kw`` kernel.

The protocol (every structure implements it; nothing outside dispatches on the structure's type):

* **partition** — ``partition(w) → (G, S)`` groups, zero-padded where an edge group is partial;
  ``unpartition(groups, shape)`` its inverse; ``valid(shape)`` which slots are real weights;
  ``group_index(shape)`` the flat element index of every slot (``-1`` = padding): the *group layout*
  that storage encodes (:mod:`prunekit.deploy.storage`).
* **selection within groups** — ``select(parts, valid, sparsity, score, base) → (G, S)`` keep: whole
  groups for unstructured/row/column/block, ``N`` of every ``M`` for N:M, the best pattern of the set
  per tile for pattern.  ``base`` (``(G, S)`` bool, optional) marks entries that **must stay kept**
  (nested shared-weight levels).
* **the template** — ``mask(w, sparsity, score, base)`` is the same for all: partition the scores →
  ``select`` → unpartition.  ``project(w, sparsity)`` = ``w ⊙ mask(w, sparsity, "l2")`` is the
  Euclidean projection onto the structure's constraint set (the ADMM Z-step).
* ``group_norms(w)`` (differentiable L2 per group: group lasso), ``scores(w, score)`` (per-group
  scores: global ranking), ``selects_groups`` (True when ``select`` keeps or drops whole groups).

Partial edge blocks: ``block:RxC`` on a matrix that R or C does not divide gets smaller blocks on the
bottom/right edges.  Padding never counts toward a group's score or toward sparsity; a partial group is
scored **per real weight** (its score is rescaled to a full group's: mean |w| for ``l1``, root mean
square for ``l2``; :func:`prunekit.core.scoring.group_scores`), and with groups of unequal size the
selection prunes lowest-score groups while at most ``round(sparsity * weights)`` weights are gone, so
the element sparsity is the requested one within one group's share.  Where all groups are full, the
number of groups pruned is ``round(sparsity * G)`` (``torch.nn.utils.prune``'s rule).

Strings are parsed once, at the boundary, with :func:`parse_structure`; the structures are registered
in :data:`STRUCTURES` with their syntax and a one-line description (:func:`structure_syntax`)::

    unstructured | row | column | block:RxC | nm:N:M | pattern[:K[:P]] [ (Linear tile) @RxC ] [+conn]
    transposed:S   (S on a weight stored (in, out), HF Conv1D; what a Conv1D's mask structure prints as)

N:M means **N kept** in every M consecutive weights along the input dimension (NVIDIA's 2:4 = 2 kept).
"""
from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, NoReturn

import torch
from torch import Tensor

from prunekit.core.errors import RecipeError, UnknownNameError
from prunekit.core.registry import Registry
from prunekit.core.scoring import Score, ScoreFn, group_scores, resolve_score, select_groups

__all__ = [
    "Transposed",
    "Structure", "Unstructured", "Row", "Column", "Block", "NM", "Pattern", "GroupStructure", "GROUP_KINDS", "STRUCTURES",
    "parse_structure", "as_matrix", "structure_syntax", "STRUCTURE_SYNTAX", "connectivity_prune",
]

ScoreArg = "ScoreFn | str | Tensor | Score"


def as_matrix(w: Tensor) -> Tensor:
    """The 2-D matrix view (a view, no copy) of a Linear or Conv weight: ``(out, numel/out)``."""
    if w.dim() < 2:
        raise RecipeError(f"cannot prune a {w.dim()}-D tensor of shape {tuple(w.shape)}: structures need a Linear or Conv weight")
    return w.reshape(w.shape[0], -1)


def _matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    return int(shape[0]), math.prod(shape[1:])


def _check_sparsity(sparsity: float) -> float:
    s = float(sparsity)
    if not (0.0 <= s < 1.0) or math.isnan(s):
        raise RecipeError(f"sparsity must be in [0, 1) (fraction of weights that are zero); got {sparsity}")
    return s


def _score_input(w: Tensor, score: ScoreFn | str | Tensor | Score) -> tuple[Tensor, Score]:
    """What is partitioned and how a group is scored: the weight and ``score``, or an element-wise
    importance tensor of the weight's shape (then grouped with the L2 norm)."""
    if isinstance(score, Tensor):
        if score.shape != w.shape:
            raise RecipeError(f"importance tensor shape {tuple(score.shape)} != weight shape {tuple(w.shape)}")
        return score.detach(), resolve_score("l2")
    return w.detach(), resolve_score(score)


STRUCTURES: Registry[type[Structure]] = Registry("structure")


def structure_syntax() -> str:
    """The syntax help of every registered structure (for ``prunekit info`` and error messages)."""
    return " | ".join(f"{STRUCTURES.get(n).syntax} ({STRUCTURES.get(n).help})" for n in _parse_order())


def _parse_order() -> list[str]:
    return sorted(STRUCTURES.names(), key=lambda n: (STRUCTURES.get(n).order, n))


class Structure:
    """The structure protocol (see the module docstring).  Subclasses define the partition and
    :meth:`select`; :meth:`mask` is the one template."""

    name: str = "structure"
    syntax: ClassVar[str] = ""
    help: ClassVar[str] = ""
    order: ClassVar[int] = 100
    selects_groups: ClassVar[bool] = True   # select() keeps or drops whole groups
    coupled: ClassVar[bool] = False         # units of the model's coupled groups (GroupStructure), not per tensor

    @classmethod
    def parse(cls, text: str) -> Structure | None:
        """The structure ``text`` (lower-case, no spaces) names, or None if it is not this kind."""
        raise NotImplementedError

    # -- partition -----------------------------------------------------------------------------
    def partition(self, w: Tensor) -> Tensor:
        """Weight (any supported shape) → ``(G, S)`` tensor of groups, zero-padded."""
        raise NotImplementedError

    def unpartition(self, groups: Tensor, shape: torch.Size | Sequence[int]) -> Tensor:
        """Inverse of :meth:`partition`: ``(G, S)`` → tensor of ``shape`` (padding dropped)."""
        raise NotImplementedError

    def group_index(self, shape: Sequence[int]) -> Tensor:
        """``(G, S)`` long: the flat (row-major) index of each slot's element; ``-1`` for padding.
        The group layout storage encodes."""
        idx = torch.arange(1, math.prod(shape) + 1, dtype=torch.long).reshape(tuple(shape))
        return self.partition(idx) - 1

    def valid(self, shape: Sequence[int]) -> Tensor:
        """``(G, S)`` bool: which group slots are real weights (False = padding)."""
        return self.group_index(shape) >= 0

    def num_groups(self, shape: Sequence[int]) -> int:
        return int(self.partition(torch.zeros(tuple(shape))).shape[0])

    def check_shape(self, shape: Sequence[int]) -> None:
        """Raise ``ValueError`` naming the problem if this structure cannot apply to ``shape``."""
        if len(shape) < 2:
            raise RecipeError(f"{self} needs a 2-D (Linear) or 4-D (Conv) weight, got shape {tuple(shape)}")

    # -- selection -----------------------------------------------------------------------------
    def select(self, parts: Tensor, valid: Tensor, sparsity: float, score: Score,
               base: Tensor | None = None) -> Tensor:
        """``(G, S)`` bool keep from the partitioned scores ``parts``; ``base`` entries stay kept.

        Default (whole groups): the groups with the lowest per-real-weight scores are dropped
        (:func:`prunekit.core.scoring.select_groups`); a group holding a ``base`` entry is kept."""
        sizes = valid.sum(1)
        scores = group_scores(parts, score, sizes)
        bg = None
        if base is not None:
            bg = base.any(1)
            scores = scores.masked_fill(bg, math.inf)
        keep = select_groups(scores, sizes, sparsity)
        if bg is not None and bool((bg & ~keep).any()):
            raise RecipeError(f"{self}: sparsity {sparsity} keeps fewer groups ({int(keep.sum())}) than the sparser "
                             f"level ({int(bg.sum())}); give levels sparsest first with decreasing sparsity")
        return valid & keep[:, None]

    def resolve_sparsity(self, shape: Sequence[int], sparsity: float | None) -> float:
        """``sparsity`` checked; ``None`` = the structure's own (N:M, fixed patterns)."""
        if sparsity is None:
            fixed = self.fixed_sparsity(shape)
            if fixed is None:
                raise RecipeError(f"{self} needs a sparsity")
            return fixed
        return _check_sparsity(sparsity)

    def mask(self, w: Tensor, sparsity: float | None = None, score: ScoreFn | str | Tensor | Score = "l2",
             base: Tensor | None = None) -> Tensor:
        """Element keep-mask (True = kept) of ``w.shape``: partition → score → select → unpartition.

        ``score``: a name, a callable on ``(G, S)``, or an element-wise importance tensor of ``w``'s
        shape.  ``base``: a keep-mask of ``w``'s shape that the result must contain (nested levels)."""
        self.check_shape(w.shape)
        s = self.resolve_sparsity(w.shape, sparsity)
        src, sc = _score_input(w, score)
        b = None
        if base is not None:
            if base.shape != w.shape:
                raise RecipeError(f"base mask shape {tuple(base.shape)} != weight shape {tuple(w.shape)}")
            b = self.partition(base.detach().to(torch.uint8)) > 0
        keep = self.select(self.partition(src), self.valid(w.shape), s, sc, b)
        m = self.unpartition(keep, w.shape).bool()
        if base is not None and bool((base.bool() & ~m).any()):
            raise RecipeError(f"{self}: cannot nest sparsity {s} around the sparser level's mask "
                             f"(base sparsity {1 - base.float().mean().item():.4f}); is the level denser?")
        return m

    def project(self, w: Tensor, sparsity: float) -> Tensor:
        """Euclidean projection of ``w`` onto {weights with this structure at ``sparsity``}: the
        ADMM Z-step ``Π_S(W + U)`` (:mod:`prunekit.algorithms.admm`)."""
        return w * self.mask(w, sparsity, "l2").to(w.dtype)

    def scores(self, w: Tensor, score: ScoreFn | str | Tensor | Score = "l2") -> Tensor:
        """``(G,)`` group scores (partial groups per real weight) — the global ranking's input."""
        src, sc = _score_input(w, score)
        return group_scores(self.partition(src), sc, self.valid(w.shape).sum(1))

    def group_norms(self, w: Tensor, smooth: float = 0.0) -> Tensor:
        """``(G,)`` L2 norms ``sqrt(Σ_g w² + smooth²)`` of the groups (group lasso: every structure's
        penalty groups are its partition; padding adds nothing).  Differentiable."""
        return (self.partition(w).pow(2).sum(1) + smooth * smooth).clamp_min(0).sqrt()

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



def _swap(shape: Sequence[int]) -> tuple[int, int]:
    if len(shape) != 2:
        raise RecipeError(f"a transposed (in, out) weight must be 2-D, got shape {tuple(shape)}")
    return int(shape[1]), int(shape[0])


@dataclass(frozen=True, eq=False)
class Transposed(Structure):
    """``inner`` on a weight stored ``(in, out)`` — HF GPT-2 ``Conv1D`` — so every structure keeps its
    meaning: rows are output units, N:M and blocks run along the input dimension as for ``nn.Linear``.
    :meth:`PruneSpec.layer_plan` wraps a Conv1D's structure in it.  Its string form is
    ``transposed:INNER`` (e.g. ``transposed:nm:2:4``), which parses back to this object, so a
    :class:`~prunekit.core.masks.MaskSet`'s structure strings keep the axis of the stored tensor."""

    inner: Structure = field(default_factory=lambda: Unstructured())

    syntax: ClassVar[str] = "transposed:S"
    help: ClassVar[str] = "S on a weight stored (in, out) (HF Conv1D): rows stay output units"
    order: ClassVar[int] = 7

    def __post_init__(self) -> None:
        if isinstance(self.inner, Transposed) or self.inner.coupled:
            raise RecipeError(f"transposed:{self.inner}: the inner structure must be a per-tensor structure "
                              "(unstructured, row, column, block, nm, pattern)")

    @classmethod
    def parse(cls, text: str) -> Structure | None:
        if not text.startswith("transposed:"):
            return None
        return cls(parse_structure(text.removeprefix("transposed:")))

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"transposed:{self.inner}"

    @property
    def selects_groups(self) -> bool:  # type: ignore[override]
        return self.inner.selects_groups

    def partition(self, w: Tensor) -> Tensor:
        return self.inner.partition(w.t())

    def unpartition(self, groups: Tensor, shape: torch.Size | Sequence[int]) -> Tensor:
        return self.inner.unpartition(groups, _swap(shape)).t()

    def group_index(self, shape: Sequence[int]) -> Tensor:
        rows, cols = int(shape[0]), int(shape[1])
        idx = self.inner.group_index(_swap(shape))      # flat indices into the (cols, rows) transpose
        return torch.where(idx >= 0, (idx % rows) * cols + idx // rows, idx)

    def check_shape(self, shape: Sequence[int]) -> None:
        self.inner.check_shape(_swap(shape))

    def select(self, parts: Tensor, valid: Tensor, sparsity: float, score: Score,
               base: Tensor | None = None) -> Tensor:
        return self.inner.select(parts, valid, sparsity, score, base)

    def resolve_sparsity(self, shape: Sequence[int], sparsity: float | None) -> float:
        return self.inner.resolve_sparsity(_swap(shape), sparsity)

    def fixed_sparsity(self, shape: Sequence[int]) -> float | None:
        return self.inner.fixed_sparsity(_swap(shape))


STRUCTURES.register("transposed")(Transposed)


@STRUCTURES.register("unstructured", aliases=("irregular",))
class Unstructured(Structure):
    """Each weight is its own group (irregular, magnitude pruning)."""

    name = "unstructured"
    syntax = "unstructured"
    help = "single weights"
    order = 0

    @classmethod
    def parse(cls, text: str) -> Structure | None:
        return cls() if text in ("unstructured", "irregular") else None

    def partition(self, w: Tensor) -> Tensor:
        return w.reshape(-1, 1)

    def unpartition(self, groups: Tensor, shape: Sequence[int]) -> Tensor:
        return groups.reshape(tuple(shape))

    def valid(self, shape: Sequence[int]) -> Tensor:
        return torch.ones(math.prod(shape), 1, dtype=torch.bool)


@STRUCTURES.register("row")
class Row(Structure):
    """Whole rows (output units; conv filters)."""

    name = "row"
    syntax = "row"
    help = "whole output rows / conv filters"
    order = 1

    @classmethod
    def parse(cls, text: str) -> Structure | None:
        return cls() if text == "row" else None

    def partition(self, w: Tensor) -> Tensor:
        return as_matrix(w)

    def unpartition(self, groups: Tensor, shape: Sequence[int]) -> Tensor:
        return groups.reshape(tuple(shape))

    def valid(self, shape: Sequence[int]) -> Tensor:
        return torch.ones(shape[0], math.prod(shape[1:]), dtype=torch.bool)


@STRUCTURES.register("column")
class Column(Structure):
    """Whole columns (input units of a Linear; im2col columns of a conv)."""

    name = "column"
    syntax = "column"
    help = "whole input columns / im2col columns"
    order = 2

    @classmethod
    def parse(cls, text: str) -> Structure | None:
        return cls() if text == "column" else None

    def partition(self, w: Tensor) -> Tensor:
        return as_matrix(w).t()

    def unpartition(self, groups: Tensor, shape: Sequence[int]) -> Tensor:
        return groups.t().reshape(tuple(shape))

    def valid(self, shape: Sequence[int]) -> Tensor:
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


@STRUCTURES.register("block")
@dataclass(frozen=True, eq=False)
class Block(Structure):
    """Whole ``R×C`` blocks of the matrix view (partial blocks on the bottom/right edges)."""

    r: int
    c: int

    syntax: ClassVar[str] = "block:RxC"
    help: ClassVar[str] = "whole RxC blocks, e.g. block:4x4"
    order: ClassVar[int] = 3
    _RE: ClassVar[re.Pattern[str]] = re.compile(r"^block:(\d+)x(\d+)$")

    def __post_init__(self) -> None:
        if self.r < 1 or self.c < 1:
            raise RecipeError(f"block shape must be positive, got {self.r}x{self.c}")

    @classmethod
    def parse(cls, text: str) -> Structure | None:
        m = cls._RE.match(text)
        if not m:
            return None
        r, c = int(m[1]), int(m[2])
        if r < 1 or c < 1:
            raise RecipeError(f"bad structure {text!r}: block shape must be positive")
        return cls(r, c)

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"block:{self.r}x{self.c}"

    def check_shape(self, shape: Sequence[int]) -> None:
        super().check_shape(shape)
        R, C = _matrix_shape(shape)
        if self.r > R or self.c > C:
            raise RecipeError(
                f"{self.name} does not fit a weight whose matrix view is {R}x{C} "
                f"(shape {tuple(shape)}); use a block no larger than the matrix")

    def partition(self, w: Tensor) -> Tensor:
        return _tiles(as_matrix(w), self.r, self.c)

    def unpartition(self, groups: Tensor, shape: Sequence[int]) -> Tensor:
        R, C = _matrix_shape(shape)
        return _untiles(groups, R, C, self.r, self.c).reshape(tuple(shape))


@STRUCTURES.register("nm")
@dataclass(frozen=True, eq=False)
class NM(Structure):
    """N kept in every M consecutive weights along the input dimension (per row of the matrix view).

    Groups are the M-runs of each row; a row length that M does not divide ends with a partial run of
    ``k < M`` weights, which keeps ``min(N, k)`` of them (the padding is chosen last).  Within a run the
    weights of largest ``|score|`` are kept (ties: lower index first).  ``sparsity`` below ``1 - N/M``
    (as used by gradual schedules on the way to N:M) keeps ``M - round(sparsity*M)`` per run (never
    fewer than N); a sparsity above ``1 - N/M`` is an error.
    """

    n: int
    m: int

    syntax: ClassVar[str] = "nm:N:M"
    help: ClassVar[str] = "N kept of every M consecutive weights, e.g. nm:2:4"
    order: ClassVar[int] = 4
    selects_groups: ClassVar[bool] = False
    _RE: ClassVar[re.Pattern[str]] = re.compile(r"^nm:(\d+):(\d+)$")

    def __post_init__(self) -> None:
        if not (1 <= self.n <= self.m):
            raise RecipeError(f"N:M needs 1 <= N <= M (N kept of every M); got {self.n}:{self.m}")

    @classmethod
    def parse(cls, text: str) -> Structure | None:
        m = cls._RE.match(text)
        if not m:
            return None
        n, mm = int(m[1]), int(m[2])
        if not (1 <= n <= mm):
            raise RecipeError(f"bad structure {text!r}: N:M needs 1 <= N <= M (N kept of every M)")
        return cls(n, mm)

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"nm:{self.n}:{self.m}"

    def fixed_sparsity(self, shape: Sequence[int]) -> float:
        return 1.0 - self.n / self.m

    def partition(self, w: Tensor) -> Tensor:
        return _tiles(as_matrix(w), 1, self.m)

    def unpartition(self, groups: Tensor, shape: Sequence[int]) -> Tensor:
        R, C = _matrix_shape(shape)
        return _untiles(groups, R, C, 1, self.m).reshape(tuple(shape))

    def keep_per_group(self, sparsity: float) -> int:
        s = _check_sparsity(sparsity)
        if s > 1.0 - self.n / self.m + 1e-9:
            raise RecipeError(f"{self.name} keeps {self.n} of {self.m} (sparsity {1 - self.n / self.m:.3g}); "
                             f"sparsity {s} is beyond what it allows")
        return max(self.n, self.m - int(round(s * self.m)))

    def select(self, parts: Tensor, valid: Tensor, sparsity: float, score: Score,
               base: Tensor | None = None) -> Tensor:
        """Per run, the ``k`` entries of largest ``|parts|`` (``base`` entries first, padding last)."""
        k = self.keep_per_group(sparsity)
        imp = parts.abs().double()
        if base is not None:
            have = int(base.sum(1).max()) if base.numel() else 0
            if have > k:
                raise RecipeError(f"{self}: the sparser level keeps {have} of {self.m} in some run, level at sparsity "
                                 f"{sparsity} keeps only {k}: give levels sparsest first with decreasing sparsity")
            imp = imp.masked_fill(base, math.inf)
        imp = imp.masked_fill(~valid, -1.0)
        order = torch.argsort(-imp, dim=1, stable=True)   # ties → lower index first
        keep = torch.zeros_like(valid)
        keep.scatter_(1, order[:, :k], True)
        return keep & valid


def _all_patterns(tile: int, keep: int) -> Tensor:
    combos = list(itertools.combinations(range(tile), keep))
    p = torch.zeros(len(combos), tile, dtype=torch.bool)
    for i, cmb in enumerate(combos):
        p[i, list(cmb)] = True
    return p


@STRUCTURES.register("pattern")
@dataclass(frozen=True, eq=False)
class Pattern(Structure):
    """Pattern pruning (PatDNN, Niu et al. ASPLOS 2020) with optional connectivity pruning.

    Tiles are the ``kh×kw`` kernels of a Conv2d, or ``R×C`` tiles (``tile``, default 4x4) of a Linear.
    Each tile keeps the pattern from the *pattern set* with the largest L2 norm ``‖W_tile ⊙ P‖₂``.

    * ``keep`` = entries kept per tile.  ``None``: derived from the requested sparsity,
      ``ceil((1-sparsity) * tile_size)``, so every tile keeps that many and the sparsity is
      ``1 - keep/tile`` (at most the requested one).
    * ``set_size`` = number of patterns in the set.  ``None`` = every ``C(tile, keep)`` pattern when
      there are at most 256 of them (e.g. 126 for 4 of 3×3), else a generated set of 8.  Otherwise the
      set is *generated* from the weight, as in PatDNN: each tile's own best ``keep``-entry pattern is
      counted and the ``set_size`` most frequent form the set.  An explicit set can be passed as
      ``patterns`` (a ``(P, tile)`` bool tensor) in Python.
    * ``conn`` = connectivity pruning: after patterns, whole tiles with the smallest remaining L2
      norm are removed until the requested sparsity is reached.  **Only** ``conn`` removes whole
      tiles.  Without ``conn`` and with an explicit ``keep``, the sparsity is the pattern's own
      ``1 - keep/tile`` and a larger request is an error (a smaller request gets the pattern's own).

    A partial edge tile of a Linear (``v`` real entries, the rest padding) keeps ``min(keep, v)``: the
    pattern's slots in the padding are dropped, as N:M's partial run keeps ``min(N, k)``.
    """

    keep: int | None = None
    set_size: int | None = None
    tile: tuple[int, int] | None = None
    conn: bool = False
    patterns: Tensor | None = field(default=None, compare=False)

    syntax: ClassVar[str] = "pattern[:K[:P]][@RxC][+conn]"
    help: ClassVar[str] = ("per tile (conv kernel, or RxC Linear tile, default 4x4) the best of P patterns "
                           "keeping K; +conn also removes whole tiles")
    order: ClassVar[int] = 5
    selects_groups: ClassVar[bool] = False
    _RE: ClassVar[re.Pattern[str]] = re.compile(r"^pattern(?::(\d+)(?::(\d+))?)?(?:@(\d+)x(\d+))?(\+conn)?$")

    def __post_init__(self) -> None:
        if self.keep is not None and self.keep < 1:
            raise RecipeError(f"pattern keep must be >= 1, got {self.keep}")
        if self.set_size is not None and self.set_size < 1:
            raise RecipeError(f"pattern set size must be >= 1, got {self.set_size}")
        if self.tile is not None and (self.tile[0] < 1 or self.tile[1] < 1):
            raise RecipeError(f"pattern tile must be positive, got {self.tile}")

    @classmethod
    def parse(cls, text: str) -> Structure | None:
        m = cls._RE.match(text)
        if not m:
            return None
        tile = (int(m[3]), int(m[4])) if m[3] else None
        return cls(keep=int(m[1]) if m[1] else None, set_size=int(m[2]) if m[2] else None, tile=tile,
                   conn=bool(m[5]))

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

    def tile_shape(self, shape: Sequence[int]) -> tuple[int, int]:
        """The tile of a weight of ``shape``: its kernel (Conv), else ``tile`` (default 4x4)."""
        if len(shape) == 4:
            return int(shape[2]), int(shape[3])
        return self.tile or (4, 4)

    def check_shape(self, shape: Sequence[int]) -> None:
        super().check_shape(shape)
        if len(shape) == 4 and self.tile is not None and tuple(self.tile) != (shape[2], shape[3]):
            raise RecipeError(f"{self.name}: conv tiles are the kernels ({shape[2]}x{shape[3]}), not {self.tile}")
        tr, tc = self.tile_shape(shape)
        if len(shape) == 2 and (tr > shape[0] or tc > shape[1]):
            raise RecipeError(f"{self.name}: tile {tr}x{tc} does not fit a {shape[0]}x{shape[1]} weight")
        if self.keep is not None and self.keep > tr * tc:
            raise RecipeError(f"{self.name}: keeps {self.keep} entries but a tile has only {tr * tc}")

    def partition(self, w: Tensor) -> Tensor:
        if w.dim() == 4:
            return w.reshape(-1, w.shape[2] * w.shape[3])
        tr, tc = self.tile_shape(w.shape)
        return _tiles(as_matrix(w), tr, tc)

    def unpartition(self, groups: Tensor, shape: Sequence[int]) -> Tensor:
        if len(shape) == 4:
            return groups.reshape(tuple(shape))
        tr, tc = self.tile_shape(shape)
        R, C = _matrix_shape(shape)
        return _untiles(groups, R, C, tr, tc).reshape(tuple(shape))

    def _keep_of(self, T: int, sparsity: float) -> int:
        if self.keep is not None:
            return self.keep
        return max(1, math.ceil((1.0 - _check_sparsity(sparsity)) * T - 1e-9))

    def keep_for(self, shape: Sequence[int], sparsity: float) -> int:
        tr, tc = self.tile_shape(shape)
        return self._keep_of(tr * tc, sparsity)

    def fixed_sparsity(self, shape: Sequence[int]) -> float | None:
        if self.keep is None or self.conn:
            return None
        tr, tc = self.tile_shape(shape)
        return 1.0 - self.keep / (tr * tc)

    def pattern_set(self, w: Tensor, keep: int) -> Tensor:
        """The ``(P, tile)`` bool pattern set for this weight (given, all, or generated)."""
        return self._pattern_set(self.partition(w.detach()), keep)

    def _pattern_set(self, parts: Tensor, keep: int) -> Tensor:
        T = parts.shape[1]
        if self.patterns is not None:
            p = self.patterns.reshape(self.patterns.shape[0], -1).bool()
            if p.shape[1] != T:
                raise RecipeError(f"pattern set has tiles of {p.shape[1]} entries, weight tiles have {T}")
            return p
        size = self.set_size
        if size is None:
            if math.comb(T, keep) <= 256:
                return _all_patterns(T, keep)
            size = 8
        # generated: most frequent per-tile top-`keep` patterns (PatDNN's pattern-set generation)
        g = parts.abs().float()
        order = torch.argsort(-g, dim=1, stable=True)[:, :keep]
        own = torch.zeros_like(g, dtype=torch.bool).scatter_(1, order, True)
        uniq: Tensor
        counts: Tensor
        uniq, counts = torch.unique(own, dim=0, return_counts=True)
        # most frequent first; ties broken by the pattern's bits (deterministic)
        keys = [(-int(c), tuple(int(x) for x in u.tolist())) for u, c in zip(uniq, counts)]
        idx = sorted(range(len(keys)), key=lambda i: keys[i])[:size]
        return uniq[idx]

    def select(self, parts: Tensor, valid: Tensor, sparsity: float, score: Score,
               base: Tensor | None = None) -> Tensor:
        """Per tile, the pattern of largest energy ``Σ parts² ⊙ P`` among those containing the tile's
        ``base`` entries (if none does: base + largest remaining entries); ``+conn`` then removes the
        lowest-energy tiles (never a tile holding ``base`` entries)."""
        T = parts.shape[1]
        keep = self._keep_of(T, sparsity)
        if self.keep is not None and not self.conn and sparsity > 1.0 - keep / T + 1e-9:
            raise RecipeError(f"{self.name} gives sparsity {1 - keep / T:.3g} on this weight; {sparsity} needs "
                             f"connectivity pruning ('{self.name}+conn') or fewer kept entries")
        pats = self._pattern_set(parts, keep)                     # (P, T) bool
        g2 = parts.float().pow(2)
        b = torch.zeros_like(valid) if base is None else base
        if base is not None and int(b.sum(1).max()) > keep:
            raise RecipeError(f"{self}: the sparser level keeps more than {keep} entries in a tile; levels must get denser")
        contains = (b.float() @ pats.float().t()) == b.sum(1, keepdim=True).float()   # (G, P) pattern ⊇ base
        energy = (g2 @ pats.float().t()).masked_fill(~contains, -1.0)
        km = pats[torch.argmax(energy, 1)] & valid               # argmax → first best (deterministic)
        lost = ~contains.any(1)
        if bool(lost.any()):   # no superset pattern in the set: base + largest remaining entries
            rows = torch.nonzero(lost).flatten()
            sc = torch.where(b[rows], torch.full_like(g2[rows], math.inf), g2[rows])
            sc = sc.masked_fill(~valid[rows], -1.0)
            order = torch.argsort(-sc, dim=1, stable=True)[:, :keep]
            km[rows] = torch.zeros_like(b[rows]).scatter_(1, order, True) & valid[rows]
        if self.conn:
            connectivity_prune(km, g2, valid, sparsity, protected=None if base is None else b.any(1))
        return km


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


GROUP_KINDS = ("channels", "heads", "kv_groups", "neurons")


@STRUCTURES.register("groups")
@dataclass(frozen=True, eq=False)
class GroupStructure(Structure):
    """Units of the model's *coupled groups* (:class:`prunekit.core.groups.CoupledGroup`, found from its
    graph by :func:`prunekit.graph.coupled_groups`): ``channels``, ``heads``, ``kv_groups``, ``neurons``
    or a ``+`` combination (``heads+neurons``).  A unit is scored over all its coupled slices and removed
    from all of them at once, so the result compacts (:func:`prunekit.deploy.surgery.compact`).

    Not a per-tensor structure: masks come from :func:`prunekit.core.plan.compute_masks` with
    ``PruneSpec.groups`` filled (the runner and ``prunekit.prune(..., example_inputs=...)`` do it)."""

    kinds: tuple[str, ...] = ("channels",)

    syntax: ClassVar[str] = "channels|heads|kv_groups|neurons[+...]"
    help: ClassVar[str] = ("coupled units from the model's graph (e.g. heads+neurons), scored over all coupled "
                           "tensors and removed together")
    order: ClassVar[int] = 6
    coupled: ClassVar[bool] = True

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in GROUP_KINDS]
        if bad or not self.kinds:
            raise ValueError(f"unknown group kind(s) {bad}; valid: {', '.join(GROUP_KINDS)} (combine with '+')")

    @classmethod
    def parse(cls, text: str) -> Structure | None:
        parts = text.split("+")
        if not all(p in GROUP_KINDS for p in parts):
            return None
        return cls(tuple(dict.fromkeys(parts)))

    @property
    def name(self) -> str:  # type: ignore[override]
        return "+".join(self.kinds)

    def check_shape(self, shape: Sequence[int]) -> None:
        return None

    def _needs_groups(self) -> NoReturn:
        raise ValueError(f"structure {self.name!r} is made of the model's coupled groups, not of one tensor: use "
                         "compute_masks(model, PruneSpec(..., groups=prunekit.graph.coupled_groups(model, x))) "
                         "or prunekit.prune(model, structure, sparsity, example_inputs=x)")

    def partition(self, w: Tensor) -> Tensor:
        self._needs_groups()

    def unpartition(self, groups: Tensor, shape: Sequence[int]) -> Tensor:
        self._needs_groups()

    def mask(self, w: Tensor, sparsity: float | None = None, score: ScoreFn | str | Tensor | Score = "l2",
             base: Tensor | None = None) -> Tensor:
        self._needs_groups()


def parse_structure(spec: str | Structure) -> Structure:
    """Parse a structure string (see :func:`structure_syntax`) into a typed :class:`Structure`: the
    first registered structure (in :data:`STRUCTURES`) whose ``parse`` accepts it."""
    if isinstance(spec, Structure):
        return spec
    if not isinstance(spec, str):
        raise RecipeError(f"structure must be a string, got {type(spec).__name__} {spec!r}; valid: {structure_syntax()}")
    s = spec.strip().lower().replace(" ", "")
    for name in _parse_order():
        st = STRUCTURES.get(name).parse(s)
        if st is not None:
            return st
    raise UnknownNameError(f"unknown structure {spec!r}; valid: {structure_syntax()}")


STRUCTURE_SYNTAX = structure_syntax()   # as registered at import; call structure_syntax() for later additions
StructureLike = "str | Structure"
ScoreLike = "str | Callable[[Tensor], Tensor] | Tensor"
