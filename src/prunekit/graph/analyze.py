"""Walk a traced ATen graph and relate every dimension of every value (see :mod:`.spaces`).

Rules per op (anything not listed is *opaque*: its input dimensions are flagged, its outputs get
fresh spaces, so an unknown op can only make groups non-removable, never wrong):

* ``linear`` / ``addmm`` (HF ``Conv1D``) / ``mm``/``matmul``/``bmm`` with a weight — weight output
  dim = a *producer*; input features ≡ weight input dim;
* ``conv*`` — dense: out channels ≡ weight dim 0 (producer), in channels ≡ weight dim 1; depthwise:
  the channel passes through (input ≡ output ≡ weight dim 0); other grouped convs are flagged;
* batch norm ≡ per channel (weight, bias, running stats); layer/group/RMS norm, ``mean``/``var``,
  ``softmax``, ``cumsum`` over a dim — flagged (removing units changes the statistics); ``sum`` over a
  dim and a ``matmul`` contracting two activations — *read* (a consumer without a weight: units go only
  when provably zero);
* elementwise ops with broadcasting (``add`` makes residual streams one space), activations, dropout;
* ``view``/``reshape``/``flatten``/``unflatten`` — products (heads, flatten into a Linear);
  ``permute``/``transpose``/``unsqueeze``/``squeeze``/``expand`` (``repeat_kv``) — dimension moves;
* ``split``/``chunk``/``slice``/``cat`` — concatenations with offsets;
* ``embedding`` — the embedding dim is a producer, flagged as the residual stream;
* attention: ``scaled_dot_product_attention`` (incl. ``enable_gqa``) and ``matmul`` between
  activations (contraction and batch dims) — the head dimension is recorded.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import fx

from .spaces import Spaces
from .trace import Traced

__all__ = ["Analysis", "op_name"]

Dims = list[int]


@dataclass
class Analysis:
    """Result of :func:`analyze`: spaces, the dims of every tensor, producers and attention sites."""

    traced: Traced
    spaces: Spaces = field(default_factory=Spaces)
    dims: dict[str, Any] = field(default_factory=dict)
    tensor_dims: dict[str, Dims] = field(default_factory=dict)
    producers: dict[tuple[str, int], str] = field(default_factory=dict)   # (tensor, dim) -> op kind
    addends: set[str] = field(default_factory=set)   # parameters/buffers added to activations (write the units too)
    attention: dict[int, tuple[str, int]] = field(default_factory=dict)   # heads space -> (module, head_dim)
    kv_heads: dict[int, tuple[str, int, int]] = field(default_factory=dict)  # kv space -> (module, head_dim, n_rep)

    # -- helpers used by the rules ---------------------------------------------------------------
    def d(self, x: Any) -> Dims | None:
        if isinstance(x, fx.Node):
            v = self.dims.get(x.name)
            return v if v is None or not v or isinstance(v[0], int) else None
        return None

    def fresh(self, node: fx.Node) -> Any:
        val = node.meta.get("val")
        if isinstance(val, (tuple, list)):
            return [[self.spaces.new(s) for s in _shape(v)] if hasattr(v, "shape") else None for v in val]
        return [self.spaces.new(s) for s in _shape(val)] if hasattr(val, "shape") else None

    def tensor_of(self, x: Any) -> str | None:
        return self.traced.tensors.get(x.name) if isinstance(x, fx.Node) else None

    def producer(self, x: Any, dim: int, kind: str) -> None:
        name = self.tensor_of(x)
        if name is not None:
            self.producers[(name, dim % len(_shape(x.meta["val"])))] = kind

    def flag_dims(self, dims: Dims | None, idx, why: str) -> None:
        if dims is None:
            return
        for i in idx:
            if -len(dims) <= i < len(dims) and self.spaces.size[self.spaces.find(dims[i])] > 1:
                self.spaces.flag(dims[i], why)

    def read_dims(self, dims: Dims | None, idx, why: str) -> None:
        """Record a weight-less consumer (a sum over the units) of ``dims[i]`` for ``i`` in ``idx``."""
        if dims is None:
            return
        for i in idx:
            if -len(dims) <= i < len(dims) and self.spaces.size[self.spaces.find(dims[i])] > 1:
                self.spaces.read(dims[i], why)

    def unite(self, a: int, b: int) -> None:
        self.spaces.union(a, b)


def _shape(v: Any) -> list[int]:
    return [int(s) for s in v.shape]


def op_name(node: fx.Node) -> str:
    """``linear``, ``conv2d``, ``getitem``… (the overload packet's name)."""
    t = node.target
    if t is operator.getitem:
        return "getitem"
    pkt = getattr(t, "_overloadpacket", None)
    if pkt is not None:
        return pkt.__name__.split(".")[-1]
    return getattr(t, "__name__", str(t))


Rule = Callable[[Analysis, fx.Node], Any]
RULES: dict[str, Rule] = {}


def rule(*names: str) -> Callable[[Rule], Rule]:
    def deco(fn: Rule) -> Rule:
        for n in names:
            RULES[n] = fn
        return fn
    return deco


def _where(a: Analysis, node: fx.Node) -> str:
    mod = a.traced.module_of(node)
    return f"{op_name(node)} in {mod or '<root>'}"


def _opaque(a: Analysis, node: fx.Node) -> Any:
    why = f"used by {_where(a, node)} (no coupling rule for this op)"
    for x in node.all_input_nodes:
        a.flag_dims(a.d(x), range(len(a.d(x) or [])), why)
    return a.fresh(node)


def _flag_outputs(a: Analysis, node: fx.Node) -> None:
    for x in node.all_input_nodes:
        v = a.dims.get(x.name)
        lists = [v] if v and isinstance(v[0], int) else [w for w in (v or []) if w]
        for dims in lists:
            a.flag_dims(dims, range(len(dims)), "model output")


def broadcast(a: Analysis, out: Dims, ins: list[Dims | None]) -> None:
    """Unite each output dim with the same (right-aligned, not broadcast) dim of every input."""
    for dims in ins:
        if dims is None:
            continue
        for k in range(1, min(len(dims), len(out)) + 1):
            x, y = dims[-k], out[-k]
            if a.spaces.size[a.spaces.find(x)] == a.spaces.size[a.spaces.find(y)] > 1:
                a.unite(x, y)


def _runs(in_shape: list[int], out_shape: list[int]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of input and output dims with equal products (greedy, left to right)."""
    runs, i, j = [], 0, 0
    while i < len(in_shape) or j < len(out_shape):
        ri, rj, pi, pj = [], [], 1, 1
        if i < len(in_shape):
            ri, pi = [i], in_shape[i]
        if j < len(out_shape):
            rj, pj = [j], out_shape[j]
        while pi != pj:
            if pi < pj and i + len(ri) < len(in_shape):
                ri.append(i + len(ri))
                pi *= in_shape[ri[-1]]
            elif pj < pi and j + len(rj) < len(out_shape):
                rj.append(j + len(rj))
                pj *= out_shape[rj[-1]]
            else:
                raise ValueError(f"cannot align reshape {in_shape} -> {out_shape}")
        runs.append((ri, rj))
        i, j = i + len(ri), j + len(rj)
    return runs


def reshape_dims(a: Analysis, src: Dims, in_shape: list[int], out_shape: list[int]) -> Dims:
    """Dims of a reshape: runs of input dims ↔ runs of output dims with equal products."""
    out: Dims = [-1] * len(out_shape)
    for ri, rj in _runs(in_shape, out_shape):
        _map_run(a, src, ri, rj, out_shape, out)
    return [o if o >= 0 else a.spaces.new(out_shape[k]) for k, o in enumerate(out)]


def _map_run(a: Analysis, src: Dims, ri: list[int], rj: list[int], out_shape: list[int], out: Dims) -> None:
    big_i = [k for k in ri if a.spaces.size[a.spaces.find(src[k])] != 1]
    big_j = [k for k in rj if out_shape[k] != 1]
    if not big_j:
        return
    if len(big_i) == 1 and len(big_j) == 1:
        out[big_j[0]] = src[big_i[0]]
    elif len(big_i) == 1:
        kids = a.spaces.split(src[big_i[0]], [out_shape[k] for k in big_j])
        for k, c in zip(big_j, kids):
            out[k] = c
    elif len(big_j) == 1 and big_i:
        out[big_j[0]] = a.spaces.merge([src[k] for k in big_i])
    elif big_i:
        merged = a.spaces.merge([src[k] for k in big_i])
        for k, c in zip(big_j, a.spaces.split(merged, [out_shape[k] for k in big_j])):
            out[k] = c
