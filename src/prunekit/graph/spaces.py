"""Index spaces: union-find over tensor dimensions, with refinement into products and concatenations.

Every dimension of every value in the graph gets a *space* id.  Two dimensions that index the same
things (a Linear's output features and the next op's input features; both operands of an ``add``)
are united.  A space can be *refined*:

* ``prod`` — a ``view`` splitting ``H*D`` into ``(H, D)``: the space is the row-major product of its
  children (unit ``h`` of the outer child covers ``D`` consecutive indices);
* ``cat`` — a ``split``/``slice``/``cat`` along the dimension: the space is the concatenation of its
  children (GPT-2's fused ``c_attn`` output = q ⊕ k ⊕ v).

Uniting two refined spaces unites their children (aligning products factor by factor).  Flags on a
space (``"normalised by layer_norm in ..."``) record why its units cannot be removed; a flag on a
refined space applies to everything below it.  *Reads* (``"summed over by sum in ..."``) record
weight-less consumers of a space's units (a reduction that adds them up): such units may be removed
only when their value is provably zero, not merely when every weight slice is; they are kept and
inherited like flags.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

__all__ = ["Spaces"]


class Spaces:
    """The union-find (see the module docstring).  Ids are ints; :meth:`find` gives the root."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.ref: dict[int, tuple[str, tuple[int, ...]]] = {}
        self.flags: dict[int, list[str]] = {}
        self.reads: dict[int, list[str]] = {}

    # -- basics ----------------------------------------------------------------------------------
    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def flag(self, a: int, why: str) -> None:
        lst = self.flags.setdefault(self.find(a), [])
        if why not in lst:
            lst.append(why)

    def read(self, a: int, why: str) -> None:
        lst = self.reads.setdefault(self.find(a), [])
        if why not in lst:
            lst.append(why)

    def refinement(self, a: int) -> tuple[str, tuple[int, ...]] | None:
        return self.ref.get(self.find(a))

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            self.flag(ra, f"size mismatch {self.size[ra]} vs {self.size[rb]} in one dimension")
            return
        self.parent[rb] = ra
        for why in self.flags.pop(rb, []):
            self.flag(ra, why)
        for why in self.reads.pop(rb, []):
            self.read(ra, why)
        fa, fb = self.ref.pop(ra, None), self.ref.pop(rb, None)
        if fa is not None:
            self.ref[ra] = fa
        elif fb is not None:
            self.ref[ra] = fb
        if fa is not None and fb is not None:
            self._unite_refinements(ra, fa, fb)

    def _unite_refinements(self, root: int, fa, fb) -> None:
        if fa[0] != fb[0]:
            self.flag(root, "reshaped and concatenated inconsistently")
            return
        if fa[0] == "cat":
            if [self.size[self.find(c)] for c in fa[1]] != [self.size[self.find(c)] for c in fb[1]]:
                self.flag(root, "concatenated with different part sizes")
                return
            for x, y in zip(fa[1], fb[1]):
                self.union(x, y)
            return
        self._align_products(root, list(self.leaves_prod(fa[1])), list(self.leaves_prod(fb[1])))

    # -- products ----------------------------------------------------------------------------------
    def leaves_prod(self, children) -> Iterator[int]:
        """Flattened factors of a product (children that are products themselves are expanded)."""
        for c in children:
            f = self.refinement(c)
            if f is not None and f[0] == "prod":
                yield from self.leaves_prod(f[1])
            else:
                yield self.find(c)

    def _align_products(self, root: int, xs: list[int], ys: list[int]) -> None:
        """Unite two factorisations of one space, factor run by factor run."""
        xs = [x for x in xs if self.size[x] != 1]
        ys = [y for y in ys if self.size[y] != 1]
        i = j = 0
        while i < len(xs) and j < len(ys):
            ri, rj, pi, pj = [xs[i]], [ys[j]], self.size[xs[i]], self.size[ys[j]]
            while pi != pj:
                if pi < pj and i + len(ri) < len(xs):
                    ri.append(xs[i + len(ri)])
                    pi *= self.size[ri[-1]]
                elif pj < pi and j + len(rj) < len(ys):
                    rj.append(ys[j + len(rj)])
                    pj *= self.size[rj[-1]]
                else:
                    self.flag(root, "reshaped inconsistently")
                    return
            if len(ri) == 1 and len(rj) == 1:
                self.union(ri[0], rj[0])
            elif len(ri) == 1:
                self._refine_as(ri[0], rj)
            elif len(rj) == 1:
                self._refine_as(rj[0], ri)
            else:
                self.flag(root, "reshaped inconsistently")
                return
            i, j = i + len(ri), j + len(rj)

    def _refine_as(self, a: int, factors: list[int]) -> None:
        r = self.find(a)
        f = self.ref.get(r)
        if f is None:
            self.ref[r] = ("prod", tuple(factors))
        else:
            tmp = self.new(self.size[r])
            self.ref[tmp] = ("prod", tuple(factors))
            self.union(r, tmp)

    def split(self, a: int, sizes: list[int]) -> list[int]:
        """Refine ``a`` as the product of ``sizes`` (outer first); one space per requested factor."""
        r = self.find(a)
        if math.prod(sizes) != self.size[r]:
            raise ValueError(f"cannot split a dimension of {self.size[r]} into {sizes}")
        if len([s for s in sizes if s != 1]) <= 1:
            return [r if s != 1 or self.size[r] == 1 else self.new(1) for s in sizes]
        kids = [self.new(s) for s in sizes]
        tmp = self.new(self.size[r])
        self.ref[tmp] = ("prod", tuple(kids))
        self.union(r, tmp)
        return kids

    def merge(self, parts: list[int]) -> int:
        """A new space that is the row-major product of ``parts``."""
        parts = [self.find(p) for p in parts]
        big = [p for p in parts if self.size[p] != 1]
        if len(big) == 1:
            return big[0]
        out = self.new(math.prod(self.size[p] for p in parts))
        if big:
            self.ref[out] = ("prod", tuple(big))
        return out

    # -- concatenations ----------------------------------------------------------------------------
    def pieces(self, a: int, sizes: list[int]) -> list[int]:
        """Refine ``a`` as the concatenation of ``sizes``; one space per piece.

        A space already cut the same way returns its pieces; one cut differently, or one that is a
        product (slicing across heads), is flagged and gets fresh, unrelated pieces."""
        r = self.find(a)
        sizes = [int(s) for s in sizes]
        if sum(sizes) != self.size[r]:
            raise ValueError(f"pieces {sizes} do not cover a dimension of {self.size[r]}")
        if len(sizes) == 1:
            return [r]
        f = self.ref.get(r)
        if f is None:
            kids = tuple(self.new(s) for s in sizes)
            self.ref[r] = ("cat", kids)
            return list(kids)
        if f[0] == "cat" and [self.size[self.find(c)] for c in f[1]] == sizes:
            return [self.find(c) for c in f[1]]
        self.flag(r, "sliced or concatenated at different offsets" if f[0] == "cat" else
                  "sliced across a reshaped dimension")
        return [self.new(s) for s in sizes]

    def concat(self, parts: list[int]) -> int:
        """A new space that is the concatenation of ``parts``."""
        parts = [self.find(p) for p in parts]
        if len(parts) == 1:
            return parts[0]
        out = self.new(sum(self.size[p] for p in parts))
        self.ref[out] = ("cat", tuple(parts))
        return out

    # -- read-out ----------------------------------------------------------------------------------
    def positions(self, a: int) -> Iterator[tuple[int, int, int, bool]]:
        """``(leaf, offset, width, contiguous)`` for every leaf space below ``a``: unit ``g`` of the
        leaf covers ``offset + g*width : offset + (g+1)*width`` of ``a``; ``contiguous`` is False when
        an outer factor larger than one interleaves the units."""
        r = self.find(a)
        f = self.ref.get(r)
        if f is None:
            yield r, 0, 1, True
        elif f[0] == "cat":
            off = 0
            for c in f[1]:
                for leaf, o, w, ok in self.positions(c):
                    yield leaf, off + o, w, ok
                off += self.size[self.find(c)]
        else:
            sizes = [self.size[self.find(c)] for c in f[1]]
            for i, c in enumerate(f[1]):
                inner, outer = math.prod(sizes[i + 1:]), math.prod(sizes[:i])
                for leaf, o, w, ok in self.positions(c):
                    yield leaf, o * inner, w * inner, ok and outer == 1

    def inherited_flags(self, table: dict[int, list[str]] | None = None) -> dict[int, list[str]]:
        """Flags (or the entries of another ``table`` such as :attr:`reads`) of every root, plus those of
        every space it is a part of."""
        table = self.flags if table is None else table
        out = {r: list(v) for r, v in table.items() if self.find(r) == r}
        order = [r for r in self.ref if self.find(r) == r]
        seen: set[tuple[int, tuple[str, ...]]] = set()

        def push(r: int, inherited: list[str]) -> None:
            if (r, tuple(inherited)) in seen or len(seen) > 10 * len(self.parent):
                return
            seen.add((r, tuple(inherited)))
            mine = out.setdefault(r, [])
            for w in inherited:
                if w not in mine:
                    mine.append(w)
            f = self.ref.get(r)
            if f is not None:
                for c in f[1]:
                    push(self.find(c), mine)

        for r in order:
            push(r, out.get(r, []))
        return out
