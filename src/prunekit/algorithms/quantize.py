"""Quantizing the kept weights: post-training round-to-nearest, quantization-aware retraining with a
straight-through estimator, and Deep Compression's weight sharing — all onto the one pruned-and-quantized
constraint set (:class:`prunekit.core.quant.ConstraintSet`).

* **Round-to-nearest** (:func:`quantize`): every target weight ← its projection; kept weights the grid sends
  to 0 leave the masks (counted as pruned).
* **Quantization-aware retraining** (:class:`QuantTrainer`, ``mode="ste"``; Courbariaux et al. 2015,
  Jacob et al. 2018): the model's weight is always the projection ``Q(W̃)`` of a latent float copy ``W̃``;
  the forward and backward run on ``Q(W̃)`` and the optimizer's update is applied to ``W̃`` (the
  straight-through estimator ∂Q/∂W̃ = 1): after each optimizer step ``W̃ += W − Q(W̃_old)``, ``W = Q(W̃)``.
  This works with any optimizer (SGD momentum, Adam) and under hard-prune masks (pruned weights stay 0).
* **Weight sharing** (``mode="share"``, ``cluster:K`` quantizers; Han et al., "Deep Compression", ICLR 2016):
  the codes (which centroid each kept weight uses) are fixed after a k-means with linear initialisation; the
  centroids are fine-tuned by their members' updates: ``C_k += reduce_{i ∈ k}(W_i − C_k)`` after each step,
  ``reduce = sum`` being the paper's "sum of the gradients of the members" (for plain SGD the update of a
  weight is −lr·g), ``mean`` (default) its per-member average, which keeps the step of a centroid the size
  of a weight's step under Adam.

At the end every quantized weight equals ``decode(codes)`` bit for bit (:meth:`QuantTrainer.codes`, checked
by :meth:`ConstraintSet.check`), and every pruned weight is 0.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.algorithms.hooks import Hook, TrainContext
from prunekit.core.errors import RecipeError
from prunekit.core.masks import MaskSet
from prunekit.core.quant import Cluster, ConstraintSet, QCodes, QuantSpec

__all__ = ["quantize", "QuantTrainer", "check_quantized", "as_quant_spec"]

MODES = ("ste", "share")


def as_quant_spec(spec: QuantSpec | str | Mapping[str, Any], targets: Any = None) -> QuantSpec:
    """A :class:`QuantSpec` from itself, a quantizer string, or a dict like a recipe's ``quant:`` section."""
    if isinstance(spec, QuantSpec):
        return spec
    if isinstance(spec, str):
        return QuantSpec(spec, targets=targets)
    d = dict(spec)
    return QuantSpec(d.pop("scheme"), dict(d.pop("overrides", {}) or {}), d.pop("targets", targets),
                     list(d.pop("schedule", []) or []), int(d.pop("polarize", 0)))


def _mask_of(masks: MaskSet | None, name: str, w: Tensor) -> Tensor:
    if masks is not None and name in masks:
        return masks[name].to(w.device)
    return torch.ones_like(w, dtype=torch.bool)


@torch.no_grad()
def quantize(model: nn.Module, spec: QuantSpec | str | Mapping[str, Any], masks: MaskSet | None = None,
             *, targets: Any = None) -> dict[str, QCodes]:
    """Post-training round-to-nearest onto the pruned-and-quantized set, in place.

    Every target weight (``spec``: a quantizer string like ``"int:4"``, a ``quant:`` dict or a
    :class:`QuantSpec`) becomes its projection; ``masks`` (if given) lose the kept weights the grid sends
    to 0 (a weight not in ``masks`` is added with its new mask).  Returns ``{name: QCodes}``; each weight
    equals ``decode`` of its codes bit for bit."""
    qs = as_quant_spec(spec, targets)
    params = dict(model.named_parameters())
    out: dict[str, QCodes] = {}
    for n, cs in qs.plan(model).items():
        p = params[n]
        qc = cs.encode(p, _mask_of(masks, n, p))
        p.copy_(cs.decode(qc))
        out[n] = qc
        if masks is not None:
            if n in masks:
                masks.update(n, qc.mask, masks.structures.get(n))
            else:
                masks.set(n, qc.mask, "unstructured")
    return out


def check_quantized(model: nn.Module, spec: QuantSpec, masks: MaskSet | None = None) -> dict[str, QCodes]:
    """Codes of every quantized weight, which must already lie in its constraint set (raises
    :class:`RecipeError` naming the weight otherwise): ``decode(codes) == weight`` bit for bit."""
    params = dict(model.named_parameters())
    out: dict[str, QCodes] = {}
    for n, cs in spec.plan(model).items():
        try:
            out[n] = cs.check(params[n].detach(), _mask_of(masks, n, params[n]))
        except RecipeError as e:
            raise RecipeError(f"{n}: {e}") from None
    return out


class QuantTrainer(Hook):
    """Quantization-aware retraining (``mode="ste"``) or weight sharing (``mode="share"``) as a loop hook;
    see the module docstring.  Use it in the retraining phase, after hard-pruning (``ctx.masks``)."""

    name = "quant"

    def __init__(self, spec: QuantSpec | str | Mapping[str, Any], mode: str = "ste", reduce: str = "mean",
                 targets: Any = None) -> None:
        if mode not in MODES:
            raise RecipeError(f"quant.method: {mode!r} is not one of {list(MODES)}")
        if reduce not in ("mean", "sum"):
            raise RecipeError(f"quant.reduce: {reduce!r} is not one of ['mean', 'sum']")
        self.spec, self.mode, self.reduce = as_quant_spec(spec, targets), mode, reduce
        self.plan: dict[str, ConstraintSet] = {}
        self.params: dict[str, nn.Parameter] = {}
        self.latent: dict[str, Tensor] = {}      # ste: the latent float weights W̃
        self.current: dict[str, QCodes] = {}     # the codes the weights equal now
        self.masks: MaskSet | None = None

    def begin(self, ctx: TrainContext) -> None:
        self.plan = self.spec.plan(ctx.model)
        if self.mode == "share":
            bad = [n for n, cs in self.plan.items() if not isinstance(cs.quantizer, Cluster)]
            if bad:
                raise RecipeError(f"quant.method share needs cluster:K quantizers; {bad[:5]} use others")
        params = dict(ctx.model.named_parameters())
        self.params = {n: params[n] for n in self.plan}
        self.masks = ctx.masks
        if not self.current:                  # fresh start (a resumed state brings its own)
            with torch.no_grad():
                for n, p in self.params.items():
                    self.latent[n] = p.detach().clone()
                    self.current[n] = self.plan[n].encode(p, _mask_of(ctx.masks, n, p))
        self._write()

    @torch.no_grad()
    def _write(self) -> None:
        for n, p in self.params.items():
            p.copy_(self.plan[n].decode(self.current[n]).to(p.device))

    @torch.no_grad()
    def after_step(self, ctx: TrainContext) -> None:
        for n, p in self.params.items():
            qc = self.current[n]
            delta = p.detach() - self.plan[n].decode(qc).to(p.device)
            mask = _mask_of(self.masks, n, p)
            if self.mode == "ste":
                self.latent[n] += delta
                self.current[n] = self.plan[n].encode(self.latent[n], mask)
            else:
                cb = qc.params["codebook"]
                idx = qc.codes[qc.mask]
                d = torch.zeros_like(cb).index_add_(0, idx, delta[qc.mask].float())
                if self.reduce == "mean":
                    d = d / torch.zeros_like(cb).index_add_(0, idx, torch.ones_like(idx, dtype=cb.dtype)).clamp(min=1)
                qc.params["codebook"] = cb + d
        self._write()

    def codes(self) -> dict[str, QCodes]:
        """The codes every quantized weight equals now (bit for bit)."""
        return dict(self.current)

    def state_dict(self) -> dict[str, Any]:
        return {"latent": {n: t.clone() for n, t in self.latent.items()},
                "codes": {n: q.codes.clone() for n, q in self.current.items()},
                "mask": {n: q.mask.clone() for n, q in self.current.items()},
                "params": {n: {k: v.clone() for k, v in q.params.items()} for n, q in self.current.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.latent = {n: t.clone() for n, t in state["latent"].items()}
        self.current = {}
        for n, c in state["codes"].items():
            q = self.plan[n].quantizer if n in self.plan else self.spec.layer_plan([n])[n].quantizer
            self.current[n] = QCodes(c.clone(), state["mask"][n].clone(),
                                     {k: v.clone() for k, v in state["params"][n].items()}, str(q), q.bits)
        if self.params:
            self._write()
