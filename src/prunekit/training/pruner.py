"""Pruning inside your own training loop.

:class:`Pruner` drives any algorithm through the same hooks ``prunekit run``'s loop calls, so a
hand-written loop reproduces it (same masks, same weights for the same seed and data order)::

    pruner = Pruner(model, spec, optimizer, algorithm="admm", params={"rho": 1e-3},
                    total_steps=epochs * len(loader), steps_per_epoch=len(loader))
    for epoch in range(epochs):                      # the algorithm's phase (none for oneshot)
        for x, y in loader:
            out = model(x)
            loss = pruner.loss(F.cross_entropy(out, y), (x, y), out)   # + ADMM/SLR/lasso/distillation terms
            optimizer.zero_grad(); loss.backward(); optimizer.step()
            pruner.step()                            # re-mask, schedules, multipliers
        pruner.epoch_end()                           # ADMM Z/U updates at epoch ends
    masks = pruner.finalize(new_optimizer)           # hard-prune; masks stay attached for retraining
    ... retrain with the same loop (pruner.loss / pruner.step keep pruned weights at exactly 0) ...
    pruner.detach()

Masks are exact in every loop.  Hard-pruning masks the gradients (after every backward, so also every
micro-batch of gradient accumulation) and re-masks the weights after every step of *any* torch optimizer
that updates a masked parameter (the one given here or to :meth:`finalize` / :meth:`set_optimizer`, or
one never shown to the Pruner), and zeroes that optimizer's momentum / Adam moments at the pruned
positions; the Parameters stay the same objects, so your optimizer stays valid.  Hence the order of
``pruner.step()`` and ``optimizer.step()`` does not matter for exactness.  Call ``pruner.step()`` once per
*optimizer* step (not per micro-batch when accumulating gradients): it advances the schedules
(``total_steps`` / ``steps_per_epoch`` count optimizer steps) and the multipliers.

Post-training algorithms (``sparsegpt``, ``wanda``, ``obs_structured``) have no search phase:
``Pruner(model, spec, algorithm="sparsegpt", calibration_data=train_loader, calibration={"samples": 128})``
then ``finalize()`` prunes (and updates) the weights from those calibration batches.

Joint pruning + quantization: ``quant="int:4"`` (or a ``quant:`` dict / :class:`~prunekit.core.quant.QuantSpec`)
makes an ADMM algorithm's Z-step project onto "pruned and quantized" during the search, and :meth:`finalize`
then retrains quantization-aware (``quant_method="qat"``: straight-through estimator; ``"share"``: Deep
Compression weight sharing) or rounds to nearest at once (``"rtn"``); :meth:`quantized` returns the codes
every quantized weight equals, bit for bit.

Targets: a spec whose targets are the default ``["*"]`` on a Hugging Face model prunes the matrices of its
repeated blocks only — embeddings and the LM head stay dense unless named (as ``prunekit run`` does).

Distillation: pass ``teacher=`` (a model; a frozen copy is kept) and optionally ``distill={alpha, temperature,
stages}``; its term is added by :meth:`loss` in the stages it is configured for.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.algorithms import get_algorithm_class
from prunekit.algorithms.calibration import CalibrationConfig, PostTraining
from prunekit.algorithms.distill import DistillConfig, Distiller
from prunekit.algorithms.hooks import Hook, TrainContext
from prunekit.algorithms.quantize import QuantTrainer, as_quant_spec, check_quantized, quantize
from prunekit.core.errors import RecipeError
from prunekit.core.masks import HardPrune, MaskSet
from prunekit.core.plan import PruneSpec, target_plan
from prunekit.core.quant import QCodes, QuantSpec
from prunekit.core.targets import TargetSpec
from prunekit.training.device import device_of, to_device

__all__ = ["Pruner", "as_prune_spec", "inner_optimizer"]


def as_prune_spec(spec: PruneSpec | dict) -> PruneSpec:
    """A :class:`PruneSpec` from itself or a dict like a recipe's ``prune:`` section."""
    if isinstance(spec, PruneSpec):
        return spec
    if not isinstance(spec, dict):
        raise RecipeError(f"prune spec: expected a PruneSpec, a recipe or a dict like a recipe's prune: section; "
                          f"got {type(spec).__name__}")
    d = dict(spec)
    valid = {f.name for f in dataclasses.fields(PruneSpec)}
    bad = sorted(set(map(str, d)) - valid)
    if bad:
        raise RecipeError(f"prune spec: unknown keys {bad}; valid: {', '.join(sorted(valid))}")
    targets = TargetSpec.of(d.pop("targets", None))
    return PruneSpec(d.pop("structure", "unstructured"), float(d.pop("sparsity", 0.5)), d.pop("score", "l2"),
                     d.pop("scope", "layer"), targets, dict(d.pop("overrides", {}) or {}), **d)


def inner_optimizer(opt):
    """The torch optimizer inside wrappers (``accelerate``'s ``AcceleratedOptimizer`` has ``.optimizer``)."""
    while opt is not None and not type(opt).__module__.startswith("torch.optim") and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


class Pruner:
    """An algorithm's hooks for a user's loop (see the module doc)."""

    def __init__(self, model: nn.Module, spec: PruneSpec | dict, optimizer: torch.optim.Optimizer | None = None, *,
                 algorithm: str = "oneshot", params: Any = None, teacher: nn.Module | None = None,
                 distill: dict | DistillConfig | None = None, task: Any = None, total_steps: int = 0,
                 steps_per_epoch: int = 0, calibration_data: Any = None,
                 calibration: CalibrationConfig | dict | None = None,
                 quant: QuantSpec | str | dict | None = None, quant_method: str = "qat", quant_reduce: str = "mean"):
        self.model, self.spec = model, as_prune_spec(spec)
        target_plan(model, self.spec)        # targets/overrides that match nothing fail here, not at finalize()
        self.quant = as_quant_spec(quant, self.spec.targets) if quant is not None else None
        self.quant_method = quant_method
        if quant_method not in ("qat", "share", "rtn"):
            raise ValueError(f"quant_method: {quant_method!r} is not one of ['qat', 'share', 'rtn']")
        self.quant_hook: QuantTrainer | None = None
        if self.quant is not None:
            self.quant_hook = None if quant_method == "rtn" else QuantTrainer(
                self.quant, "ste" if quant_method == "qat" else "share", quant_reduce)
        cls = get_algorithm_class(algorithm)
        if params is None or isinstance(params, dict):
            params = cls.Params(**(params or {}))
        self.algorithm = cls(params, self.spec)
        if self.quant is not None and hasattr(self.algorithm, "quant"):   # ADMM family: joint Z-step
            self.algorithm.quant = self.quant
        if isinstance(self.algorithm, PostTraining):   # sparsegpt, wanda, obs_structured; ignored by the others
            if calibration_data is not None:
                self.algorithm.calibration_loader = calibration_data
            if calibration is not None:
                self.algorithm.calibration = (calibration if isinstance(calibration, CalibrationConfig)
                                              else CalibrationConfig(**calibration))
        self.distiller = Distiller(teacher, task, distill) if teacher is not None else None
        if self.distiller is not None:
            self.distiller.teacher.to(device_of(model))
        self.masks: MaskSet | None = None
        self.hard_prune: HardPrune | None = None
        self.finalized = False
        self.ctx = TrainContext(model, optimizer, None, None, task, total_steps=int(total_steps),
                                steps_per_epoch=int(steps_per_epoch), phase=self.algorithm.name)
        search = self.algorithm.masks_during_search(model) if self.algorithm.has_search else None
        self._attach(search, optimizer)
        for h in self.hooks:
            h.begin(self.ctx)

    @property
    def hooks(self) -> list[Hook]:
        algo = [] if self.finalized or not self.algorithm.has_search else [self.algorithm]
        quant: list[Hook] = [self.quant_hook] if self.finalized and self.quant_hook is not None else []
        return [*algo, *([self.distiller] if self.distiller is not None else []), *quant]

    def _attach(self, masks: MaskSet | None, optimizer) -> None:
        if self.hard_prune is not None:
            self.hard_prune.detach()
            self.hard_prune = None
        opt = inner_optimizer(optimizer)
        if masks is not None and len(masks):
            masks.to(device_of(self.model))
            # re-masks after every step of any torch optimizer that updates a masked parameter (the given one
            # or any other: a retraining optimizer made later needs no call), weights and gradients now
            self.hard_prune = HardPrune(masks, self.model)
            if opt is not None:
                self.hard_prune.clear_state(opt)              # its momentum / Adam moments at pruned positions
        self.masks = masks
        self.ctx.optimizer, self.ctx.masks, self.ctx.hard_prune = optimizer, masks, self.hard_prune

    def set_optimizer(self, optimizer) -> None:
        """Use (another) optimizer: its state is zeroed at the pruned positions now (re-masking follows the
        steps of every optimizer that updates a masked parameter anyway)."""
        self._attach(self.masks, optimizer)

    # -- the calls of a training loop ---------------------------------------------------------------
    def loss(self, batch_loss: Tensor, batch: Any = None, outputs: Any = None) -> Tensor:
        """``batch_loss`` plus the algorithm's extra terms (ADMM/SLR penalty, group lasso, distillation)."""
        loss = batch_loss
        for h in self.hooks:
            extra = h.extra_loss(self.ctx, batch, outputs)
            if extra is not None:
                loss = loss + extra
        return loss

    def step(self) -> None:
        """Once per optimizer step (before or after ``optimizer.step()``; once per accumulated batch when
        accumulating gradients): re-mask, advance schedules / multipliers."""
        if self.hard_prune is not None:
            self.hard_prune.reapply()      # idempotent; also covers optimizers whose step hooks do not fire
        self.ctx.step += 1
        for h in self.hooks:
            h.after_step(self.ctx)

    def epoch_end(self) -> None:
        self.ctx.epoch += 1
        for h in self.hooks:
            h.epoch_end(self.ctx)

    # -- the end of the algorithm's phase -------------------------------------------------------------
    def final_masks(self) -> MaskSet:
        """The hard-prune masks the algorithm chooses now (weights untouched); after :meth:`finalize`, its masks."""
        if self.finalized:
            assert self.masks is not None, "finalize() sets the masks"
            return self.masks
        return self.algorithm.final_masks(self.model)

    def finalize(self, optimizer: torch.optim.Optimizer | None = None) -> MaskSet:
        """Hard-prune: zero the pruned weights and keep the masks attached (weights, gradients, and after
        every step of any optimizer that updates a masked parameter) for retraining; the state (momentum,
        Adam moments) of ``optimizer`` — default: the current one — is zeroed at the pruned positions now,
        that of any other optimizer after its first step.  Returns the masks."""
        if self.finalized:
            if optimizer is not None:
                self.set_optimizer(optimizer)
            assert self.masks is not None, "finalize() sets the masks"
            return self.masks
        masks = self.algorithm.final_masks(self.model)
        masks.apply(self.model)
        self.finalized = True
        self._attach(masks, optimizer if optimizer is not None else self.ctx.optimizer)
        self.ctx.step, self.ctx.epoch, self.ctx.phase = 0, 0, "retrain"
        if self.distiller is not None:
            self.distiller.set_stage("retrain")
        if self.quant is not None and self.quant_hook is None:
            quantize(self.model, self.quant, masks)           # round-to-nearest now
        elif self.quant_hook is not None:
            self.quant_hook.begin(self.ctx)                   # the weights go onto the grid now
        return masks

    def quantized(self) -> dict[str, QCodes]:
        """Codes of every quantized weight (each weight equals ``decode`` of its codes bit for bit; raises if
        one is off its grid); the masks lose the kept weights the grid sent to 0."""
        if self.quant is None:
            raise ValueError("this Pruner has no quant=")
        if self.masks is not None:
            quantize(self.model, self.quant, self.masks)   # idempotent on weights already on the grid
        return check_quantized(self.model, self.quant, self.masks)

    def detach(self) -> None:
        """Stop hard-pruning (the weights stay as they are)."""
        if self.hard_prune is not None:
            self.hard_prune.detach()
            self.hard_prune = None

    def sparsity(self) -> float:
        return self.masks.sparsity() if self.masks is not None else 0.0

    def state_dict(self) -> dict:
        return {"algorithm": self.algorithm.state_dict(), "masks": self.masks.state_dict() if self.masks else None,
                "step": self.ctx.step, "epoch": self.ctx.epoch, "finalized": self.finalized}

    def load_state_dict(self, state: dict) -> None:
        self.algorithm.load_state_dict(to_device(state["algorithm"], device_of(self.model)))
        self.ctx.step, self.ctx.epoch, self.finalized = int(state["step"]), int(state["epoch"]), bool(state["finalized"])
        if state.get("masks") is not None:
            ms = MaskSet()
            ms.load_state_dict(state["masks"])
            self._attach(ms, self.ctx.optimizer)
