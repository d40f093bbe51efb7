"""The one training loop.

``fit`` trains a model for a (possibly fractional) number of epochs with a progress bar, evaluates every
``eval_every`` epochs, and calls the algorithm hooks at fixed points:

* ``hook.extra_loss(ctx, batch, outputs) -> Tensor | None`` — added to the task loss (ADMM, SLR,
  group lasso, distillation);
* ``hook.after_step(ctx)`` — after the optimizer step and the hard-prune re-masking (gradual schedules,
  multiplier updates);
* ``hook.epoch_end(ctx)`` — after each epoch (ADMM Z/U updates).

A task object owns the loss and the metric (``ClassificationTask`` here, the GLUE task in
:mod:`prunekit.nlp`): ``task.step(model, batch) -> (loss, outputs)``, ``task.evaluate(model, loader) ->
dict`` and ``task.metric`` (the key to maximise).
"""
from __future__ import annotations

import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import TrainConfig
from .masks import HardPrune, MaskSet

__all__ = ["seed_everything", "ClassificationTask", "TrainContext", "Hook", "fit", "make_optimizer",
           "make_scheduler", "NonFiniteLoss"]


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or inf; training stopped and the last good checkpoint is kept."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _progress_disabled() -> bool:
    return os.environ.get("PRUNEKIT_NO_PROGRESS") == "1" or not sys.stderr.isatty()


class ClassificationTask:
    """Cross-entropy classification on ``(inputs, labels)`` batches; metric: accuracy (%)."""

    metric = "accuracy"

    def step(self, model: nn.Module, batch) -> tuple[Tensor, Tensor]:
        x, y = batch
        out = model(x)
        return nn.functional.cross_entropy(out, y), out

    def batch_size(self, batch) -> int:
        return len(batch[1])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader) -> dict[str, float]:
        was = model.training
        model.eval()
        correct = total = 0
        loss = 0.0
        for x, y in loader:
            out = model(x)
            loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            total += len(y)
        model.train(was)
        return {"accuracy": 100.0 * correct / max(total, 1), "loss": loss / max(total, 1), "examples": total}

    def logits(self, outputs) -> Tensor:
        return outputs


@dataclass
class TrainContext:
    """What hooks see.  ``hard_prune`` is live when masks are attached (call ``.refresh()`` after
    changing ``masks``)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    masks: MaskSet | None
    hard_prune: HardPrune | None
    task: Any
    step: int = 0                 # optimizer steps done in this phase
    epoch: int = 0                # epochs done in this phase
    total_steps: int = 0
    steps_per_epoch: int = 0
    phase: str = ""
    state: dict = field(default_factory=dict)


class Hook:
    """Base algorithm hook: every method optional."""

    def begin(self, ctx: TrainContext) -> None: ...

    def extra_loss(self, ctx: TrainContext, batch, outputs) -> Tensor | None:
        return None

    def after_step(self, ctx: TrainContext) -> None: ...

    def epoch_end(self, ctx: TrainContext) -> None: ...


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(opt, cfg: TrainConfig, total_steps: int):
    warm = int(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total_steps - warm)
        if cfg.scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        if cfg.scheduler == "linear":
            return max(0.0, 1.0 - t)
        if cfg.scheduler == "step":
            return 0.1 ** int(3 * min(t, 0.999))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def fit(model: nn.Module, task, train_loader: Iterable, eval_loader: Iterable | None, cfg: TrainConfig, *,
        hooks: list[Hook] = (), masks: MaskSet | None = None, desc: str = "train",
        on_epoch_end: Callable[[TrainContext, dict], None] | None = None,
        restore_best: bool = False) -> dict:
    """Train ``model`` per ``cfg``; returns ``{"history": [...], "best": metrics, "steps": n, "seconds": s}``.

    With ``masks``, training is hard-pruned (weights, gradients, and weights after each step).
    With ``cfg.patience``, training stops when the metric has not improved for that many evaluations;
    with ``restore_best`` the best evaluated weights are restored at the end."""
    steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    total = int(math.ceil(cfg.epochs * steps_per_epoch))
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, total)
    hp = masks.attach(model, opt) if masks is not None and len(masks) else None
    ctx = TrainContext(model, opt, masks, hp, task, total_steps=total, steps_per_epoch=steps_per_epoch, phase=desc)
    for h in hooks:
        h.begin(ctx)
    history: list[dict] = []
    best: dict | None = None
    best_state = None
    bad_evals = 0
    t0 = time.perf_counter()
    n_epochs = int(math.ceil(cfg.epochs)) if total else 0
    bar = tqdm(total=total, desc=desc, disable=_progress_disabled(), dynamic_ncols=True, leave=False)
    try:
        model.train()
        for epoch in range(n_epochs):
            for batch in train_loader:
                if ctx.step >= total:
                    break
                loss, outputs = task.step(model, batch)
                for h in hooks:
                    extra = h.extra_loss(ctx, batch, outputs)
                    if extra is not None:
                        loss = loss + extra
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(f"{desc}: loss is {float(loss)} at step {ctx.step} (epoch {epoch}); "
                                        "lower the learning rate or the penalty; the last good checkpoint is kept")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()   # hard-prune re-masks here via the optimizer's post-step hook
                sched.step()
                ctx.step += 1
                for h in hooks:
                    h.after_step(ctx)
                bar.update(1)
                if ctx.step % 20 == 0:
                    bar.set_postfix(loss=f"{loss.item():.4f}")
            ctx.epoch = epoch + 1
            for h in hooks:
                h.epoch_end(ctx)
            last = ctx.epoch == n_epochs
            metrics: dict = {}
            if eval_loader is not None and (ctx.epoch % cfg.eval_every == 0 or last):
                metrics = task.evaluate(model, eval_loader)
                metrics["epoch"] = ctx.epoch
                history.append(metrics)
                score = metrics[task.metric]
                if best is None or score > best[task.metric]:
                    best, bad_evals = dict(metrics), 0
                    if restore_best:
                        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    bad_evals += 1
                bar.write(f"[{desc}] epoch {ctx.epoch}: " + ", ".join(
                    f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))) if not _progress_disabled() else None
            if on_epoch_end is not None:
                on_epoch_end(ctx, metrics)
            if cfg.patience and bad_evals >= cfg.patience:
                break
    finally:
        bar.close()
        if hp is not None:
            hp.detach()
    if restore_best and best_state is not None:
        model.load_state_dict(best_state)
        if masks is not None and len(masks):
            masks.apply(model)
    return {"history": history, "best": best, "steps": ctx.step, "seconds": time.perf_counter() - t0}
