"""Where and in what precision training runs: device resolution, moving batches/state, autocast.

* :func:`resolve_device` — ``auto | cpu | cuda | cuda:N | mps`` → ``torch.device`` (``auto`` = CUDA
  when available, else CPU); asking for a device the machine lacks raises :class:`RecipeError`.
* :func:`to_device` — tensors inside dicts / lists / tuples / ``Mapping`` batches (HF ``BatchEncoding``).
* :func:`to_cpu` — the same towards the CPU (run state is always saved as CPU tensors; it is mapped
  back with :func:`to_device` when loaded, so a run checkpointed on a GPU resumes on a CPU and back).
* :class:`Amp` — ``precision: fp32 | bf16 | fp16``: ``torch.autocast`` for the forward pass and the
  loss, a ``GradScaler`` for fp16 on CUDA.  Weights and optimizer state stay fp32, so hard-pruning
  (masks multiplied into the fp32 weights and gradients) stays exact under autocast.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from prunekit.core.errors import RecipeError

__all__ = ["DEVICES", "PRECISIONS", "resolve_device", "device_of", "to_device", "to_cpu", "Amp", "dist_backend",
           "set_threads"]

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The ``torch.device`` a recipe's ``device:`` names; :class:`RecipeError` if this machine lacks it."""
    s = "auto" if spec is None else str(spec).strip().lower()
    if s == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if s == "cpu":
        return torch.device("cpu")
    if s == "mps":
        if not _mps_available():
            raise RecipeError("device: 'mps' requested but Apple MPS is not available on this machine; "
                              "use device: cpu or device: auto")
        return torch.device("mps")
    if s == "cuda" or (s.startswith("cuda:") and s[5:].isdigit()):
        if not torch.cuda.is_available():
            raise RecipeError(f"device: {s!r} requested but CUDA is not available on this machine "
                              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
                              "use device: cpu or device: auto")
        idx = int(s[5:]) if ":" in s else 0
        if idx >= torch.cuda.device_count():
            raise RecipeError(f"device: {s!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", idx)
    raise RecipeError(f"device: {spec!r} is not one of {list(DEVICES)}")


def check_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise RecipeError(f"precision: {precision!r} is not one of {list(PRECISIONS)}")
    if precision == "fp16" and device.type == "cpu":
        raise RecipeError("precision: fp16 needs a GPU (CPU autocast supports bf16); use precision: bf16 or fp32")
    return precision


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def to_device(obj: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """``obj`` with every tensor moved to ``device`` (dicts, ``Mapping`` batches, lists, tuples, named
    tuples); tensors already there are returned as they are (no copy)."""
    if isinstance(obj, torch.Tensor):
        return obj if _same_device(obj.device, torch.device(device)) else obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, Mapping):   # dicts and e.g. transformers.BatchEncoding (a UserDict)
        return {k: to_device(v, device, non_blocking) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(to_device(v, device, non_blocking) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device, non_blocking) for v in obj)
    return obj


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor on the CPU (for saving run state)."""
    return to_device(obj, torch.device("cpu"))


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


class Amp:
    """Mixed precision for one training loop: ``with amp.autocast(): loss = ...``; ``amp.backward(loss)``;
    ``amp.unscale(opt)`` (before clipping); ``amp.step(opt)``.  ``fp32`` makes all of these plain."""

    def __init__(self, precision: str = "fp32", device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.precision = check_precision(precision or "fp32", self.device)
        self.dtype = _DTYPES.get(self.precision)
        use_scaler = self.precision == "fp16" and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, opt: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(opt)

    def step(self, opt: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            opt.step()
            return
        self.scaler.step(opt)
        self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def dist_backend(device: torch.device | str | None = None) -> str:
    """``nccl`` for a CUDA device, else ``gloo`` (the process-group backend follows the device)."""
    if device is None:
        return "nccl" if torch.cuda.is_available() else "gloo"
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def set_threads(n: int | None) -> None:
    """``torch.set_num_threads(n)`` (and inter-op threads where still settable); ``None`` leaves them."""
    if n is None:
        return
    if int(n) < 1:
        raise RecipeError(f"threads: {n} is out of range (must be >= 1)")
    torch.set_num_threads(int(n))
