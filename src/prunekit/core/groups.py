"""Coupled groups: the one description of "what must be removed together", for scoring and compaction.

A :class:`CoupledGroup` has ``count`` units.  Each :class:`Slice` names one tensor of the model's
``state_dict()`` (a parameter *or* a buffer such as a BatchNorm ``running_mean``) and where the units
lie in it: unit ``g`` is ``offset + g*width : offset + (g+1)*width`` along ``dim``.  Examples:

* a Linear's output neuron: ``Slice("fc1.weight", 0, 1)``, ``Slice("fc1.bias", 0, 1)`` and the next
  layer's input column ``Slice("fc2.weight", 1, 1)``;
* a BERT head (head_dim 64): query/key/value rows ``Slice(q, 0, 64)`` and output columns
  ``Slice(o, 1, 64)``;
* a GQA KV group with ``n_rep`` query heads per KV head: k/v rows ``Slice(k, 0, d)`` plus query rows
  and output columns ``Slice(q, 0, n_rep*d)``, ``Slice(o, 1, n_rep*d)``;
* GPT-2's fused ``c_attn`` (Conv1D, weight ``(in, 3*hidden)``): one head is three slices of dim 1 at
  offsets ``0``, ``hidden``, ``2*hidden``;
* a conv channel flattened into a Linear: ``Slice("fc1.weight", 1, H*W)``.

Groups are plain frozen data (no module references), built by :mod:`prunekit.graph` from the model's
own graph, and consumed by scoring (:meth:`CoupledGroup.partition`: one row per unit, all coupled
slices concatenated, so a score is summed over every coupled slice), by mask making
(:meth:`CoupledGroup.element_masks`) and by compaction (:meth:`CoupledGroup.kept_indices`).
``removable=False`` groups carry the ``reason`` (e.g. the dimension is normalised by a LayerNorm, or
read by an LM head tied to the embedding); they may be scored but are never physically removed.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from prunekit.core.errors import RecipeError

__all__ = ["Slice", "CoupledGroup", "groups_by_kind", "units_to_prune"]

_log = logging.getLogger("prunekit")


@dataclass(frozen=True)
class Slice:
    """Unit ``g`` of a group is ``offset + g*width : offset + (g+1)*width`` along ``dim`` of ``tensor``."""

    tensor: str
    dim: int
    width: int = 1
    offset: int = 0

    def span(self, count: int) -> tuple[int, int]:
        """``(start, stop)`` of all ``count`` units along ``dim``."""
        return self.offset, self.offset + count * self.width

    def unit_view(self, t: Tensor, count: int) -> Tensor:
        """``(count, -1)``: every unit's entries of ``t`` (moved to the front, flattened)."""
        start, stop = self.span(count)
        part = t.detach().narrow(self.dim, start, stop - start).movedim(self.dim, 0)
        return part.reshape(count, self.width, -1).reshape(count, -1)


@dataclass(frozen=True)
class CoupledGroup:
    """``count`` units cut across ``slices`` (see the module docstring).

    ``kind``: ``"channels"``, ``"neurons"``, ``"heads"`` or ``"kv_groups"``.  ``modules``: the modules
    owning the sliced tensors (for attribute fixes after compaction).  ``attention``: for heads /
    KV groups, the attention module path, and ``head_dim`` / ``heads_per_unit`` (query heads per unit:
    1 for heads, ``n_rep`` for KV groups).  ``sources``: the slices that *write* the units (a Linear's or
    Conv's output rows, an embedding's columns); a unit whose sources and one-dimensional parameters
    (biases, norm affine) are all zero is provably zero.  ``readers``: consumers without a weight (a
    ``sum`` over the units): with readers, a unit goes only when it is provably zero."""

    name: str
    kind: str
    count: int
    slices: tuple[Slice, ...]
    removable: bool = True
    reason: str = ""
    modules: tuple[str, ...] = ()
    attention: str = ""
    head_dim: int = 0
    heads_per_unit: int = 0
    kv_per_unit: int = 0
    producers: tuple[str, ...] = field(default=())
    sources: tuple[Slice, ...] = ()
    readers: tuple[str, ...] = ()

    @property
    def tensors(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.tensor for s in self.slices))

    def partition(self, tensors: Mapping[str, Tensor], only: Sequence[str] | None = None) -> Tensor:
        """``(count, S)``: every unit's values from all slices (or the slices of ``only`` tensors)."""
        parts = [s.unit_view(tensors[s.tensor], self.count) for s in self.slices
                 if (only is None or s.tensor in only) and s.tensor in tensors]
        if not parts:
            raise KeyError(f"group {self.name}: none of its tensors {list(self.tensors)} were given")
        return torch.cat([p.float() for p in parts], 1)

    def unit_mask(self, keep: Tensor, s: Slice, shape: Sequence[int]) -> Tensor:
        """Boolean mask of ``shape`` for slice ``s``: False on the entries of units with ``keep=False``."""
        keep = torch.as_tensor(keep, dtype=torch.bool).reshape(-1)
        if keep.numel() != self.count:
            raise RecipeError(f"group {self.name}: keep has {keep.numel()} entries, group has {self.count} units")
        along = torch.ones(shape[s.dim], dtype=torch.bool)
        start, stop = s.span(self.count)
        along[start:stop] = keep.repeat_interleave(s.width)
        view = [1] * len(shape)
        view[s.dim] = shape[s.dim]
        return along.reshape(view).expand(*shape).clone()

    def element_masks(self, keep: Tensor, shapes: Mapping[str, Sequence[int]]) -> dict[str, Tensor]:
        """Unit keep-decision ``(count,)`` → element mask of every sliced tensor (ANDed per tensor)."""
        out: dict[str, Tensor] = {}
        for s in self.slices:
            if s.tensor not in shapes:
                continue
            m = self.unit_mask(keep, s, tuple(shapes[s.tensor]))
            out[s.tensor] = out[s.tensor] & m if s.tensor in out else m
        return out

    def kept_indices(self, keep: Tensor, s: Slice, size: int) -> Tensor:
        """Indices along ``s.dim`` (of length ``size``) that survive when units ``~keep`` are removed."""
        keep = torch.as_tensor(keep, dtype=torch.bool).reshape(-1)
        along = torch.ones(size, dtype=torch.bool)
        start, stop = s.span(self.count)
        along[start:stop] = keep.repeat_interleave(s.width)
        return torch.nonzero(along).reshape(-1)

    def pruned_units(self, masks: Mapping[str, Tensor]) -> Tensor:
        """``(count,)`` bool: units whose entries are all False in every slice that has a mask
        (and at least one slice has one)."""
        pruned = torch.ones(self.count, dtype=torch.bool)
        seen = False
        for s in self.slices:
            m = masks.get(s.tensor)
            if m is None:
                continue
            seen = True
            pruned &= ~s.unit_view(m.bool(), self.count).any(1)
        return pruned if seen else torch.zeros(self.count, dtype=torch.bool)

    def describe(self) -> str:
        what = ", ".join(f"{s.tensor}[{s.dim}]" + (f"/{s.width}" if s.width != 1 else "")
                         + (f"@{s.offset}" if s.offset else "") for s in self.slices)
        state = "" if self.removable else f" (not removable: {self.reason})"
        return f"{self.name}: {self.count} {self.kind} over {what}{state}"


def groups_by_kind(groups: Sequence[CoupledGroup], kind: str, removable_only: bool = True) -> list[CoupledGroup]:
    """The groups of one ``kind`` (removable ones only by default), in graph order."""
    return [g for g in groups if g.kind == kind and (g.removable or not removable_only)]


def units_to_prune(planned: Sequence[tuple[CoupledGroup, float]]) -> dict[str, int]:
    """``round(sparsity * count)`` units to prune per group (by name).  Where a positive sparsity rounds to
    zero units (``kv_groups`` at 25 % of 2 KV heads), nothing is pruned there: one ``UserWarning`` (and a
    ``prunekit`` log line) per kind, count and sparsity names the groups, e.g. ``"kv_groups: 25% of 2 groups
    rounds to 0 — nothing pruned in model.layers.0.self_attn"``."""
    out: dict[str, int] = {}
    zero: dict[tuple[str, int, float], list[str]] = {}
    for g, sp in planned:
        out[g.name] = int(round(float(sp) * g.count))
        if out[g.name] == 0 and sp > 0:
            zero.setdefault((g.kind, g.count, float(sp)), []).append(g.name.split(":", 1)[-1])
    for (kind, count, sp), where in zero.items():
        shown = ", ".join(where[:6]) + (f" and {len(where) - 6} more" if len(where) > 6 else "")
        msg = f"{kind}: {sp:.0%} of {count} groups rounds to 0 — nothing pruned in {shown}"
        warnings.warn(msg, UserWarning, stacklevel=3)
        _log.warning(msg)
    return out
