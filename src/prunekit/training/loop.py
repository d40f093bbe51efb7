"""The one training loop.

``fit`` trains a model for a (possibly fractional) number of epochs with a progress bar, evaluates every
``eval_every`` epochs, and calls the algorithm hooks at fixed points:

* ``hook.extra_loss(ctx, batch, outputs) -> Tensor | None`` — added to the task loss (ADMM, SLR,
  group lasso, distillation);
* ``hook.after_step(ctx)`` — after the optimizer step and the hard-prune re-masking (gradual schedules,
  multiplier updates);
* ``hook.epoch_end(ctx)`` — after each epoch (ADMM Z/U updates).

A task object owns the loss and the metric (``ClassificationTask`` here, the GLUE task in
:mod:`prunekit.adapters.hf`): ``task.step(model, batch) -> (loss, outputs)``, ``task.evaluate(model, loader) ->
dict`` and ``task.metric`` (the key to maximise).
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from prunekit.algorithms.hooks import Hook, TrainContext
from prunekit.core.errors import NonFiniteLoss
from prunekit.core.masks import MaskSet
from prunekit.training import distributed as D
from prunekit.training.config import Runtime, TrainConfig
from prunekit.training.device import Amp, device_of, to_device
from prunekit.training.progress import make_progress
from prunekit.training.tasks import better

__all__ = ["seed_everything", "TrainContext", "Hook", "fit", "make_optimizer", "make_scheduler", "NonFiniteLoss",
    "rng_state", "set_rng_state"]



def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


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


def rng_state(loader=None) -> dict:
    """Every RNG a training step may draw from: torch (CPU, CUDA), numpy, python, and the loader's
    own generator (if it has one)."""
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):
        st["loader"] = gen.get_state()
    return st


def set_rng_state(st: dict, loader=None) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(tuple(st["numpy"]))
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    gen = getattr(loader, "generator", None)
    if "loader" in st and isinstance(gen, torch.Generator):
        gen.set_state(st["loader"])


def _epoch_batches(loader, epoch: int, skip: int):
    """An iterator over ``loader`` for ``epoch`` starting at batch ``skip``.  A loader whose
    (batch) sampler has ``set_epoch(epoch, skip_batches=)`` (:class:`prunekit.training.distributed.ResumableSampler`)
    skips without loading; any other loader is replayed (same RNG state as at the epoch start) and the
    first ``skip`` batches are drawn and dropped."""
    sampler = getattr(loader, "batch_sampler", None)
    if sampler is None or not hasattr(sampler, "set_epoch"):
        sampler = getattr(loader, "sampler", None)
    fast = sampler is not None and hasattr(sampler, "set_epoch") and hasattr(sampler, "skip")
    if fast and sampler is not None:   # fast implies a sampler
        sampler.set_epoch(epoch, skip_batches=skip)
        return iter(loader)
    if sampler is not None and hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    it = iter(loader)
    for _ in range(skip):
        next(it, None)
    return it


def _hook_states(hooks) -> list:
    return [h.state_dict() if callable(getattr(h, "state_dict", None)) else None for h in hooks]


def _load_hook_states(hooks, states, device=None) -> None:
    for h, st in zip(hooks, states):
        if st is not None and callable(getattr(h, "load_state_dict", None)):
            h.load_state_dict(st if device is None else to_device(st, device))   # saved on CPU: map to the device


def _params_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _weights_copy(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclass
class _Loop:
    """Everything ``fit`` carries from step to step (and into a snapshot)."""

    model: nn.Module
    task: Any
    loader: Iterable
    eval_loader: Iterable | None
    cfg: TrainConfig
    hooks: list
    masks: MaskSet | None
    desc: str
    restore_best: bool
    ctx: TrainContext
    opt: torch.optim.Optimizer
    sched: Any
    total: int
    device: torch.device                                  # the model's: batches and hook states go there
    amp: Amp                                              # autocast (+ GradScaler for fp16 on CUDA)
    history: list = field(default_factory=list)
    best: dict | None = None
    best_state: dict | None = None
    bad_evals: int = 0
    stopped: bool = False
    start_epoch: int = 0
    skip: int = 0
    batch_i: int = 0
    epoch_start_rng: dict | None = None

    def snapshot(self) -> dict:
        ctx = self.ctx
        return {"model": _weights_copy(self.model),
                "masks": self.masks.state_dict() if self.masks is not None else None,
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "hooks": _hook_states(self.hooks), "rng": rng_state(self.loader),
                "epoch_start_rng": self.epoch_start_rng,
                "position": {"step": ctx.step, "epoch": ctx.epoch, "batch": self.batch_i},
                "history": self.history, "best": self.best, "bad_evals": self.bad_evals,
                "best_state": self.best_state, "stopped": self.stopped, "phase": self.desc,
                "amp": self.amp.state_dict()}

    def restore(self, resume: dict) -> None:
        """The one restore of a snapshot — after the hooks' ``begin`` (which built their structures)."""
        _load_hook_states(self.hooks, resume["hooks"], self.device)
        if self.masks is not None and resume.get("masks") is not None:
            self.masks.load_state_dict(resume["masks"])
        self.model.load_state_dict(resume["model"])
        if self.ctx.hard_prune is not None:
            self.ctx.hard_prune.refresh()
        self.opt.load_state_dict(resume["optimizer"])
        self.sched.load_state_dict(resume["scheduler"])
        self.amp.load_state_dict(resume.get("amp"))
        pos = resume["position"]
        self.ctx.step, self.ctx.epoch = int(pos["step"]), int(pos["epoch"])
        self.start_epoch, self.skip = int(pos["epoch"]), int(pos["batch"])
        self.history, self.best, self.bad_evals = list(resume["history"]), resume["best"], int(resume["bad_evals"])
        self.best_state = resume.get("best_state")
        self.stopped = bool(resume.get("stopped", False))


def _start(model, task, train_loader, eval_loader, cfg, hooks, masks, desc, restore_best, resume, baseline,
           runtime: Runtime | None = None) -> _Loop:
    """Optimizer, schedule, hard-prune, hooks' ``begin``; then a resume snapshot (once) or the baseline."""
    steps_per_epoch = len(train_loader)
    total = int(math.ceil(cfg.epochs * steps_per_epoch))
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, total)
    hp = masks.attach(model, opt) if masks is not None and len(masks) else None
    ctx = TrainContext(model, opt, masks, hp, task, total_steps=total, steps_per_epoch=steps_per_epoch, phase=desc)
    for h in hooks:
        h.begin(ctx)
    dev = device_of(model)
    lp = _Loop(model, task, train_loader, eval_loader, cfg, list(hooks), masks, desc, restore_best, ctx, opt, sched,
               total, dev, Amp((runtime or Runtime()).precision, dev))
    if resume is not None:
        lp.restore(resume)
    elif baseline is not None and task.metric in baseline:
        lp.best = {**baseline, "epoch": 0}
        if restore_best:
            lp.best_state = _weights_copy(model)
    return lp


def _checkpoint(lp: _Loop, on_checkpoint) -> None:
    if on_checkpoint is None:
        return
    if not _params_finite(lp.model):
        raise NonFiniteLoss(f"{lp.desc}: weights became NaN/inf at step {lp.ctx.step}; not checkpointed — the "
                            "last good checkpoint is kept; lower the learning rate or the penalty")
    on_checkpoint(lp.snapshot)


def _epoch_iter(lp: _Loop, epoch: int, resume: dict | None):
    """The epoch's batches; the first epoch of a resume replays its RNG and skips the batches done."""
    first = resume is not None and epoch == lp.start_epoch
    skip = lp.skip if first else 0
    if first and resume is not None:   # first implies a resume
        set_rng_state(resume.get("epoch_start_rng") or resume["rng"], lp.loader)
    lp.epoch_start_rng = rng_state(lp.loader)
    batches = _epoch_batches(lp.loader, epoch, skip)
    if first and resume is not None:
        set_rng_state(resume["rng"], lp.loader)
    lp.batch_i = skip
    return batches


def _train_step(lp: _Loop, batch, epoch: int, distributed: bool) -> torch.Tensor:
    """Forward (task loss + hooks' extra losses), backward, gradient averaging, clip, optimizer step."""
    ctx, desc = lp.ctx, lp.desc
    amp = lp.amp
    batch = to_device(batch, lp.device)
    with amp.autocast():
        loss, outputs = lp.task.step(lp.model, batch)
        for h in lp.hooks:
            extra = h.extra_loss(ctx, batch, outputs)
            if extra is not None:
                loss = loss + extra
    finite = bool(torch.isfinite(loss))
    msg = "" if finite else (f"{desc}: loss is not finite ({float(loss.detach())}) at step {ctx.step} (epoch {epoch}); "
                             "lower the learning rate or the penalty")
    if not finite and not distributed:
        raise NonFiniteLoss(msg)
    lp.opt.zero_grad(set_to_none=True)
    amp.backward(loss)
    if distributed:
        n_local = float(lp.task.batch_size(batch)) if hasattr(lp.task, "batch_size") else 1.0
        if D.average_gradients(lp.model.parameters(), n_local, nonfinite=not finite):
            raise NonFiniteLoss(msg or f"{desc}: loss is not finite on another rank at step {ctx.step}; "
                                       "lower the learning rate or the penalty")
    if lp.cfg.grad_clip:
        amp.unscale(lp.opt)
        nn.utils.clip_grad_norm_(lp.model.parameters(), lp.cfg.grad_clip)
    amp.step(lp.opt)   # hard-prune re-masks here via the optimizer's post-step hook
    lp.sched.step()
    ctx.step += 1
    lp.batch_i += 1
    ctx.loss = loss.detach()
    for h in lp.hooks:
        h.after_step(ctx)
    return loss


def _evaluate(lp: _Loop, bar) -> None:
    """Evaluate, keep the best (and its weights with ``restore_best``), count evaluations without gain."""
    ctx, task = lp.ctx, lp.task
    metrics = task.evaluate(lp.model, lp.eval_loader)
    metrics["epoch"] = ctx.epoch
    lp.history.append(metrics)
    for h in lp.hooks:                                   # optional: duck-typed hooks may lack it
        getattr(h, "evaluated", lambda *_: None)(ctx, metrics)
    if lp.best is None or better(task, metrics[task.metric], lp.best[task.metric]):
        lp.best, lp.bad_evals = dict(metrics), 0
        if lp.restore_best:
            lp.best_state = _weights_copy(lp.model)
    else:
        lp.bad_evals += 1
    line = f"[{lp.desc}] epoch {ctx.epoch:g}: " + ", ".join(
        f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    bar.write(line)   # a tqdm bar on a terminal, a plain line otherwise (training.progress)


def _end_epoch(lp: _Loop, epoch: int, n_epochs: int, bar, on_checkpoint) -> None:
    ctx = lp.ctx
    ctx.epoch = epoch + 1
    lp.batch_i = 0
    lp.epoch_start_rng = None
    for h in lp.hooks:
        h.epoch_end(ctx)
    last = ctx.epoch == n_epochs
    if lp.eval_loader is not None and (ctx.epoch % lp.cfg.eval_every == 0 or last):
        _evaluate(lp, bar)
    lp.stopped = bool(lp.cfg.patience and lp.bad_evals >= lp.cfg.patience)
    if not last:
        _checkpoint(lp, on_checkpoint)


def _run_epochs(lp: _Loop, resume, checkpoint_every: int, on_checkpoint, bar) -> None:
    ctx, total = lp.ctx, lp.total
    distributed = D.is_distributed()
    n_epochs = int(math.ceil(lp.cfg.epochs)) if total else 0
    lp.model.train()
    for epoch in range(lp.start_epoch, n_epochs):
        if lp.stopped:
            break
        for batch in _epoch_iter(lp, epoch, resume):
            if ctx.step >= total:
                break
            loss = _train_step(lp, batch, epoch, distributed)
            bar.update(1)
            if ctx.step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if (checkpoint_every and ctx.step % checkpoint_every == 0 and ctx.step < total
                    and lp.batch_i < ctx.steps_per_epoch):
                _checkpoint(lp, on_checkpoint)
        _end_epoch(lp, epoch, n_epochs, bar, on_checkpoint)
        if lp.stopped:
            break


def fit(model: nn.Module, task, train_loader: Iterable, eval_loader: Iterable | None, cfg: TrainConfig, *,
        hooks: Sequence[Hook] = (), masks: MaskSet | None = None, desc: str = "train",
        restore_best: bool = False, baseline: dict | None = None, resume: dict | None = None, checkpoint_every: int = 0,
        on_checkpoint: Callable[[Callable[[], dict]], None] | None = None, runtime: Runtime | None = None) -> dict:
    """Train ``model`` per ``cfg``; returns ``{"history": [...], "best": metrics, "steps": n, "seconds": s}``.

    With ``masks``, training is hard-pruned (weights, gradients, and weights after each step).
    With ``cfg.patience``, training stops when the metric has not improved for that many evaluations;
    with ``restore_best`` the best evaluated weights are restored at the end.  ``baseline`` = the metrics of the
    weights as they enter (already evaluated, e.g. right after hard-pruning): they compete as "epoch 0", so with
    ``restore_best`` training that never beats them gives the entering weights back, and patience counts from them.

    Resume: ``on_checkpoint(make_snapshot)`` is called after every ``checkpoint_every`` optimizer steps
    and after every epoch; ``make_snapshot()`` returns a plain dict of tensors/numbers (model, masks,
    optimizer, LR scheduler, hook/algorithm states, every RNG, position in the data order, history).
    Passing that dict back as ``resume=`` continues exactly where it was taken (bitwise on CPU).  The
    snapshot is restored once, after the hooks' ``begin`` (an algorithm builds its structures from the
    model it is given; the snapshot then overwrites them) — so the model passed in on a resume is the one
    the phase started from (e.g. the dense teacher of a distillation), not the snapshot's.

    Data-parallel: when ``torch.distributed`` is initialised with several ranks, gradients are
    averaged across ranks after ``backward`` (see :mod:`prunekit.training.distributed`).

    Device and precision: training runs on the model's device (batches are moved there);
    ``runtime.precision`` (fp32 | bf16 | fp16) runs the forward pass and losses under ``torch.autocast``
    (see :mod:`prunekit.training.device`)."""
    lp = _start(model, task, train_loader, eval_loader, cfg, hooks, masks, desc, restore_best, resume, baseline,
                runtime)
    t0 = time.perf_counter()
    bar = make_progress(lp.total, lp.ctx.step, desc, runtime)   # tqdm on a terminal, a line every N s otherwise
    try:
        _run_epochs(lp, resume, checkpoint_every, on_checkpoint, bar)
    finally:
        bar.close()
        if lp.ctx.hard_prune is not None:
            lp.ctx.hard_prune.detach()
    if restore_best and lp.best_state is not None:
        model.load_state_dict(lp.best_state)
        if masks is not None and len(masks):
            masks.apply(model)
    return {"history": lp.history, "best": lp.best, "steps": lp.ctx.step, "seconds": time.perf_counter() - t0}
