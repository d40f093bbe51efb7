"""Masks as data, keyed by parameter name, and hard-pruning.

:class:`MaskSet` holds one bool mask (True = kept) per pruned parameter, by its fully qualified name
(``"encoder.layer.0.attention.self.query.weight"``).  It holds no module references, so its
``state_dict()`` is plain tensors that safetensors can store.

Hard-prune (``attach``): the mask is applied

1. to the weight, immediately;
2. to the gradient, by a tensor hook, so the optimizer sees zero gradient for pruned weights;
3. to the weight again after *every* optimizer step (``Optimizer.register_step_post_hook``), because
   SGD momentum, weight decay and Adam's moment estimates would otherwise move pruned weights off zero.

Masks only shrink: :meth:`MaskSet.update` ANDs a new mask with the current one.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, ItemsView, Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["MaskSet", "HardPrune"]


class MaskSet:
    """Name → bool mask.  ``True`` = kept."""

    def __init__(self, masks: dict[str, Tensor] | None = None, structures: dict[str, str] | None = None):
        self._masks: dict[str, Tensor] = {}
        self.structures: dict[str, str] = dict(structures or {})
        for k, v in (masks or {}).items():
            self._masks[k] = v.detach().bool().clone()

    # -- mapping ----------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self._masks

    def __getitem__(self, name: str) -> Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def items(self) -> ItemsView[str, Tensor]:
        return self._masks.items()

    def names(self) -> list[str]:
        return list(self._masks)

    def set(self, name: str, mask: Tensor, structure: str | None = None) -> None:
        """Replace a mask (no AND).  Prefer :meth:`update` during pruning."""
        self._masks[name] = mask.detach().bool().clone()
        if structure is not None:
            self.structures[name] = str(structure)

    def update(self, name: str, mask: Tensor, structure: str | None = None) -> Tensor:
        """AND ``mask`` into the current mask (masks only shrink); returns the result."""
        mask = mask.detach().bool()
        if name in self._masks:
            old = self._masks[name]
            mask = mask.to(old.device)
            if old.shape != mask.shape:
                raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, existing {tuple(old.shape)}")
            mask = old & mask
        self.set(name, mask, structure)
        return self._masks[name]

    def to(self, device: torch.device | str) -> MaskSet:
        """Move every mask to ``device`` (in place; returns self)."""
        self._masks = {k: v.to(device) for k, v in self._masks.items()}
        return self

    def copy(self) -> MaskSet:
        return MaskSet({k: v.clone() for k, v in self._masks.items()}, self.structures)

    # -- statistics -------------------------------------------------------------------------
    def sparsity(self, name: str | None = None) -> float:
        """Fraction of masked-out entries, for one mask or over all of them."""
        ms = [self._masks[name]] if name else list(self._masks.values())
        total = sum(m.numel() for m in ms)
        if total == 0:
            return 0.0
        return 1.0 - sum(int(m.sum()) for m in ms) / total

    def nonzeros(self) -> int:
        return sum(int(m.sum()) for m in self._masks.values())

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"masks": {k: v.clone() for k, v in self._masks.items()}, "structures": dict(self.structures)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        masks = state["masks"]
        self._masks = {k: v.detach().bool().clone() for k, v in masks.items()}
        self.structures = dict(state.get("structures", {}))

    # -- application ------------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(model.named_parameters())
        out = {}
        for name, m in self._masks.items():
            if name not in params:
                close = [p for p in params if p.endswith(name.split(".")[-1])][:8]
                raise KeyError(f"mask for {name!r} has no parameter in the model; parameters like it: {close}")
            if params[name].shape != m.shape:
                raise ValueError(f"mask for {name!r} has shape {tuple(m.shape)} but the parameter is "
                                 f"{tuple(params[name].shape)}")
            out[name] = params[name]
        return out

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero the pruned weights in place (parameter identity unchanged)."""
        for name, p in self.check_model(model).items():
            p.mul_(self._masks[name].to(device=p.device, dtype=p.dtype))

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> HardPrune:
        """Start hard-pruning ``model`` (and re-mask after each step of ``optimizer``).

        Without ``optimizer`` only the weights (now) and the gradients are masked: momentum, weight decay
        and Adam's moments can then move pruned weights off zero — a warning says so."""
        if optimizer is None:
            warnings.warn("MaskSet.attach(model) without an optimizer: gradients are masked but optimizer state "
                          "(momentum, weight decay, Adam moments) can revive pruned weights; pass the optimizer "
                          "(masks.attach(model, optimizer)) to re-mask after every step", stacklevel=2)
        return HardPrune(self, model, optimizer)


class HardPrune:
    """Live hard-pruning of a model by a :class:`MaskSet` (use as a context manager or ``.detach()``).

    Keeps a per-parameter multiplier on the parameter's device and dtype, so the per-step cost is one
    fused ``mul_`` per pruned tensor for the gradient and one for the weight.
    """

    def __init__(self, masks: MaskSet, model: nn.Module, optimizer: torch.optim.Optimizer | None = None):
        self.masks = masks
        self.model = model
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._params = masks.check_model(model)
        self._mult: dict[str, Tensor] = {}
        self.refresh()
        for name, p in self._params.items():
            # in place on the accumulated .grad: no extra allocation per step
            self._handles.append(p.register_post_accumulate_grad_hook(self._grad_hook(name)))  # type: ignore[no-untyped-call]
        if optimizer is not None:
            self._handles.append(optimizer.register_step_post_hook(lambda *_: self.reapply()))

    def _grad_hook(self, name: str) -> Callable[[Tensor], None]:
        def hook(p: Tensor) -> None:
            if p.grad is not None:
                p.grad.mul_(self._mult[name])
        return hook

    def refresh(self) -> None:
        """Re-read the masks (after they changed) and re-apply them to the weights."""
        self._mult = {n: self.masks[n].to(device=p.device, dtype=p.dtype) for n, p in self._params.items()}
        self.reapply()

    @torch.no_grad()
    def reapply(self) -> None:
        for n, p in self._params.items():
            p.mul_(self._mult[n])

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> HardPrune:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()
