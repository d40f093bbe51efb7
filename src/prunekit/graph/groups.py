"""From related spaces to :class:`~prunekit.core.groups.CoupledGroup` s.

Every *leaf* space (not refined further) that a weight produces (a Linear/Conv/Conv1D output dim, an
embedding dim) is one group; its slices are all the places the leaf appears in parameters and
buffers (offset and width from the products and concatenations above it).  Kinds:

* ``heads`` — the head dimension of an attention op (``scaled_dot_product_attention`` or a
  ``matmul`` between activations); ``kv_groups`` — the outer factor when query heads are key/value
  heads × ``n_rep`` (GQA, via ``repeat_kv``/``expand`` or ``enable_gqa``);
* ``channels`` — a conv output, or a space with an embedding or more than two producers (the
  residual stream); ``neurons`` — the rest (Linear outputs: FFN, gated MLP).

A group's ``readers`` are the weight-less consumers recorded on its space (a ``sum`` over the units):
its units then go only when provably zero.  A group is not removable when any flag of its space (or of a space it is part of) says why: a norm or
mean over it, a model input/output, an op with no rule, a grouped convolution, or units interleaved
with another dimension in some tensor.
"""
from __future__ import annotations

from ..core.groups import CoupledGroup, Slice
from .analyze import Analysis

__all__ = ["build_groups"]


def _head_leaves(a: Analysis) -> dict[int, tuple[str, str, int, int]]:
    """leaf space → (kind, attention module, head_dim, query heads per unit)."""
    sp = a.spaces
    out: dict[int, tuple[str, str, int, int]] = {}
    for space, (module, head_dim) in a.attention.items():
        root = sp.find(space)
        pos = [p for p in sp.positions(root) if sp.size[p[0]] > 1]
        if len(pos) == 1 and pos[0][2] == 1:
            out[pos[0][0]] = ("heads", module, head_dim, 1)
        elif pos and pos[0][1] == 0 and pos[0][3] and pos[0][2] > 1:
            out[pos[0][0]] = ("kv_groups", module, head_dim, pos[0][2])
    return out


def _occurrences(a: Analysis) -> dict[int, list[tuple[Slice, bool]]]:
    sp = a.spaces
    occ: dict[int, list[tuple[Slice, bool]]] = {}
    for name, dims in a.tensor_dims.items():
        for d, space in enumerate(dims):
            for leaf, off, width, ok in sp.positions(space):
                if sp.size[leaf] > 1:
                    occ.setdefault(leaf, []).append((Slice(name, d, width, off), ok))
    return occ


def _kind(a: Analysis, producers: list[Slice], head: tuple | None) -> str:
    if head is not None:
        return head[0]
    kinds = [a.producers[(s.tensor, s.dim)] for s in producers]
    if "conv" in kinds or "embedding" in kinds or len(producers) > 2:
        return "channels"
    return "neurons"


def _module(tensor: str) -> str:
    return tensor.rsplit(".", 1)[0] if "." in tensor else ""


def _one_group(a: Analysis, leaf: int, items: list[tuple[Slice, bool]], flags: list[str],
               head: tuple | None, reads: list[str]) -> CoupledGroup | None:
    producers = [s for s, ok in items if ok and (s.tensor, s.dim) in a.producers]
    slices = tuple(dict.fromkeys(s for s, ok in items if ok))
    if not producers or not slices:
        return None
    reasons = list(flags)
    for s, ok in items:
        if not ok:
            reasons.append(f"units interleaved with another dimension in {s.tensor} dim {s.dim}")
    kind = _kind(a, producers, head)
    where = head[1] if head is not None else _module(producers[0].tensor)
    modules = tuple(dict.fromkeys(_module(s.tensor) for s in slices))
    g = CoupledGroup(name=f"{kind}:{where}", kind=kind, count=a.spaces.size[leaf], slices=slices,
                     removable=not reasons, reason="; ".join(dict.fromkeys(reasons)), modules=modules,
                     attention=head[1] if head else "", head_dim=head[2] if head else 0,
                     heads_per_unit=head[3] if head else 0, kv_per_unit=1 if head else 0,
                     producers=tuple(dict.fromkeys(_module(s.tensor) for s in producers)),
                     sources=tuple(dict.fromkeys(producers + [s for s in slices if s.tensor in a.addends])),
                     readers=tuple(dict.fromkeys(reads)))
    return g


def build_groups(a: Analysis) -> list[CoupledGroup]:
    """All coupled groups of an analysed graph, in the order their tensors appear."""
    flags = a.spaces.inherited_flags()
    reads = a.spaces.inherited_flags(a.spaces.reads)
    heads = _head_leaves(a)
    out: list[CoupledGroup] = []
    seen: dict[str, int] = {}
    for leaf, items in _occurrences(a).items():
        root = a.spaces.find(leaf)
        g = _one_group(a, leaf, items, flags.get(root, []), heads.get(leaf), reads.get(root, []))
        if g is None:
            continue
        n = seen.get(g.name, 0)
        seen[g.name] = n + 1
        if n:
            g = CoupledGroup(**{**g.__dict__, "name": f"{g.name}#{n}"})
        out.append(g)
    return out
