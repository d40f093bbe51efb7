"""ONNX export of a (compacted) model, checked with onnxruntime against PyTorch; int8 with ONNX Runtime's
own quantization tools; the artefact run as a model (:class:`OrtModel`) so it is evaluated, not assumed.

Optional extra: ``pip install "prunekit[onnx]"`` (``onnx``, ``onnxruntime``, ``onnxscript``; none of
them pulls torch).  :func:`export_onnx` calls ``torch.onnx.export`` (torch 2.13: the dynamo/
``torch.export`` based exporter, which needs ``onnxscript``) and then :func:`check_onnx` runs the
file with onnxruntime on the same inputs and compares every output with PyTorch's.

Inputs are given as a tensor, a tuple of tensors (positional) or a dict of tensors (keyword inputs,
e.g. a HF tokenizer's output; names become the ONNX input names).  HF models are wrapped so the
graph returns plain tensors (``logits`` / ``last_hidden_state``).

:func:`export` is the deployment entry point: fp32 export, verified against PyTorch on every output on
its own scale (relative ``rtol``, default 1e-4, else :class:`ExportError` and nothing is kept), then
optionally int8 by ``onnxruntime.quantization`` — ``int8="dynamic"`` (``quantize_dynamic``: int8 weights
per output channel, activations quantized at run time) or ``int8="static"`` (``quantize_static``, QDQ
format, per-channel int8 weights, activation ranges from a :class:`BatchReader` over calibration batches;
MinMax).  Both first run ``quant_pre_process`` (ONNX Runtime's symbolic shape inference + graph
optimisation, as its docs ask).  No hand-written graph passes.  HF Optimum is not used: its ONNX exporter
pins transformers < 5 (the installed transformers is 5.x), and ``torch.onnx`` + ``onnxruntime.quantization``
are what Optimum would call underneath.
"""
from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from prunekit.core.errors import ModelError
from prunekit.deploy.timing import call_model, interleaved_ms

__all__ = ["export_onnx", "check_onnx", "require_onnx", "OnnxCheck", "export", "ExportResult", "ExportError",
           "OrtModel", "BatchReader", "quantize_onnx", "INT8_MODES", "rel_errors", "ort_latency_ms"]

INT8_MODES = ("dynamic", "static")


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
    kwargs: dict[str, Any] = {"input_names": names, "dynamo": True, "external_data": False, "verbose": False}
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
    """onnxruntime vs PyTorch on one input: the worst absolute difference and, per output, the relative
    error ``max|ort − torch| / max|torch|`` (each output on its own scale)."""

    def __init__(self, max_abs_diff: float, worst_output: int, n_outputs: int, rel: Sequence[float] = ()):
        self.max_abs_diff, self.worst_output, self.n_outputs = max_abs_diff, worst_output, n_outputs
        self.rel = list(rel)

    @property
    def max_rel(self) -> float:
        return max(self.rel, default=0.0)

    def __repr__(self) -> str:
        return f"OnnxCheck(max_abs_diff={self.max_abs_diff:.3g}, max_rel={self.max_rel:.3g}, outputs={self.n_outputs})"


def rel_errors(got: Sequence[np.ndarray], ref: Sequence[np.ndarray]) -> list[float]:
    """Per output: ``max|got − ref| / max|ref|`` (an all-zero reference: the absolute difference)."""
    out = []
    for g, r in zip(got, ref):
        if r.size == 0:
            out.append(0.0)
            continue
        scale = float(np.abs(r).max())
        out.append(float(np.abs(g - r).max()) / (scale if scale > 0 else 1.0))
    return out


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
    refs = [r.detach().cpu().numpy() for r in ref]
    diffs = [float(np.abs(o - r).max()) if r.size else 0.0 for o, r in zip(ort_out, refs)]
    worst = int(np.argmax(diffs))
    return OnnxCheck(diffs[worst], worst, len(diffs), rel_errors(ort_out, refs))


# ----------------------------------------------------------------------------------- deployment export


class ExportError(ModelError):
    """The exported artefact does not reproduce the model (or cannot be made as asked); nothing is kept."""


class OrtOutput:
    """An ONNX Runtime result shaped like a HF ``ModelOutput``: ``.logits`` (the first output), ``to_tuple()``."""

    def __init__(self, outputs: Sequence[Tensor]):
        self.outputs = tuple(outputs)
        self.logits = self.outputs[0]

    def to_tuple(self) -> tuple[Tensor, ...]:
        return self.outputs

    def __getitem__(self, i: int) -> Tensor:
        return self.outputs[i]


class OrtModel(nn.Module):
    """An ONNX file run by ONNX Runtime (CPU) behind the model's own calling convention, so the task's own
    ``evaluate`` scores the artefact: positional tensors → a tensor (several outputs: a tuple); keyword
    tensors (a tokenizer's batch) → :class:`OrtOutput` with ``.logits``.  Keyword inputs the graph does not
    take (the exporter drops unused ones) are ignored; a missing one raises :class:`ExportError`.
    ``threads`` sets ONNX Runtime's intra-op threads and stops idle workers spinning (``None``: its defaults)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        super().__init__()
        _, ort = require_onnx()
        so = ort.SessionOptions()
        if threads is not None:
            so.intra_op_num_threads, so.inter_op_num_threads = int(threads), 1
            # idle worker threads sleep instead of spinning: timed beside other engines, a spinning pool
            # would steal their cores
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path, self.threads = str(path), threads
        self.session = ort.InferenceSession(self.path, so, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def feed(self, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        """The ``{input name: array}`` dict of one call."""
        if kwargs:
            missing = [n for n in self.input_names if n not in kwargs]
            if missing:
                raise ExportError(f"{self.path} needs inputs {self.input_names}; missing {missing}")
            return {n: _numpy(kwargs[n]) for n in self.input_names}
        if len(args) != len(self.input_names):
            raise ExportError(f"{self.path} takes {len(self.input_names)} inputs {self.input_names}, got {len(args)}")
        return {n: _numpy(a) for n, a in zip(self.input_names, args)}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        outs = [torch.from_numpy(o) for o in self.session.run(None, self.feed(*args, **kwargs))]
        if kwargs:
            return OrtOutput(outs)
        return outs[0] if len(outs) == 1 else tuple(outs)


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


class BatchReader:
    """An ONNX Runtime ``CalibrationDataReader`` over model-input batches (tensors, tuples or dicts of
    tensors, e.g. the run's own training batches with the labels dropped), mapped to the graph's input names."""

    def __init__(self, input_names: Sequence[str], batches: Sequence[Any]):
        self.input_names, self.batches, self._i = list(input_names), list(batches), 0
        if not self.batches:
            raise ExportError("static int8 calibration needs at least one batch")

    def _feed(self, b: Any) -> dict[str, np.ndarray]:
        if isinstance(b, Mapping):
            missing = [n for n in self.input_names if n not in b]
            if missing:
                raise ExportError(f"calibration batch lacks inputs {missing} (has {sorted(b)})")
            return {n: _numpy(b[n]) for n in self.input_names}
        seq = [b] if isinstance(b, Tensor) else list(b)
        return {n: _numpy(a) for n, a in zip(self.input_names, seq)}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= len(self.batches):
            return None
        self._i += 1
        return self._feed(self.batches[self._i - 1])

    def rewind(self) -> None:
        self._i = 0


def _pre_process(src: Path, dst: Path) -> None:
    """ONNX Runtime's ``quant_pre_process`` (symbolic shape inference + optimisation); without the
    symbolic shape inference where it cannot handle the graph."""
    from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: PLC0415

    src, dst = Path(src).resolve(), Path(dst).resolve()
    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="prunekit-quant-") as tmp:
        os.chdir(tmp)   # a failed symbolic shape inference saves its partial model into the working directory
        try:
            quant_pre_process(str(src), str(dst))
        except Exception:  # noqa: BLE001  (symbolic shape inference does not cover every exporter op)
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        finally:
            os.chdir(old)


def quantize_onnx(fp32_path: str | os.PathLike, out_path: str | os.PathLike, mode: str,
                  calibration: Sequence[Any] | None = None, *, per_channel: bool = True) -> Path:
    """int8 of an fp32 ONNX file with ``onnxruntime.quantization`` (module docstring): ``mode`` is
    ``"dynamic"`` or ``"static"`` (then ``calibration``: input batches for the :class:`BatchReader`)."""
    require_onnx()
    from onnxruntime.quantization import (  # noqa: PLC0415
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if mode not in INT8_MODES:
        raise ExportError(f"int8 mode must be one of {list(INT8_MODES)}, got {mode!r}")
    if mode == "static" and not calibration:
        raise ExportError("static int8 needs calibration batches (the run's own data)")
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    pre = out_path.with_name(out_path.stem + ".pre.onnx")
    try:
        _pre_process(fp32_path, pre)
        if mode == "dynamic":
            quantize_dynamic(str(pre), str(out_path), per_channel=per_channel, weight_type=QuantType.QInt8)
        else:
            names = [i.name for i in OrtModel(pre).session.get_inputs()]
            assert calibration is not None
            quantize_static(str(pre), str(out_path), BatchReader(names, calibration), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=["MatMul", "Gemm", "Conv"], calibrate_method=CalibrationMethod.MinMax)
    finally:
        pre.unlink(missing_ok=True)
    return out_path


class ExportResult:
    """What :func:`export` wrote: ``path`` (the artefact), ``fp32_path``, their sizes, the int8 mode and
    the checks against PyTorch on the example inputs (``fp32_check`` passed ``rtol``; ``check`` is the
    artefact's own, informational for int8)."""

    def __init__(self, path: Path, fp32_path: Path, int8: str | None, fp32_check: OnnxCheck, check: OnnxCheck):
        self.path, self.fp32_path, self.int8 = path, fp32_path, int8
        self.fp32_check, self.check = fp32_check, check
        self.bytes, self.fp32_bytes = path.stat().st_size, fp32_path.stat().st_size

    def as_dict(self) -> dict[str, Any]:
        return {"file": str(self.path), "bytes": self.bytes, "int8": self.int8, "fp32_file": str(self.fp32_path),
                "fp32_bytes": self.fp32_bytes, "fp32_max_rel_error": self.fp32_check.max_rel,
                "max_rel_error": self.check.max_rel}

    def __repr__(self) -> str:
        return f"ExportResult({self.path.name}, {self.bytes:,} bytes, int8={self.int8}, {self.check})"


def export(model: nn.Module, example_inputs: Tensor | Sequence[Tensor] | Mapping[str, Tensor],
           path: str | os.PathLike, *, int8: str | None = None, calibration: Sequence[Any] | None = None,
           rtol: float = 1e-4, per_channel: bool = True, opset: int | None = None) -> ExportResult:
    """Export ``model`` to ONNX at ``path`` for deployment (module docstring); returns :class:`ExportResult`.

    The fp32 graph (``path`` itself, or ``<stem>.fp32.onnx`` beside an int8 ``path``) must reproduce
    PyTorch on ``example_inputs`` within ``rtol`` relative on every output, else :class:`ExportError`
    (files removed).  ``int8``: ``None`` | ``"dynamic"`` | ``"static"`` (``calibration``: input batches)::

        res = prunekit.export(model, {"input_ids": ids, "attention_mask": am}, "out/model.onnx", int8="dynamic")
    """
    if int8 is not None and int8 not in INT8_MODES:
        raise ExportError(f"int8 must be None or one of {list(INT8_MODES)}, got {int8!r}")
    if int8 == "static" and not calibration:
        raise ExportError("int8='static' needs calibration= batches (e.g. a few training batches, labels dropped)")
    path = Path(path)
    fp32 = path if int8 is None else path.with_name(path.stem + ".fp32.onnx")
    export_onnx(model, example_inputs, fp32, opset=opset, check=False)
    fp32_check = check_onnx(fp32, model, example_inputs)
    if fp32_check.max_rel > rtol:
        fp32.unlink(missing_ok=True)
        worst = int(np.argmax(fp32_check.rel))
        raise ExportError(f"ONNX output {worst} differs from PyTorch by {fp32_check.rel[worst]:.3g} relative to its "
                          f"largest value (> rtol {rtol:g}); nothing was written")
    if int8 is None:
        return ExportResult(fp32, fp32, None, fp32_check, fp32_check)
    quantize_onnx(fp32, path, int8, calibration, per_channel=per_channel)
    return ExportResult(path, fp32, int8, fp32_check, check_onnx(path, model, example_inputs))


def ort_latency_ms(paths: Mapping[str, str | os.PathLike], inputs: Any, *, threads: int = 1, repeats: int = 20,
                   warmup: int = 3, torch_models: Mapping[str, nn.Module] | None = None) -> dict[str, float]:
    """Median ms per call of ONNX files (ONNX Runtime sessions with ``threads`` intra-op threads) and
    optionally PyTorch models on the same ``inputs``, interleaved by :func:`prunekit.deploy.timing.interleaved_ms`."""
    fns: dict[str, Any] = {}
    for k, p in paths.items():
        m = OrtModel(p, threads=threads)
        feed = m.feed(**inputs) if isinstance(inputs, Mapping) else m.feed(*_as_tuple(inputs))
        fns[k] = functools.partial(m.session.run, None, feed)
    for k, tm in (torch_models or {}).items():
        fns[k] = functools.partial(call_model, tm.eval(), inputs)
    return interleaved_ms(fns, repeats=repeats, warmup=warmup, threads=threads)


def _as_tuple(x: Any) -> tuple[Any, ...]:
    return (x,) if isinstance(x, Tensor) else tuple(x)
