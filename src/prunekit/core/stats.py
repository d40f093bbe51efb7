"""Numbers about a pruned model: per-layer table, sparsity, compression rate, parameters, FLOPs.

Glossary (used everywhere in prunekit):

* ``sparsity`` = fraction of weights that are zero;
* ``compression rate`` = dense parameter count / nonzero parameter count (whole model, every parameter);
* FLOPs = multiply-accumulates × 2 of Linear/Conv layers for one input; ``nonzero_flops`` counts only
  the MACs with a nonzero weight (what a sparse kernel could skip).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from prunekit.core.inputs import call_model
from prunekit.core.masks import MaskSet
from prunekit.core.targets import linear_types

__all__ = ["LayerRow", "layer_table", "model_summary", "count_flops"]


@dataclass
class LayerRow:
    name: str
    shape: list[int]
    structure: str
    sparsity: float
    nonzeros: int
    numel: int


def layer_table(model: nn.Module, masks: MaskSet | None = None, names: list[str] | None = None) -> list[LayerRow]:
    """One row per targeted weight (masks' names, or ``names``); sparsity measured on the weight itself."""
    params = dict(model.named_parameters())
    names = names if names is not None else (masks.names() if masks is not None else [])
    rows = []
    for n in names:
        w = params[n].detach()
        nz = int(torch.count_nonzero(w))
        st = (masks.structures.get(n) if masks is not None else None) or "dense"
        rows.append(LayerRow(n, list(w.shape), st, 1.0 - nz / w.numel(), nz, w.numel()))
    return rows


@torch.no_grad()
def count_flops(model: nn.Module, example_input: Any) -> dict[str, int]:
    """Dense and nonzero FLOPs (2×MACs) of every Linear/HF Conv1D/Conv for ``example_input`` (a tensor, tuple or dict)."""
    dense, nonzero = [0], [0]

    def hook(mod: nn.Module, inp: Any, out: Tensor) -> None:
        w = cast(Tensor, mod.weight)
        if isinstance(mod, linear):
            positions = out.numel() // out.shape[-1]
            macs = positions * w.numel()
            nz = positions * int(torch.count_nonzero(w))
        else:  # conv: every output position uses in/groups*k*k weights of its filter
            positions = out.numel() // out.shape[1]
            macs = positions * w.numel()
            nz = positions * int(torch.count_nonzero(w))
        dense[0] += 2 * macs
        nonzero[0] += 2 * nz

    linear = linear_types()
    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (*linear, nn.Conv1d, nn.Conv2d))]
    was = model.training
    model.eval()
    try:
        call_model(model, example_input)
    finally:
        model.train(was)
        for h in hs:
            h.remove()
    return {"flops": dense[0], "nonzero_flops": nonzero[0]}


def model_summary(model: nn.Module, masks: MaskSet | None = None, example_input: Any = None) -> dict[str, Any]:
    """The headline numbers: targeted sparsity, whole-model compression rate, params, FLOPs, layers."""
    rows = layer_table(model, masks)
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    t_numel = sum(r.numel for r in rows)
    t_nz = sum(r.nonzeros for r in rows)
    out = {
        "sparsity": (1.0 - t_nz / t_numel) if t_numel else 0.0,
        "compression_rate": total / max(nonzero, 1),
        "params": total,
        "nonzero_params": nonzero,
        "targeted_params": t_numel,
        "targeted_nonzeros": t_nz,
        "targeted_compression_rate": t_numel / max(t_nz, 1) if t_numel else 1.0,
        "layers": [asdict(r) for r in rows],
    }
    if example_input is not None:
        fl = count_flops(model, example_input)
        out.update(fl)
        out["flop_reduction"] = fl["flops"] / max(fl["nonzero_flops"], 1)
    return out


