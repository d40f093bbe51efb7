"""Pruning inside a Hugging Face ``Trainer``: :class:`PrunekitCallback` (needs ``transformers``).

::

    pruner = prunekit.Pruner(model, {"structure": "unstructured", "sparsity": 0.5,
                                     "targets": {"include": ["*encoder.layer.*"]}}, algorithm="gradual")
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[PrunekitCallback(pruner)])
    trainer.train()        # ends hard-pruned at the target sparsity, pruned weights exactly 0

The callback binds the Trainer's optimizer at ``on_train_begin`` (hard-prune re-masks after each of its
steps), sets the schedule length from ``state.max_steps``, adds the gradient of the algorithm's
weight-only extra loss (ADMM/SLR penalty, group lasso) before each optimizer step (after clipping — HF
clips first), calls ``pruner.step()`` after each step and ``pruner.epoch_end()`` after each epoch.
Algorithms without a search phase (``oneshot``) hard-prune at the start and the whole run retrains;
the others search for ``1 - retrain_fraction`` of the steps, then hard-prune and retrain for the rest
(``retrain_fraction=0``: hard-prune at the end).  Distillation needs the batch and outputs, which
callbacks do not see: use :meth:`prunekit.Pruner.loss` in ``Trainer.compute_loss`` for it.
"""
from __future__ import annotations

import torch
from transformers import TrainerCallback

from prunekit.training.device import device_of
from prunekit.training.pruner import Pruner

__all__ = ["PrunekitCallback"]


class PrunekitCallback(TrainerCallback):
    """Run a :class:`~prunekit.training.pruner.Pruner` inside ``transformers.Trainer`` (see module doc)."""

    def __init__(self, pruner: Pruner, retrain_fraction: float = 0.0):
        if not 0.0 <= retrain_fraction < 1.0:
            raise ValueError(f"retrain_fraction must be in [0, 1), got {retrain_fraction}")
        self.pruner, self.retrain_fraction = pruner, float(retrain_fraction)
        self._finalize_at: int | None = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        p = self.pruner
        p.set_optimizer(optimizer)
        if not p.ctx.total_steps:
            p.ctx.total_steps = int(state.max_steps)
            epochs = max(1, int(round(args.num_train_epochs))) if args.max_steps <= 0 else 1
            p.ctx.steps_per_epoch = max(1, int(state.max_steps) // epochs)
            if hasattr(p.algorithm, "begin"):
                p.algorithm.begin(p.ctx)          # schedules read total_steps at begin
        if not p.algorithm.has_search:
            p.finalize(optimizer)
        self._finalize_at = int(round((1.0 - self.retrain_fraction) * state.max_steps))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        p = self.pruner
        if p.finalized or not p.algorithm.has_search:
            return
        extra = p.algorithm.extra_loss(p.ctx, None, None)
        if extra is not None and extra.requires_grad:
            extra.backward()                      # its gradient joins the batch gradient (masked by the hooks)

    def on_step_end(self, args, state, control, **kwargs):
        p = self.pruner
        p.step()
        if not p.finalized and self._finalize_at is not None and 0 < self._finalize_at <= state.global_step \
                and self.retrain_fraction > 0:
            p.finalize()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.pruner.epoch_end()

    def on_train_end(self, args, state, control, **kwargs):
        p = self.pruner
        p.finalize()
        if p.masks is not None:
            with torch.no_grad():
                p.masks.to(device_of(p.model)).apply(p.model)
