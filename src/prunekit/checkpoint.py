"""Safe checkpoints: safetensors weights + a JSON manifest.  Nothing is ever pickled.

A checkpoint folder holds::

    model.safetensors   the weights (pruned entries are stored as zeros)
    masks.safetensors   each mask bit-packed (uint8, numpy.packbits order) under its parameter name
    manifest.json       format version, per-tensor shapes/dtypes, mask shapes + structures, the recipe,
                        free-form extras, and the sha256 of both .safetensors files

Every file is written to a temporary name in the same folder and renamed into place (atomic on POSIX),
and the manifest is written last, so a crash mid-save leaves the previous checkpoint intact.
Loading verifies the checksums, the tensor names and the shapes before touching the model, and raises
:class:`CheckpointError` naming the file and the problem.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .masks import MaskSet

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "read_manifest", "atomic_write_text",
           "atomic_write_json", "sha256_file", "pack_mask", "unpack_mask", "state_dict_for_save"]

FORMAT = "prunekit-checkpoint/1"
MODEL_FILE, MASK_FILE, MANIFEST_FILE = "model.safetensors", "masks.safetensors", "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not fit the model."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_replace(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file + rename."""
    def w(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    _atomic_replace(Path(path), w)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, torch.Size):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def pack_mask(m: torch.Tensor) -> torch.Tensor:
    """Bool mask → uint8 bit-packed 1-D tensor (8 entries per byte)."""
    return torch.from_numpy(np.packbits(m.detach().cpu().numpy().astype(bool).reshape(-1)))


def unpack_mask(packed: torch.Tensor, shape) -> torch.Tensor:
    n = int(np.prod(shape)) if len(shape) else 1
    bits = np.unpackbits(packed.numpy(), count=n).astype(bool)
    return torch.from_numpy(bits).reshape(tuple(shape))


def state_dict_for_save(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Contiguous CPU state dict with shared tensors stored once; returns (tensors, aliases)."""
    seen: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for k, v in model.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype) if v.numel() else None
        if key is not None and key in seen:
            aliases[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        tensors[k] = v.detach().cpu().contiguous().clone()
    return tensors, aliases


def save_checkpoint(directory: str | os.PathLike, model: nn.Module, masks: MaskSet | None = None, *,
                    recipe: dict | None = None, extra: dict | None = None) -> dict:
    """Write ``model.safetensors``, ``masks.safetensors`` and ``manifest.json`` into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors, aliases = state_dict_for_save(model)
    _atomic_replace(d / MODEL_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    masks = masks or MaskSet()
    packed = {n: pack_mask(m) for n, m in masks.items()}
    _atomic_replace(d / MASK_FILE, lambda tmp: save_file(packed, tmp, metadata={"format": FORMAT}))
    manifest = {
        "format": FORMAT,
        "model_class": type(model).__name__,
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in tensors.items()},
        "aliases": aliases,
        "masks": {n: {"shape": list(m.shape), "structure": masks.structures.get(n), "kept": int(m.sum())}
                  for n, m in masks.items()},
        "sha256": {MODEL_FILE: sha256_file(d / MODEL_FILE), MASK_FILE: sha256_file(d / MASK_FILE)},
        "recipe": recipe,
        "extra": extra or {},
    }
    atomic_write_json(d / MANIFEST_FILE, manifest)
    return manifest


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(f"no checkpoint manifest at {path}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint manifest {path} is corrupt: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a prunekit checkpoint manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r}, expected {FORMAT!r})")
    return manifest


def _verify(d: Path, manifest: dict, name: str) -> None:
    path = d / name
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    want = manifest.get("sha256", {}).get(name)
    got = sha256_file(path)
    if want != got:
        raise CheckpointError(f"checkpoint file {path} is corrupt or was changed: sha256 {got[:12]}… "
                              f"does not match the manifest's {str(want)[:12]}…")


def load_checkpoint(directory: str | os.PathLike, model: nn.Module | None = None, *,
                    strict: bool = True) -> tuple[dict[str, torch.Tensor], MaskSet, dict]:
    """Verify and read a checkpoint; if ``model`` is given, check names/shapes and load it in place.

    Returns ``(state_dict, masks, manifest)``."""
    d = Path(directory)
    manifest = read_manifest(d)
    _verify(d, manifest, MODEL_FILE)
    _verify(d, manifest, MASK_FILE)
    try:
        state = load_file(str(d / MODEL_FILE))
        packed = load_file(str(d / MASK_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint in {d}: {e}") from None
    for k, src in manifest.get("aliases", {}).items():
        state[k] = state[src]
    masks = MaskSet()
    for n, info in manifest["masks"].items():
        if n not in packed:
            raise CheckpointError(f"{d / MASK_FILE} lacks the mask for {n!r} listed in the manifest")
        masks.set(n, unpack_mask(packed[n], info["shape"]), info.get("structure"))
    if model is not None:
        load_into(model, state, source=str(d / MODEL_FILE), strict=strict)
        masks.check_model(model)
    return state, masks, manifest


def load_into(model: nn.Module, state: dict[str, torch.Tensor], *, source: str = "checkpoint", strict: bool = True) -> None:
    """Load ``state`` into ``model`` after checking names and shapes; clear errors on mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__}: missing {missing[:10]}"
            f"{'…' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}{'…' if len(unexpected) > 10 else ''}")
    bad = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items() if k in state and state[k].shape != v.shape]
    if bad:
        k, a, b = bad[0]
        raise CheckpointError(f"{source}: tensor {k!r} has shape {a} in the checkpoint but {b} in the model "
                              f"({len(bad)} mismatching tensors) — is it a checkpoint of another model?")
    model.load_state_dict(state, strict=strict)
