"""Masks as data, keyed by parameter name, and hard-pruning.

:class:`MaskSet` holds one bool mask (True = kept) per pruned parameter, by its fully qualified name
(``"encoder.layer.0.attention.self.query.weight"``).  It holds no module references, so its
``state_dict()`` is plain tensors that safetensors can store.

Hard-prune (``attach``): the mask is applied

1. to the weight, immediately;
2. to the gradient, by a tensor hook, so the optimizer sees zero gradient for pruned weights;
3. to the weight again after *every* optimizer step, because SGD momentum, weight decay and Adam's
   moment estimates would otherwise move pruned weights off zero.  With an optimizer: after each of its
   steps (``Optimizer.register_step_post_hook``).  Without one: after each step of *any* torch optimizer
   that updates a masked parameter (``torch.optim.optimizer.register_optimizer_step_post_hook``) — an
   optimizer created later, or never shown to prunekit, cannot revive a pruned weight either;
4. to the optimizer's per-element state (momentum buffers, Adam's ``exp_avg`` / ``exp_avg_sq``, …): the
   pruned positions are zeroed when hard-pruning starts, whenever the masks change (:meth:`HardPrune.refresh`)
   and, without a bound optimizer, after the first step of every optimizer that updates a masked parameter.
   With zero gradient and zero state at a pruned position, no element-wise optimizer moves it.

The Parameters are never replaced (their identity is unchanged, so the user's optimizer stays valid) and
the forward pass is not hooked (an in-place re-mask inside the forward would break modules called twice
per forward, e.g. ALBERT's shared layers): the weights are exact after every optimizer step.  An update
that does not go through a ``torch.optim.Optimizer`` (a hand-written ``p -= lr * v``) is not seen; call
:meth:`HardPrune.reapply` (``Pruner.step()``) after it.

Masks only shrink: :meth:`MaskSet.update` ANDs a new mask with the current one.
"""
from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, ItemsView, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["MaskSet", "HardPrune", "clear_optimizer_state"]


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
        """Start hard-pruning ``model``: re-mask after each step of ``optimizer`` or, without one, after
        each step of any torch optimizer that updates a masked parameter (see :class:`HardPrune`)."""
        return HardPrune(self, model, optimizer)


@torch.no_grad()
def clear_optimizer_state(optimizer: torch.optim.Optimizer, multipliers: dict[int, Tensor]) -> int:
    """Zero ``optimizer``'s per-element state (every state tensor of the parameter's shape: SGD's
    ``momentum_buffer``, Adam's ``exp_avg`` / ``exp_avg_sq`` / ``max_exp_avg_sq``, RMSprop's ``square_avg``,
    …) at the pruned positions.  ``multipliers``: ``id(parameter)`` → its 0/1 mask in the parameter's dtype.
    Returns the number of state tensors changed."""
    n = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            mult = multipliers.get(id(p))
            if mult is None:
                continue
            for v in optimizer.state.get(p, {}).values():
                if isinstance(v, Tensor) and v.shape == mult.shape and v.is_floating_point():
                    v.mul_(mult.to(device=v.device, dtype=v.dtype))
                    n += 1
    return n


def _any_optimizer_step(ref: weakref.ReferenceType[HardPrune], optimizer: torch.optim.Optimizer,
                        *_: object) -> None:
    hp = ref()
    if hp is not None:
        hp.after_optimizer_step(optimizer)


class HardPrune:
    """Live hard-pruning of a model by a :class:`MaskSet` (use as a context manager or ``.detach()``).

    ``optimizer``: re-mask after each of its steps; ``None``: after each step of every torch optimizer that
    updates a masked parameter (module doc).  Keeps a per-parameter multiplier on the parameter's device
    and dtype, so the per-step cost is one fused ``mul_`` per pruned tensor for the gradient and one for
    the weight.
    """

    def __init__(self, masks: MaskSet, model: nn.Module, optimizer: torch.optim.Optimizer | None = None):
        self.masks = masks
        self.model = model
        self.optimizer = optimizer
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._params = masks.check_model(model)
        self._ids = {id(p) for p in self._params.values()}
        self._mult: dict[str, Tensor] = {}
        self._version = 0
        self._cleared: weakref.WeakKeyDictionary[torch.optim.Optimizer, int] = weakref.WeakKeyDictionary()
        self._steps_ours: weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple[int, bool]] = weakref.WeakKeyDictionary()
        self.refresh()
        for name, p in self._params.items():
            # in place on the accumulated .grad: no extra allocation per step
            self._handles.append(p.register_post_accumulate_grad_hook(self._grad_hook(name)))  # type: ignore[no-untyped-call]
        if optimizer is not None:
            self._handles.append(optimizer.register_step_post_hook(lambda *_: self.reapply()))
        else:
            handle = register_optimizer_step_post_hook(functools.partial(_any_optimizer_step, weakref.ref(self)))
            self._handles.append(handle)
            weakref.finalize(self, handle.remove)   # a dropped, never detached HardPrune leaves no global hook

    def _grad_hook(self, name: str) -> Callable[[Tensor], None]:
        def hook(p: Tensor) -> None:
            if p.grad is not None:
                p.grad.mul_(self._mult[name])
        return hook

    def refresh(self) -> None:
        """Re-read the masks (after they changed) and re-apply them to the weights and to the bound
        optimizer's state."""
        self._mult = {n: self.masks[n].to(device=p.device, dtype=p.dtype) for n, p in self._params.items()}
        self._version += 1
        self.reapply()
        if self.optimizer is not None:
            self.clear_state(self.optimizer)

    @torch.no_grad()
    def reapply(self) -> None:
        for n, p in self._params.items():
            p.mul_(self._mult[n])

    def clear_state(self, optimizer: torch.optim.Optimizer) -> int:
        """Zero ``optimizer``'s state at the pruned positions (:func:`clear_optimizer_state`)."""
        self._cleared[optimizer] = self._version
        return clear_optimizer_state(optimizer, {id(p): self._mult[n] for n, p in self._params.items()})

    def _updates_ours(self, optimizer: torch.optim.Optimizer) -> bool:
        groups = optimizer.param_groups
        cached = self._steps_ours.get(optimizer)
        if cached is not None and cached[0] == len(groups):
            return cached[1]
        ours = any(id(p) in self._ids for g in groups for p in g["params"])
        self._steps_ours[optimizer] = (len(groups), ours)
        return ours

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Any optimizer stepped (no bound optimizer): re-mask if it updates a masked parameter, and zero its
        state at the pruned positions once per mask version."""
        if not self._updates_ours(optimizer):
            return
        self.reapply()
        if self._cleared.get(optimizer) != self._version:
            self.clear_state(optimizer)

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> HardPrune:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()
