"""Trace a model to an ATen graph whose placeholders are named by ``state_dict()`` keys.

:func:`trace` uses ``torch.export.export(model, args, kwargs, strict=False)``; when that fails it falls
back to ``torch.fx.experimental.proxy_tensor.make_fx`` over ``torch.func.functional_call`` (the same
ATen-level graph, parameters and buffers as explicit inputs).  Both give every op with concrete shapes
in ``node.meta["val"]``.  A model neither can trace raises :class:`TraceError` with both reasons.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.experimental.proxy_tensor import make_fx

from prunekit.core.errors import ModelError
from prunekit.core.inputs import split_inputs

__all__ = ["TraceError", "Traced", "trace", "call_model", "normalize_inputs"]


class TraceError(ModelError, RuntimeError):
    """The model could not be traced (neither ``torch.export`` nor ``make_fx``)."""


@dataclass
class Traced:
    """An ATen graph plus the map placeholder name → ``state_dict`` key (parameters and buffers)."""

    graph: fx.Graph
    tensors: dict[str, str]              # placeholder node name -> state_dict key
    user_inputs: list[fx.Node]
    method: str
    params: set[str] = field(default_factory=set)   # state_dict keys that are parameters

    def module_of(self, node: fx.Node) -> str:
        """The innermost module path the node was called in (``""`` = the root)."""
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return ""
        path = list(stack.values())[-1][0]
        return _clean_path(path)


def _clean_path(path: str) -> str:
    # export writes "L['self'].layer1[0].conv1" style paths in some versions, dotted ones in others
    path = path.replace("L['self'].", "").replace("L['self']", "")
    out = []
    for part in path.replace("[", ".").replace("]", "").split("."):
        if part:
            out.append(part.strip("'\""))
    return ".".join(out)


def normalize_inputs(model: nn.Module, example_inputs: Any) -> tuple[tuple, dict]:
    """``example_inputs`` (tensor, tuple, or dict of keyword arguments) → ``(args, kwargs)``.

    Hugging Face models with ``config.use_cache`` get ``use_cache=False`` (a cache object is not a
    traceable output and is irrelevant to pruning)."""
    args, kwargs = split_inputs(example_inputs)
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "use_cache", False) and "use_cache" not in kwargs:
        kwargs["use_cache"] = False
    return args, kwargs


@torch.no_grad()
def call_model(model: nn.Module, example_inputs: Any) -> Any:
    """Run ``model`` on ``example_inputs`` the way :func:`trace` does."""
    args, kwargs = normalize_inputs(model, example_inputs)
    return model(*args, **kwargs)


def _export(model: nn.Module, args: tuple, kwargs: dict) -> Traced:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, args, kwargs, strict=False)
    sig = ep.graph_signature
    tensors = dict(sig.inputs_to_parameters)
    tensors.update(sig.inputs_to_buffers)
    user = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in sig.user_inputs]
    return Traced(ep.graph, tensors, user, "torch.export", set(sig.inputs_to_parameters.values()))


def _make_fx(model: nn.Module, args: tuple, kwargs: dict) -> Traced:
    names = list(dict(model.named_parameters()).keys()) + list(dict(model.named_buffers()).keys())
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    tensors = [state[n] for n in names]

    def run(ts, a, kw):
        return torch.func.functional_call(model, dict(zip(names, ts)), a, kw)

    gm = make_fx(run, tracing_mode="fake", pre_dispatch=True)(tensors, args, kwargs)
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    mapping = {ph[i].name: names[i] for i in range(len(names))}
    return Traced(gm.graph, mapping, ph[len(names):], "make_fx",
                  set(dict(model.named_parameters()).keys()))


def trace(model: nn.Module, example_inputs: Any) -> Traced:
    """Trace ``model`` (in eval mode, on a copy of nothing: the graph only reads shapes)."""
    args, kwargs = normalize_inputs(model, example_inputs)
    was = model.training
    model.eval()
    errors = []
    try:
        for fn in (_export, _make_fx):
            try:
                return fn(model, args, kwargs)
            except Exception as e:  # noqa: BLE001 - report every tracer's reason
                errors.append(f"{fn.__name__.strip('_')}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    finally:
        model.train(was)
    raise TraceError(f"cannot trace {type(model).__name__}: " + " | ".join(errors))

