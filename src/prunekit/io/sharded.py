"""Sharded Hugging Face checkpoints, read lazily and written part by part.

* :class:`ShardReader` — a model folder holding ``model.safetensors`` or ``model-0000k-of-0000n.safetensors``
  + ``model.safetensors.index.json``; tensors are read on demand with safetensors' lazy ``safe_open`` (only
  the asked tensors are read from disk, straight onto the asked device).
* :class:`ShardWriter` — writes named groups of tensors (one pruned block at a time) as part files, each
  written atomically (temporary name, then rename) so a killed run leaves only whole parts; ``finish``
  renames the parts to the HF layout ``model-0000k-of-0000n.safetensors`` and writes the index
  (``metadata.total_size`` + ``weight_map``) that ``from_pretrained`` reads, and copies the model folder's
  other files (config, generation config, tokenizer).
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from prunekit.core.errors import CheckpointError

__all__ = ["INDEX_FILE", "ShardReader", "ShardWriter", "copy_model_files"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class ShardReader:
    """Lazy reader of a (sharded) safetensors model folder."""

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder).expanduser()
        index, single = self.folder / INDEX_FILE, self.folder / SINGLE_FILE
        if index.is_file():
            try:
                wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index (no weight_map): {e}") from None
            self.weight_map: dict[str, str] = {str(k): str(v) for k, v in wm.items()}
        elif single.is_file():
            with safe_open(str(single), framework="pt") as f:
                self.weight_map = {k: SINGLE_FILE for k in f.keys()}
        else:
            raise CheckpointError(f"{self.folder}: no {SINGLE_FILE} or {INDEX_FILE} (a model saved with "
                                  "save_pretrained(..., safe_serialization=True) is needed)")
        missing = sorted({f for f in self.weight_map.values() if not (self.folder / f).is_file()})
        if missing:
            raise CheckpointError(f"{self.folder}: shard file(s) {missing} named by the index are missing")

    def names(self) -> list[str]:
        return list(self.weight_map)

    def nbytes(self, names: Iterable[str] | None = None) -> int:
        """Bytes of the tensors ``names`` (default all) as stored."""
        total = 0
        by_file = self._by_file(self.names() if names is None else names)
        for file, ns in by_file.items():
            with safe_open(str(self.folder / file), framework="pt") as f:
                for n in ns:
                    sl = f.get_slice(n)
                    total += _numel(sl.get_shape()) * _DTYPE_BYTES.get(sl.get_dtype(), 4)
        return total

    def _by_file(self, names: Iterable[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for n in names:
            if n not in self.weight_map:
                raise CheckpointError(f"{self.folder}: tensor {n!r} is not in the checkpoint")
            out.setdefault(self.weight_map[n], []).append(n)
        return out

    def load(self, names: Iterable[str], device: str | torch.device = "cpu") -> dict[str, Tensor]:
        """The tensors ``names``, read lazily from their shards onto ``device``."""
        out: dict[str, Tensor] = {}
        for file, ns in self._by_file(names).items():
            with safe_open(str(self.folder / file), framework="pt", device=str(device)) as f:
                for n in ns:
                    out[n] = f.get_tensor(n)
        return out


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class ShardWriter:
    """Writes part files ``.part-<key>.safetensors`` into ``folder``; :meth:`finish` makes the HF layout."""

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder).expanduser()
        self.folder.mkdir(parents=True, exist_ok=True)

    def part(self, key: str) -> Path:
        return self.folder / f".part-{key}.safetensors"

    def has(self, key: str) -> bool:
        return self.part(key).is_file()

    def write(self, key: str, tensors: dict[str, Tensor]) -> None:
        """One part (atomic: a killed write leaves no part)."""
        tmp = self.folder / f".part-{key}.tmp"
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": "pt"})
        os.replace(tmp, self.part(key))

    def finish(self, keys: list[str]) -> dict[str, str]:
        """Rename the parts ``keys`` (in this order) to ``model-0000k-of-0000n.safetensors`` and write the index;
        returns the weight map."""
        missing = [k for k in keys if not self.has(k)]
        if missing:
            raise CheckpointError(f"{self.folder}: parts {missing} were never written")
        n, weight_map, total = len(keys), {}, 0
        for i, k in enumerate(keys, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            with safe_open(str(self.part(k)), framework="pt") as f:
                for t in f.keys():
                    weight_map[t] = name
                    sl = f.get_slice(t)
                    total += _numel(sl.get_shape()) * _DTYPE_BYTES.get(sl.get_dtype(), 4)
            os.replace(self.part(k), self.folder / name)
        index = {"metadata": {"total_size": int(total)}, "weight_map": dict(sorted(weight_map.items()))}
        tmp = self.folder / (INDEX_FILE + ".tmp")
        tmp.write_text(json.dumps(index, indent=2), encoding="utf-8")
        os.replace(tmp, self.folder / INDEX_FILE)
        return weight_map


def _numel(shape: list[int]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def copy_model_files(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> list[str]:
    """Copy a model folder's files other than the weights (config, generation config, tokenizer) to ``dst``."""
    s, d = Path(src).expanduser(), Path(dst).expanduser()
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for p in sorted(s.iterdir()):
        if p.is_file() and not p.name.endswith((".safetensors", ".bin", ".pt", ".pth")) and p.name != INDEX_FILE:
            shutil.copy2(p, d / p.name)
            out.append(p.name)
    return out
