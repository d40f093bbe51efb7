"""Coupled groups from the model's own graph (``torch.export``), and MACs from the same trace.

Entry points:

* :func:`coupled_groups` ``(model, example_inputs) -> list[CoupledGroup]`` — heads, KV groups,
  neurons and channels, each with ``removable`` and a ``reason`` when not;
* :func:`analyze_model` — the trace plus the related dimension spaces (for tools);
* :func:`macs` ``(model, example_inputs) -> dict`` — multiply-accumulates of Linear/Conv/Conv1D and
  attention matmuls, counted from the traced ops' real shapes.

Imports only ``torch`` and :mod:`prunekit.core`.
"""
from __future__ import annotations

import math
from typing import Any

from torch import nn

from ..core.groups import CoupledGroup
from .analyze import Analysis, op_name
from .groups import build_groups
from .rules import analyze
from .trace import Traced, TraceError, call_model, normalize_inputs, trace

__all__ = ["coupled_groups", "analyze_model", "macs", "macs_of", "TraceError", "Traced", "trace",
           "call_model", "normalize_inputs", "Analysis"]


def analyze_model(model: nn.Module, example_inputs: Any) -> Analysis:
    """Trace ``model`` on ``example_inputs`` and relate all its dimensions."""
    return analyze(trace(model, example_inputs))


def coupled_groups(model: nn.Module, example_inputs: Any, kinds: tuple[str, ...] | None = None,
                   analysis: Analysis | None = None) -> list[CoupledGroup]:
    """The coupled groups of ``model`` (optionally only ``kinds``), found from its traced graph."""
    a = analysis if analysis is not None else analyze_model(model, example_inputs)
    groups = build_groups(a)
    return [g for g in groups if kinds is None or g.kind in kinds]


def _shape(n: Any) -> list[int]:
    return [int(s) for s in n.meta["val"].shape]


def _node_macs(node) -> int:
    name = op_name(node)
    if name in ("linear",):
        x, w = _shape(node.args[0]), _shape(node.args[1])
        return math.prod(x[:-1]) * w[0] * w[1]
    if name in ("addmm", "mm", "bmm", "matmul"):
        x, y = (_shape(v) for v in (node.args[1:3] if name == "addmm" else node.args[:2]))
        out = _shape(node)
        return math.prod(out) * x[-1]
    if name in ("conv1d", "conv2d", "conv3d", "convolution", "_convolution"):
        w, out = _shape(node.args[1]), _shape(node)
        return math.prod(out) * math.prod(w[1:])
    if name == "scaled_dot_product_attention":
        q, k, v = (_shape(t) for t in node.args[:3])
        return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])
    return 0


def macs_of(traced: Traced) -> dict[str, int]:
    """MACs per op kind and in total for a traced graph."""
    out: dict[str, int] = {}
    for node in traced.graph.nodes:
        if node.op == "call_function":
            m = _node_macs(node)
            if m:
                out[op_name(node)] = out.get(op_name(node), 0) + m
    out["total"] = sum(out.values())
    return out


def macs(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """Multiply-accumulates of ``model`` on ``example_inputs`` (``total`` + per op kind), from its trace."""
    return macs_of(trace(model, example_inputs))
