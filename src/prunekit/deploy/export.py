"""ONNX export of a (compacted) model, checked with onnxruntime against PyTorch.

Optional extra: ``pip install "prunekit[onnx]"`` (``onnx``, ``onnxruntime``, ``onnxscript``; none of
them pulls torch).  :func:`export_onnx` calls ``torch.onnx.export`` (torch 2.13: the dynamo/
``torch.export`` based exporter, which needs ``onnxscript``) and then :func:`check_onnx` runs the
file with onnxruntime on the same inputs and compares every output with PyTorch's.

Inputs are given as a tensor, a tuple of tensors (positional) or a dict of tensors (keyword inputs,
e.g. a HF tokenizer's output; names become the ONNX input names).  HF models are wrapped so the
graph returns plain tensors (``logits`` / ``last_hidden_state``).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from prunekit.core.errors import ModelError

__all__ = ["export_onnx", "check_onnx", "require_onnx", "OnnxCheck"]


def require_onnx() -> tuple[Any, Any]:
    """Import ``onnx`` and ``onnxruntime`` or raise ImportError with the install line."""
    try:
        import onnx  # noqa: PLC0415
        import onnxruntime  # noqa: PLC0415
    except ImportError as e:
        raise ImportError(f"ONNX export needs the optional extra: pip install onnx onnxruntime onnxscript "
                          f"(or pip install 'prunekit[onnx]'); missing: {e.name}") from None
    return onnx, onnxruntime


class _TensorOutputs(nn.Module):
    """Call ``model`` with keyword inputs and return a tuple of tensors (HF ModelOutput → tuple)."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        super().__init__()
        self.model, self.names = model, list(names)

    def forward(self, *args: Tensor):
        out = self.model(**dict(zip(self.names, args)))
        return _flatten_outputs(out)


def _flatten_outputs(out: Any) -> tuple[Tensor, ...]:
    if isinstance(out, Tensor):
        return (out,)
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (tuple, list)):
        flat: list[Tensor] = []
        for o in out:
            if isinstance(o, Tensor):
                flat.append(o)
        if flat:
            return tuple(flat)
    raise TypeError(f"model output of type {type(out).__name__} has no tensors to export")


def _normalise(inputs: Tensor | Sequence[Tensor] | Mapping[str, Tensor]) -> tuple[list[str], tuple[Tensor, ...], bool]:
    if isinstance(inputs, Tensor):
        return ["input"], (inputs,), False
    if isinstance(inputs, Mapping):
        names = list(inputs)
        return names, tuple(inputs[n] for n in names), True
    if isinstance(inputs, (tuple, list)):
        return [f"input_{i}" for i in range(len(inputs))], tuple(inputs), False
    raise TypeError(f"example inputs must be a tensor, a tuple of tensors or a dict of tensors, got {type(inputs).__name__}")


def export_onnx(model: nn.Module, example_inputs: Tensor | Sequence[Tensor] | Mapping[str, Tensor],
                path: str | os.PathLike, *, dynamic_batch: bool = True, opset: int | None = None,
                check: bool = True, atol: float = 1e-4) -> OnnxCheck | None:
    """Export ``model`` (in eval mode) to ``path``; with ``check`` compare onnxruntime with PyTorch on
    ``example_inputs`` and raise ``AssertionError`` naming the worst output if they differ by more than
    ``atol``.  ``dynamic_batch`` makes dimension 0 of every input dynamic (dimension 1 too for
    keyword inputs, the sequence length).  Returns the :class:`OnnxCheck` (``None`` without check)."""
    require_onnx()
    names, args, keyword = _normalise(example_inputs)
    model = model.eval()
    wrapped = (_TensorOutputs(model, names) if keyword else model).eval()
    dyn: tuple[Any, ...] | None = None
    if dynamic_batch:
        per_input: dict[str, dict[int, Any]] = {}
        for n, a in zip(names, args):
            axes = {0: torch.export.Dim.AUTO}
            if keyword and a.dim() >= 2:
                axes[1] = torch.export.Dim.AUTO
            per_input[n] = axes
        dyn = tuple(per_input[n] for n in names)
        if keyword:  # the wrapper takes *args: one (varargs) entry holding all of them
            dyn = (dyn,)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"input_names": names, "dynamo": True, "external_data": False}
    if dyn is not None:
        kwargs["dynamic_shapes"] = dyn
    if opset is not None:
        kwargs["opset_version"] = opset
    with torch.no_grad():
        torch.onnx.export(wrapped, args, str(path), **kwargs)
    if not check:
        return None
    result = check_onnx(path, model, example_inputs)
    if result.max_abs_diff > atol:
        raise AssertionError(f"ONNX output {result.worst_output} differs from PyTorch by {result.max_abs_diff:.3g} "
                             f"> atol {atol}")
    return result


class OnnxCheck:
    def __init__(self, max_abs_diff: float, worst_output: int, n_outputs: int):
        self.max_abs_diff, self.worst_output, self.n_outputs = max_abs_diff, worst_output, n_outputs

    def __repr__(self) -> str:
        return f"OnnxCheck(max_abs_diff={self.max_abs_diff:.3g}, outputs={self.n_outputs})"


def check_onnx(path: str | os.PathLike, model: nn.Module,
               inputs: Tensor | Sequence[Tensor] | Mapping[str, Tensor]) -> OnnxCheck:
    """Run ``path`` with onnxruntime (CPU) and PyTorch on ``inputs``; max abs difference over outputs."""
    onnx, ort = require_onnx()
    names, args, keyword = _normalise(inputs)
    onnx.checker.check_model(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed_names = [i.name for i in sess.get_inputs()]
    if len(feed_names) != len(args):
        raise ModelError(f"{path} takes inputs {feed_names}, got {len(args)} ({names})")
    ort_out = sess.run(None, {n: a.detach().cpu().numpy() for n, a in zip(feed_names, args)})
    with torch.no_grad():
        ref = _flatten_outputs(model(**dict(zip(names, args))) if keyword else model(*args))
    if len(ort_out) != len(ref):
        raise AssertionError(f"ONNX gives {len(ort_out)} outputs, PyTorch {len(ref)}")
    diffs = [float(np.abs(o - r.detach().cpu().numpy()).max()) if r.numel() else 0.0 for o, r in zip(ort_out, ref)]
    worst = int(np.argmax(diffs))
    return OnnxCheck(diffs[worst], worst, len(diffs))
