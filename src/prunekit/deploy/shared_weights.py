"""Shared-weights multi-sparsity models: nested masks, one weight set, switch levels by rewriting the difference.

A device that switches between models of different sparsity (as its energy changes) keeps **one** weight
set and K **nested** masks ``M_0 ⊆ M_1 ⊆ … ⊆ M_{K-1}`` (level 0 = sparsest).  Level ``k``'s weights are
``W · M_k``, so every weight kept by a sparser level is kept, with the same value, by every denser level
— the construction of the reference work::

    W_high   = W · M_h
    W_medium = W · M_hm + W_high         (M_hm = weights added by the medium level)
    W_low    = W · M_l  + W_medium       (the denser level adds weights, never changes shared ones)

Pieces (all plain data keyed by parameter name, like :class:`~prunekit.core.masks.MaskSet`):

* :class:`NestedMasks` — K :class:`MaskSet` levels, sparsest first, with the invariant checked;
  :func:`nested_masks` builds them from one weight set by nested selection per structure.
* Training: :func:`train_sequential` (train the sparsest level with any registered algorithm, freeze it,
  train only the added weights of the next level, …) and :func:`train_joint` (one weight set, one level
  per step cycled/sampled — or all levels summed — each level's loss on its own mask; a
  :class:`JointLevels` hook inside :func:`prunekit.training.loop.fit`).
* One artifact: :func:`save_shared` writes one ``.safetensors`` file — the densest level's weights, every
  level's mask as a bit-packed *level map* and a JSON manifest in the safetensors header;
  :func:`load_level` loads any level; :class:`SharedWeightsModel` switches a loaded model between levels
  **in place**, writing only the elements that differ (and counting the bytes written).
* Switching cost: :func:`switch_cost` / :func:`switch_table` — bytes of the patch a device writes (changed
  values + an index of the changed positions in the cheapest of :mod:`prunekit.deploy.storage`'s bitmask / CSR /
  relative encodings, or a dense rewrite of the layer when that is cheaper) against rewriting the whole
  model; :func:`breakeven_report` gives the sparsity below which storing indices costs more than it saves.

Nesting per structure (the sparser level's mask first, each denser level adds groups chosen among the
remaining ones, by the same score):

* ``unstructured | row | column | block:RxC`` — groups of the sparser level are forced kept, the rest are
  ranked by the structure's group score (layer or global scope), so a denser level adds whole groups;
* ``nm:N:M`` — the structure names the *sparsest* level (N kept of M); a denser level at sparsity ``s``
  keeps ``M - round(s·M)`` of every M, a superset of the sparser level's entries in each run:
  ``nm:1:4`` at levels 0.75/0.5/0.25 gives 1:4 ⊂ 2:4 ⊂ 3:4;
* ``pattern…`` — each tile keeps the best pattern (from the structure's pattern set) that *contains* the
  sparser level's pattern of that tile; when the set has no such superset the tile keeps its sparser
  pattern plus its largest remaining entries (the set is extended for that tile); with connectivity pruning (``+conn`` or no fixed ``keep``) whole tiles that
  the sparser level dropped are the ones added back or dropped, lowest energy first.

Parameters that are not pruned (biases, norms) are shared by all levels: sequential training freezes them
after the sparsest level, joint training trains them for all levels at once.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from prunekit.core.bits import pack, unpack
from prunekit.core.errors import ModelError
from prunekit.core.nested import NestedMasks
from prunekit.deploy import storage
from prunekit.io.checkpoint import CheckpointError, _atomic_replace, load_into, state_dict_for_save

__all__ = ["NestedMasks", "save_shared", "read_shared", "load_level", "SharedWeightsModel", "SharedFormatError",
    "switch_cost", "switch_table", "patch_bytes", "breakeven_report", "SWITCH_ENCODINGS"]

FORMAT = "prunekit-shared/1"
SWITCH_ENCODINGS = ("bitmask", "csr", "relative")


class SharedFormatError(CheckpointError):
    """A shared-weights artifact is missing, corrupt, or does not fit the model."""


# =============================================================================================
# One artifact
# =============================================================================================
def _pack_levels(m: Tensor, bits: int) -> Tensor:
    """uint8 level map → bit-packed uint8 (``bits`` per element, LSB first; :func:`prunekit.core.bits.pack`)."""
    return torch.from_numpy(pack(m.reshape(-1).numpy(), bits, bitorder="little"))


def _unpack_levels(packed: Tensor, bits: int, shape) -> Tensor:
    v = unpack(packed.numpy(), bits, math.prod(shape), bitorder="little").astype(np.uint8)
    return torch.from_numpy(v).reshape(tuple(shape))


def save_shared(path: str | os.PathLike, model: nn.Module, nested: NestedMasks, *,
                levels_info: Sequence[dict] | None = None, extra: dict | None = None) -> dict:
    """Write the one-file artifact: the model's state dict (it must hold the **densest** level), each masked
    parameter's nested masks as one bit-packed level map (``ceil(log2(K+1))`` bits per weight, under
    ``"__levels__.<name>"``), and the JSON manifest in the safetensors header (key ``prunekit``).
    Returns the manifest."""
    path = Path(path)
    K = len(nested)
    bits = max(1, int(K).bit_length())
    tensors, aliases = state_dict_for_save(model)
    params = dict(model.named_parameters())
    for n in nested.names():
        if n not in tensors:
            raise ModelError(f"masked parameter {n!r} is not in the model's state dict")
        outside = params[n].detach() * (~nested.densest[n]).to(params[n].dtype)
        if bool(outside.ne(0).any()):
            raise ModelError(f"{n}: the model has nonzero weights outside the densest level's mask; "
                             "load the densest level before saving")
    packed = {f"__levels__.{n}": _pack_levels(nested.level_map(n), bits) for n in nested.names()}
    manifest = {
        "format": FORMAT,
        "model_class": type(model).__name__,
        "num_levels": K,
        "level_bits": bits,
        "levels": list(levels_info) if levels_info else [{"level": k} for k in range(K)],
        "measured_sparsity": nested.sparsities(),
        "masks": {n: {"shape": list(m.shape), "structure": nested.densest.structures.get(n)}
                  for n, m in nested.densest.items()},
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in tensors.items()},
        "aliases": aliases,
        "extra": extra or {},
    }
    all_t = {**tensors, **packed}
    _atomic_replace(path, lambda tmp: save_file(all_t, tmp, metadata={"format": FORMAT, "prunekit": json.dumps(manifest)}))
    return manifest


def read_shared(path: str | os.PathLike) -> tuple[dict[str, Tensor], NestedMasks, dict]:
    """Read the artifact: ``(densest state dict, nested masks, manifest)``."""
    p = Path(path)
    if not p.is_file():
        raise SharedFormatError(f"no shared-weights artifact at {p}")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or "prunekit" not in meta:
                raise SharedFormatError(f"{p} is not a prunekit shared-weights artifact "
                                        f"(format {meta.get('format')!r}, expected {FORMAT!r})")
            manifest = json.loads(meta["prunekit"])
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise SharedFormatError(f"cannot read shared-weights artifact {p}: {e}") from None
    K, bits = int(manifest["num_levels"]), int(manifest["level_bits"])
    maps, state = {}, {}
    for k, v in raw.items():
        if k.startswith("__levels__."):
            continue
        state[k] = v
    for k, src in manifest.get("aliases", {}).items():
        state[k] = state[src]
    for n, info in manifest["masks"].items():
        key = f"__levels__.{n}"
        if key not in raw:
            raise SharedFormatError(f"{p} lacks the level map of {n!r} listed in its manifest")
        maps[n] = _unpack_levels(raw[key], bits, info["shape"])
    nested = NestedMasks.from_level_maps(maps, K, {n: i.get("structure") for n, i in manifest["masks"].items()})
    return state, nested, manifest


def load_level(path: str | os.PathLike, level: int, model: nn.Module) -> SharedWeightsModel:
    """Load level ``level`` (0 = sparsest) of the artifact at ``path`` into ``model`` in place; returns the
    :class:`SharedWeightsModel` that can :meth:`~SharedWeightsModel.switch` it."""
    state, nested, manifest = read_shared(path)
    try:
        load_into(model, state, source=str(path))
    except CheckpointError as e:
        raise SharedFormatError(str(e)) from None
    params = dict(model.named_parameters())
    dense_values = {n: params[n].detach().clone() for n in nested.names()}
    swm = SharedWeightsModel(model, nested, dense_values, level=len(nested) - 1, manifest=manifest)
    swm.switch(level)
    swm.bytes_written = 0
    return swm


@dataclass
class SwitchRecord:
    src: int
    dst: int
    elements_written: int
    bytes_written: int
    seconds: float


class SharedWeightsModel:
    """A model plus its nested masks and the densest level's values, switchable between levels in place.

    :meth:`switch` writes only the elements that differ between the current and the target level (the
    added values when going denser, zeros when going sparser), through the parameters' storage (their
    identity is unchanged, so an optimizer or compiled graph stays valid), and counts the bytes written."""

    def __init__(self, model: nn.Module, nested: NestedMasks, dense_values: dict[str, Tensor], level: int,
                 manifest: dict | None = None):
        self.model, self.nested, self.manifest = model, nested, manifest or {}
        nested.densest.check_model(model)
        self.values = {n: dense_values[n].detach() for n in nested.names()}
        self.level = nested._idx(level)
        self.bytes_written = 0
        self.log: list[SwitchRecord] = []
        self._params = dict(model.named_parameters())

    @torch.no_grad()
    def switch(self, level: int) -> SwitchRecord:
        dst = self.nested._idx(level)
        src = self.level
        t0 = time.perf_counter()
        n_el = n_bytes = 0
        if dst != src:
            lo, hi = min(src, dst), max(src, dst)
            for n in self.nested.names():
                diff = (self.nested[hi][n] & ~self.nested[lo][n]).reshape(-1)
                idx = torch.nonzero(diff).flatten()
                if idx.numel() == 0:
                    continue
                flat = self._params[n].data.view(-1)
                if dst > src:
                    flat[idx] = self.values[n].reshape(-1)[idx]
                else:
                    flat[idx] = 0
                n_el += idx.numel()
                n_bytes += idx.numel() * flat.element_size()
        rec = SwitchRecord(src, dst, n_el, n_bytes, time.perf_counter() - t0)
        self.level = dst
        self.bytes_written += n_bytes
        self.log.append(rec)
        return rec


# =============================================================================================
# Switching cost
# =============================================================================================
def patch_bytes(changed: Tensor, n_values: int, dtype: torch.dtype,
                encodings: Sequence[str] = SWITCH_ENCODINGS) -> dict:
    """Bytes of a patch writing ``n_values`` values at the ``changed`` positions of one tensor: the index
    of the changed positions in the cheapest of ``encodings`` (:mod:`prunekit.deploy.storage`; index cost =
    the encoding's ``overhead_bytes``, i.e. everything but the true values) + ``n_values × itemsize``,
    or a dense rewrite of the tensor when that is smaller.  Returns ``{bytes, encoding, index_bytes,
    value_bytes, dense_bytes}``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    dense = changed.numel() * itemsize
    vb = int(n_values) * itemsize
    if not bool(changed.any()):
        return {"bytes": 0, "encoding": "none", "index_bytes": 0, "value_bytes": 0, "dense_bytes": dense}
    probe = torch.zeros(changed.shape, dtype=dtype)
    probe[changed] = 1
    best = None
    for e in encodings:
        if not storage.is_applicable(probe, e):
            continue
        enc = storage.encode(probe, e)
        cand = (enc.overhead_bytes + vb, e, enc.overhead_bytes)
        if best is None or cand[0] < best[0]:
            best = cand
    if best is None or best[0] >= dense:
        return {"bytes": dense, "encoding": "dense", "index_bytes": 0, "value_bytes": dense, "dense_bytes": dense}
    return {"bytes": best[0], "encoding": best[1], "index_bytes": best[2], "value_bytes": vb, "dense_bytes": dense}


def switch_cost(nested: NestedMasks, src: int, dst: int, dtypes: dict[str, torch.dtype] | None = None, *,
                other_bytes: int = 0, encodings: Sequence[str] = SWITCH_ENCODINGS) -> dict:
    """Bytes a device writes to go from level ``src`` to ``dst``, per masked tensor the cheapest of (index of
    the changed positions + the new values) and a dense rewrite of that tensor.  Going denser writes the
    added values; going sparser writes only the index (the device writes the zeros itself).

    ``full_rewrite_bytes`` = every masked tensor dense + ``other_bytes`` (the unpruned parameters, which
    a full rewrite also writes but a switch never changes: they are shared)."""
    s, d = nested._idx(src), nested._idx(dst)
    lo, hi = min(s, d), max(s, d)
    total = index = values = dense = 0
    per: dict[str, dict] = {}
    changed_el = 0
    for n in nested.names():
        dt = (dtypes or {}).get(n, torch.float32)
        ch = nested[hi][n] & ~nested[lo][n]
        nv = int(ch.sum()) if d > s else 0
        pb = patch_bytes(ch, nv, dt, encodings)
        per[n] = pb
        total += pb["bytes"]
        index += pb["index_bytes"]
        values += pb["value_bytes"]
        dense += pb["dense_bytes"]
        changed_el += int(ch.sum())
    return {"from": s, "to": d, "switch_bytes": total, "index_bytes": index, "value_bytes": values,
            "changed_elements": changed_el, "full_rewrite_bytes": dense + int(other_bytes),
            "ratio_vs_full": total / max(dense + int(other_bytes), 1),
            "encodings": {n: p["encoding"] for n, p in per.items()}}


def switch_table(nested: NestedMasks, dtypes: dict[str, torch.dtype] | None = None, *, other_bytes: int = 0) -> list[dict]:
    """:func:`switch_cost` for every ordered pair of distinct levels."""
    K = len(nested)
    return [switch_cost(nested, a, b, dtypes, other_bytes=other_bytes) for a in range(K) for b in range(K) if a != b]


def breakeven_report(model: nn.Module, nested: NestedMasks) -> dict:
    """Where indices stop paying, per masked tensor and overall (from :func:`prunekit.deploy.storage.breakeven_sparsity`):

    * ``model_breakeven_sparsity`` — a level's tensor stored sparsely (cheapest of bitmask / CSR) is
      smaller than dense only above this sparsity; below it the index costs more than the zeros save;
    * ``switch_max_changed_fraction`` — a switch patch (index + values of the changed positions) beats
      rewriting the tensor only while fewer than this fraction of its elements change (a patch is a
      sparse tensor whose sparsity is 1 − changed fraction, so the same breakeven applies)."""
    params = dict(model.named_parameters())
    per = {}
    n_total = 0
    acc = 0.0
    for n in nested.names():
        p = params[n]
        bm = storage.breakeven_sparsity(p.numel(), p.dtype, "bitmask")
        csr = storage.breakeven_sparsity(tuple(p.shape), p.dtype, "csr")
        best = min(bm, csr)
        per[n] = {"bitmask": bm, "csr": csr, "breakeven_sparsity": best,
                  "level_sparsity": [lv.sparsity(n) for lv in nested.levels]}
        n_total += p.numel()
        acc += best * p.numel()
    overall = acc / max(n_total, 1)
    return {"model_breakeven_sparsity": overall, "switch_max_changed_fraction": 1.0 - overall, "per_tensor": per,
            "note": "below the breakeven sparsity a sparse encoding (indices + nonzero values) is larger than "
                    "the dense tensor; a switch patch changing more than 1 - breakeven of a tensor is written "
                    "as a dense rewrite of that tensor instead"}


