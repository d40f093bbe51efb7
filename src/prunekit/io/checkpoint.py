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

import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from prunekit.core.bits import pack_mask, unpack_mask
from prunekit.core.errors import CheckpointError
from prunekit.core.masks import MaskSet

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "read_manifest", "atomic_write_text",
           "atomic_write_json", "sha256_file", "signals_deferred", "pack_mask", "unpack_mask", "state_dict_for_save"]

FORMAT = "prunekit-checkpoint/1"
MODEL_FILE, MASK_FILE, MANIFEST_FILE = "model.safetensors", "masks.safetensors", "manifest.json"



def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normal_mode(path: str | os.PathLike, directory: bool = False) -> None:
    """``mkstemp``/``mkdtemp`` create 0600/0700: give the file the mode ``open()`` would (0644 under umask 022)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT/SIGTERM while a checkpoint is written; they are re-raised once it is whole."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, lambda n, _f: got.append(n))
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for n in got[:1]:
            signal.raise_signal(n)


def _atomic_replace(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        _normal_mode(tmp)              # after the write: a writer may recreate the file
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
    return _read_json_doc(Path(directory) / MANIFEST_FILE, "checkpoint manifest", FORMAT)


def _read_json_doc(path: Path, what: str, fmt: str) -> dict:
    """Read a JSON document of format ``fmt``; CheckpointError naming ``path`` if absent/corrupt/foreign."""
    if not path.is_file():
        raise CheckpointError(f"no {what} at {path}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what} {path} is corrupt: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        found = doc.get("format") if isinstance(doc, dict) else None
        raise CheckpointError(f"{path} is not a prunekit {what} (format {found!r}, expected {fmt!r})")
    return doc


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


# ---------------------------------------------------------------------------------------------
# Run state (resume): any nested structure of tensors / numbers / strings / lists / dicts, stored as
# one safetensors file (every tensor, by its path) + one JSON tree (everything else), never pickled.
# ---------------------------------------------------------------------------------------------
STATE_FORMAT = "prunekit-state/1"
STATE_TENSORS, STATE_JSON = "state.safetensors", "state.json"

__all__ += ["flatten_state", "unflatten_state", "save_state", "load_state", "StateStore", "STATE_FORMAT"]


def flatten_state(obj: Any, prefix: str = "s") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split ``obj`` into a JSON-able tree and a flat ``{key: tensor}`` dict.

    Tensors become ``{"__tensor__": key}``; dicts with non-string keys ``{"__items__": [[k, v], ...]}``;
    tuples ``{"__tuple__": [...]}``; numpy arrays and numbers are stored as tensors / JSON numbers.
    Anything else raises ``TypeError`` naming the path (so nothing ever needs pickling)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(o, path):
        if isinstance(o, torch.Tensor):
            key = f"{len(tensors):06d}:{path}"      # numbered: unique whatever the dict keys contain
            tensors[key] = o.detach().cpu().contiguous().clone()
            return {"__tensor__": key}
        if isinstance(o, np.ndarray):
            key = f"{len(tensors):06d}:{path}"
            tensors[key] = torch.from_numpy(np.ascontiguousarray(o).copy())
            return {"__tensor__": key, "numpy": True}
        if isinstance(o, (bool, str)) or o is None:
            return o
        if isinstance(o, (int, np.integer)):
            return int(o)
        if isinstance(o, (float, np.floating)):
            return float(o)
        if isinstance(o, dict):
            if all(isinstance(k, str) for k in o) and not any(k.startswith("__") for k in o):
                return {k: walk(v, f"{path}.{k}") for k, v in o.items()}
            items = []
            for i, (k, v) in enumerate(o.items()):
                if not isinstance(k, (str, int, bool, float)) and k is not None:
                    raise TypeError(f"state at {path}: dict key {k!r} of type {type(k).__name__} cannot be stored")
                items.append([k, walk(v, f"{path}.{i}")])
            return {"__items__": items}
        if isinstance(o, tuple):
            return {"__tuple__": [walk(v, f"{path}.{i}") for i, v in enumerate(o)]}
        if isinstance(o, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(o)]
        raise TypeError(f"state at {path}: {type(o).__name__} cannot be stored without pickling")

    return walk(obj, prefix), tensors


def unflatten_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    def walk(o):
        if isinstance(o, dict):
            if "__tensor__" in o:
                key = o["__tensor__"]
                if key not in tensors:
                    raise CheckpointError(f"run state lacks tensor {key!r} listed in its JSON")
                t = tensors[key]
                return t.numpy() if o.get("numpy") else t
            if "__items__" in o:
                return {k: walk(v) for k, v in o["__items__"]}
            if "__tuple__" in o:
                return tuple(walk(v) for v in o["__tuple__"])
            return {k: walk(v) for k, v in o.items()}
        if isinstance(o, list):
            return [walk(v) for v in o]
        return o
    return walk(tree)


def save_state(directory: str | os.PathLike, obj: Any, meta: dict | None = None) -> None:
    """Write ``obj`` (see :func:`flatten_state`) as ``state.safetensors`` + ``state.json`` (with the
    safetensors sha256 and ``meta``) into ``directory``; the JSON is written last."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tree, tensors = flatten_state(obj)
    _atomic_replace(d / STATE_TENSORS, lambda tmp: save_file(tensors, tmp, metadata={"format": STATE_FORMAT}))
    atomic_write_json(d / STATE_JSON, {"format": STATE_FORMAT, "meta": meta or {},
                                       "sha256": {STATE_TENSORS: sha256_file(d / STATE_TENSORS)}, "tree": tree})


def load_state(directory: str | os.PathLike) -> tuple[Any, dict]:
    """Verify (sha256) and read a state written by :func:`save_state`; returns ``(obj, meta)``."""
    d = Path(directory)
    doc = _read_json_doc(d / STATE_JSON, "run state", STATE_FORMAT)
    _verify(d, doc, STATE_TENSORS)
    try:
        tensors = load_file(str(d / STATE_TENSORS))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read run state {d / STATE_TENSORS}: {e}") from None
    return unflatten_state(doc["tree"], tensors), doc.get("meta", {})


class StateStore:
    """Numbered run-state checkpoints ``root/ckpt-000001``, ... keeping the newest ``keep`` (default 2).

    Each checkpoint is written into a temporary folder and renamed into place, so a crash mid-write
    never leaves a half checkpoint under a ``ckpt-*`` name; :meth:`load_latest` verifies checksums and
    falls back to the previous good checkpoint (calling ``warn`` with the reason) when the newest is
    truncated or corrupt."""

    def __init__(self, root: str | os.PathLike, keep: int = 2):
        self.root = Path(root)
        self.keep = max(1, int(keep))

    def checkpoints(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            if p.is_dir() and p.name.startswith("ckpt-") and p.name[5:].isdigit():
                out.append(p)
        return sorted(out, key=lambda p: int(p.name[5:]))

    def exists(self) -> bool:
        return bool(self.checkpoints())

    def save(self, obj: Any, meta: dict | None = None) -> Path:
        existing = self.checkpoints()
        seq = int(existing[-1].name[5:]) + 1 if existing else 1
        self.root.mkdir(parents=True, exist_ok=True)
        with signals_deferred():          # Ctrl-C / SIGTERM wait until the checkpoint is whole
            return self._save(obj, meta, seq)

    def _save(self, obj: Any, meta: dict | None, seq: int) -> Path:
        tmp = Path(tempfile.mkdtemp(prefix=".ckpt-tmp-", dir=self.root))
        _normal_mode(tmp, directory=True)
        try:
            save_state(tmp, obj, {**(meta or {}), "seq": seq})
            final = self.root / f"ckpt-{seq:06d}"
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(self.root)
        for old in self.checkpoints()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".ckpt-tmp-*"):
            if stale != tmp:
                shutil.rmtree(stale, ignore_errors=True)
        return final

    def load_latest(self, warn=None) -> tuple[Any, dict, Path] | None:
        """Newest checkpoint that verifies, as ``(obj, meta, path)``; ``None`` if there is none at all.
        Raises :class:`CheckpointError` if checkpoints exist but none is readable."""
        cks = self.checkpoints()
        if not cks:
            return None
        errors = []
        for p in reversed(cks):
            try:
                obj, meta = load_state(p)
            except CheckpointError as e:
                errors.append(str(e))
                if warn is not None:
                    warn(f"checkpoint {p} is unusable ({e}); falling back to the previous one")
                continue
            return obj, meta, p
        raise CheckpointError(f"no usable checkpoint in {self.root}: " + "; ".join(errors))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
