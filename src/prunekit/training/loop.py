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
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from prunekit.training.config import Runtime, TrainConfig
from prunekit.training.device import Amp, device_of, to_device
from prunekit.training.progress import make_progress
from prunekit.core.masks import MaskSet
from prunekit.algorithms.hooks import Hook, TrainContext
from prunekit.core.errors import NonFiniteLoss
from prunekit.training import distributed as D

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
    if fast:
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


def fit(model: nn.Module, task, train_loader: Iterable, eval_loader: Iterable | None, cfg: TrainConfig, *,
        hooks: list[Hook] = (), masks: MaskSet | None = None, desc: str = "train",
        on_epoch_end: Callable[[TrainContext, dict], None] | None = None,
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
    Passing that dict back as ``resume=`` continues exactly where it was taken (bitwise on CPU).

    Data-parallel: when ``torch.distributed`` is initialised with several ranks, gradients are
    averaged across ranks after ``backward`` (see :mod:`prunekit.training.distributed`).

    Device and precision: training runs on the model's device (batches are moved there);
    ``runtime.precision`` (fp32 | bf16 | fp16) runs the forward pass and losses under ``torch.autocast``
    (see :mod:`prunekit.training.device`)."""

    steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    total = int(math.ceil(cfg.epochs * steps_per_epoch))
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, total)
    dev = device_of(model)                                   # device: the model's
    amp = Amp((runtime or Runtime()).precision, dev)         # precision: autocast (+ GradScaler for fp16/CUDA)
    if resume is not None:
        model.load_state_dict(resume["model"])
        if masks is not None and resume.get("masks") is not None:
            masks.load_state_dict(resume["masks"])
        _load_hook_states(hooks, resume["hooks"], dev)
    hp = masks.attach(model, opt) if masks is not None and len(masks) else None
    ctx = TrainContext(model, opt, masks, hp, task, total_steps=total, steps_per_epoch=steps_per_epoch, phase=desc)
    for h in hooks:
        h.begin(ctx)
    history: list[dict] = []
    best: dict | None = None
    best_state = None
    bad_evals = 0
    stopped = False
    start_epoch, skip = 0, 0

    def weights_copy() -> dict:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    if resume is None and baseline is not None and task.metric in baseline:   # a resume brings its own best
        best = {**baseline, "epoch": 0}
        if restore_best:
            best_state = weights_copy()
    if resume is not None:   # begin() may have (re)initialised things: restore over it
        _load_hook_states(hooks, resume["hooks"], dev)
        if masks is not None and resume.get("masks") is not None:
            masks.load_state_dict(resume["masks"])
        model.load_state_dict(resume["model"])
        if hp is not None:
            hp.refresh()
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        amp.load_state_dict(resume.get("amp"))
        pos = resume["position"]
        ctx.step, ctx.epoch = int(pos["step"]), int(pos["epoch"])
        start_epoch, skip = int(pos["epoch"]), int(pos["batch"])
        history, best, bad_evals = list(resume["history"]), resume["best"], int(resume["bad_evals"])
        best_state = resume.get("best_state")
        stopped = bool(resume.get("stopped", False))
    distributed = D.is_distributed()
    t0 = time.perf_counter()
    n_epochs = int(math.ceil(cfg.epochs)) if total else 0
    bar = make_progress(total, ctx.step, desc, runtime)   # tqdm on a terminal, a line every N s otherwise
    epoch_start_rng = None
    batch_i = 0

    def snapshot() -> dict:
        return {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "masks": masks.state_dict() if masks is not None else None,
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "hooks": _hook_states(hooks),
                "rng": rng_state(train_loader), "epoch_start_rng": epoch_start_rng,
                "position": {"step": ctx.step, "epoch": ctx.epoch, "batch": batch_i},
                "history": history, "best": best, "bad_evals": bad_evals, "best_state": best_state,
                "stopped": stopped, "phase": desc, "amp": amp.state_dict()}

    def checkpoint() -> None:
        if on_checkpoint is None:
            return
        if not _params_finite(model):
            raise NonFiniteLoss(f"{desc}: weights became NaN/inf at step {ctx.step}; not checkpointed — the "
                                "last good checkpoint is kept; lower the learning rate or the penalty")
        on_checkpoint(snapshot)

    try:
        model.train()
        for epoch in range(start_epoch, n_epochs):
            if stopped:
                break
            first = resume is not None and epoch == start_epoch
            skip_b = skip if first else 0
            if first:
                ck_rng = resume["rng"]
                set_rng_state(resume.get("epoch_start_rng") or ck_rng, train_loader)
            epoch_start_rng = rng_state(train_loader)
            batches = _epoch_batches(train_loader, epoch, skip_b)
            if first:
                set_rng_state(ck_rng, train_loader)
            batch_i = skip_b
            for batch in batches:
                if ctx.step >= total:
                    break
                batch = to_device(batch, dev)
                with amp.autocast():
                    loss, outputs = task.step(model, batch)
                    for h in hooks:
                        extra = h.extra_loss(ctx, batch, outputs)
                        if extra is not None:
                            loss = loss + extra
                finite = bool(torch.isfinite(loss))
                msg = "" if finite else (f"{desc}: loss is not finite ({float(loss.detach())}) at step {ctx.step} (epoch {epoch}); "
                                         "lower the learning rate or the penalty")
                if not finite and not distributed:
                    raise NonFiniteLoss(msg)
                opt.zero_grad(set_to_none=True)
                amp.backward(loss)
                if distributed:
                    n_local = float(task.batch_size(batch)) if hasattr(task, "batch_size") else 1.0
                    if D.average_gradients(model.parameters(), n_local, nonfinite=not finite):
                        raise NonFiniteLoss(msg or f"{desc}: loss is not finite on another rank at step {ctx.step}; lower the learning rate or the penalty")
                if cfg.grad_clip:
                    amp.unscale(opt)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                amp.step(opt)   # hard-prune re-masks here via the optimizer's post-step hook
                sched.step()
                ctx.step += 1
                batch_i += 1
                ctx.loss = loss.detach()
                for h in hooks:
                    h.after_step(ctx)
                bar.update(1)
                if ctx.step % 20 == 0:
                    bar.set_postfix(loss=f"{loss.item():.4f}")
                if checkpoint_every and ctx.step % checkpoint_every == 0 and ctx.step < total and batch_i < steps_per_epoch:
                    checkpoint()
            ctx.epoch = epoch + 1
            batch_i = 0
            epoch_start_rng = None
            for h in hooks:
                h.epoch_end(ctx)
            last = ctx.epoch == n_epochs
            metrics: dict = {}
            if eval_loader is not None and (ctx.epoch % cfg.eval_every == 0 or last):
                metrics = task.evaluate(model, eval_loader)
                metrics["epoch"] = ctx.epoch
                history.append(metrics)
                for h in hooks:
                    getattr(h, "evaluated", lambda *_: None)(ctx, metrics)
                score = metrics[task.metric]
                if best is None or score > best[task.metric]:
                    best, bad_evals = dict(metrics), 0
                    if restore_best:
                        best_state = weights_copy()
                else:
                    bad_evals += 1
                line = f"[{desc}] epoch {ctx.epoch:g}: " + ", ".join(
                    f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
                bar.write(line)   # one line per evaluation, bar or not
            if on_epoch_end is not None:
                on_epoch_end(ctx, metrics)
            stopped = bool(cfg.patience and bad_evals >= cfg.patience)
            if not last:
                checkpoint()
            if stopped:
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
