"""Saving and reloading a compacted model: the ``prunekit-compact/2`` manifest.

There is one compaction, graph-driven and verified: :func:`prunekit.deploy.surgery.compact`
(``prunekit.compact``, ``prunekit compact RUN``, ``prunekit bench RUN``).  Its result is saved with
:func:`save_compacted` (``model.safetensors`` + ``compact.json``: the kept indices of every cut
``(tensor, dim)``, attention head attributes, config updates, per-group report, shapes, sha256) and
reloaded with :func:`load_compacted` — a fresh dense model from the factory, the same cuts
(:func:`prunekit.deploy.surgery.apply_keeps`), a strict load::

    res = prunekit.compact(model, masks, x)
    save_compacted("out", model, res)                      # or graph_manifest(res, model)
    small = load_compacted("out", lambda: MyNet())          # same architecture, same weights

Manifests of format ``prunekit-compact/1`` came from the removed hand-written chain compaction, whose
results were never verified; they are refused with a message saying to compact the run again.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from prunekit.deploy.surgery import CompactResult, apply_keeps
from prunekit.io.checkpoint import CheckpointError, _atomic_replace, atomic_write_json, sha256_file, state_dict_for_save

__all__ = ["save_compacted", "load_compacted", "rebuild_compacted", "apply_manifest", "GRAPH_FORMAT",
           "LEGACY_FORMAT", "graph_manifest"]

GRAPH_FORMAT = "prunekit-compact/2"
LEGACY_FORMAT = "prunekit-compact/1"
COMPACT_MANIFEST, COMPACT_WEIGHTS = "compact.json", "model.safetensors"


def graph_manifest(res: CompactResult, model: nn.Module) -> dict[str, Any]:
    """The ``prunekit-compact/2`` manifest of a graph compaction (``model`` = the compacted model)."""
    return {
        "format": GRAPH_FORMAT,
        "model_class": type(model).__name__,
        "keep": [{"tensor": t, "dim": d, "size": int(v.numel()), "index": torch.nonzero(v).reshape(-1).tolist()}
                 for (t, d), v in res.keeps.items()],
        "attrs": {k: dict(v) for k, v in res.attrs.items()},
        "config_updates": dict(res.config_updates),
        "notes": list(res.notes),
        "groups": [{"name": g.name, "kind": g.kind, "count": g.count, "removed": g.removed, "kept": g.kept,
                    "removable": g.removable, "reason": g.reason} for g in res.groups],
        "params_before": res.params_before,
        "params_after": res.params_after,
        "macs_before": res.macs_before,
        "macs_after": res.macs_after,
    }


@torch.no_grad()
def _apply_graph_manifest(model: nn.Module, manifest: Mapping[str, Any]) -> None:
    state = dict(model.named_buffers())
    state.update(dict(model.named_parameters()))
    keeps = {}
    for k in manifest["keep"]:
        t = state.get(k["tensor"])
        if t is None or t.dim() <= k["dim"] or t.shape[k["dim"]] != k["size"]:
            raise CheckpointError(f"manifest cuts {k['tensor']!r} dim {k['dim']} of size {k['size']}, which "
                                  f"{type(model).__name__} does not have — wrong base_model_factory?")
        along = torch.zeros(k["size"], dtype=torch.bool)
        along[torch.tensor(k["index"], dtype=torch.long)] = True
        keeps[(k["tensor"], int(k["dim"]))] = along
    try:
        apply_keeps(model, keeps, manifest.get("attrs", {}))
    except AttributeError as e:
        raise CheckpointError(f"manifest does not fit {type(model).__name__}: {e}") from None
    cfg = getattr(model, "config", None)
    for k, v in manifest.get("config_updates", {}).items():
        if cfg is not None:
            setattr(cfg, k, v)


@torch.no_grad()
def apply_manifest(model: nn.Module, manifest: Mapping[str, Any]) -> nn.Module:
    """Slice a fresh base ``model`` to the shapes of ``manifest`` (weights are *not* meaningful until a
    state dict is loaded).  Checks the result against ``manifest["shapes"]``."""
    fmt = manifest.get("format")
    if fmt == LEGACY_FORMAT:
        raise CheckpointError(f"compaction manifest format {LEGACY_FORMAT!r} was written by the removed, unverified "
                              "chain compaction; compact the run again (prunekit compact RUN) to get a verified "
                              f"{GRAPH_FORMAT!r} manifest")
    if fmt != GRAPH_FORMAT:
        raise CheckpointError(f"not a compaction manifest (format {fmt!r}, expected {GRAPH_FORMAT!r})")
    _apply_graph_manifest(model, manifest)
    return _check_shapes(model, manifest)


def _check_shapes(model: nn.Module, manifest: Mapping[str, Any]) -> nn.Module:
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    bad = [(k, got.get(k), s) for k, s in manifest.get("shapes", {}).items() if got.get(k) != s]
    if bad:
        k, a, b = bad[0]
        raise CheckpointError(f"rebuilt model does not match the manifest: {k!r} is {a}, manifest says {b} "
                              f"({len(bad)} mismatches) — wrong base_model_factory?")
    return model


def rebuild_compacted(manifest: Mapping[str, Any], base_model_factory: Callable[[], nn.Module],
                      state_dict: Mapping[str, Tensor] | None = None) -> nn.Module:
    """Build the dense architecture with ``base_model_factory()``, slice it to the manifest's shapes
    and, if ``state_dict`` is given, load it with ``strict=True``."""
    model = apply_manifest(base_model_factory(), manifest)
    if state_dict is not None:
        model.load_state_dict(dict(state_dict), strict=True)
    return model


def save_compacted(directory: str | os.PathLike, model: nn.Module, manifest: Mapping[str, Any] | CompactResult,
                   extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` (tied tensors once) and ``compact.json`` (manifest + sha256);
    ``manifest`` may be the :class:`~prunekit.deploy.surgery.CompactResult` itself."""
    if isinstance(manifest, CompactResult):
        manifest = graph_manifest(manifest, model)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors, aliases = state_dict_for_save(model)
    _atomic_replace(d / COMPACT_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": GRAPH_FORMAT}))
    man = dict(manifest)
    man["shapes"] = {k: list(v.shape) for k, v in model.state_dict().items()}
    man["aliases"] = aliases
    man["sha256"] = {COMPACT_WEIGHTS: sha256_file(d / COMPACT_WEIGHTS)}
    man["extra"] = dict(extra or {})
    atomic_write_json(d / COMPACT_MANIFEST, man)
    return d


def load_compacted(directory: str | os.PathLike, base_model_factory: Callable[[], nn.Module]) -> nn.Module:
    """Inverse of :func:`save_compacted`: verify the checksum, rebuild, strict load."""

    d = Path(directory)
    path = d / COMPACT_MANIFEST
    if not path.is_file():
        raise CheckpointError(f"no compaction manifest at {path}")
    man = json.loads(path.read_text(encoding="utf-8"))
    if sha256_file(d / COMPACT_WEIGHTS) != man.get("sha256", {}).get(COMPACT_WEIGHTS):
        raise CheckpointError(f"{d / COMPACT_WEIGHTS} is corrupt or was changed (sha256 mismatch)")
    state = load_file(str(d / COMPACT_WEIGHTS))
    for k, src in man.get("aliases", {}).items():
        state[k] = state[src]
    return rebuild_compacted(man, base_model_factory, state)
