"""One training phase's settings (optimizer, schedule, epochs, evaluation, checkpoints)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from prunekit.core.errors import RecipeError


@dataclass
class TrainConfig:
    """One training phase.  In ``dense``/``search``/``retrain`` every key left unset falls back to ``train``."""

    epochs: float = 1            # may be fractional: 0.5 = half an epoch
    lr: float = 0.01
    optimizer: str = "sgd"       # sgd | adam | adamw
    momentum: float = 0.9
    weight_decay: float = 0.0
    scheduler: str = "cosine"    # none | cosine | linear | step
    warmup_ratio: float = 0.0
    grad_clip: float | None = None
    patience: int | None = None  # stop when the dev metric has not improved for this many evaluations (eval_every)
    eval_every: int = 1          # evaluate every k epochs (and always at the end)

    def __post_init__(self):
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("scheduler", self.scheduler, SCHEDULERS)
        _range("epochs", self.epochs, 0, None)
        _range("lr", self.lr, 0, None, lo_open=True)
        _range("momentum", self.momentum, 0, 1)
        _range("weight_decay", self.weight_decay, 0, None)
        _range("warmup_ratio", self.warmup_ratio, 0, 1)
        if self.patience is not None:
            _range("patience", self.patience, 1, None)
        if self.grad_clip is not None:
            _range("grad_clip", self.grad_clip, 0, None, lo_open=True)
        _range("eval_every", self.eval_every, 1, None)


@dataclass
class Runtime:
    """How the loop runs (not what it trains): autocast precision and the progress output interval.
    The device is the model's: move the model first (:func:`prunekit.training.device.resolve_device`)."""

    precision: str = "fp32"          # fp32 | bf16 | fp16 (torch.autocast; GradScaler for fp16 on CUDA)
    progress_every_s: float = 30.0   # plain progress line interval when stderr is not a terminal (0 = off)
    progress_every_steps: int = 0    # ... and/or every N steps (0 = off)

    def __post_init__(self):
        _choice("precision", self.precision, ("fp32", "bf16", "fp16"))
        _range("progress_every_s", self.progress_every_s, 0, None)
        _range("progress_every_steps", self.progress_every_steps, 0, None)


OPTIMIZERS = ("sgd", "adam", "adamw")


SCHEDULERS = ("none", "cosine", "linear", "step")


# ---------------------------------------------------------------------------------------------
def _choice(key, value, choices):
    if value not in choices:
        raise RecipeError(f"{key}: {value!r} is not one of {list(choices)}")


def _range(key, value, lo, hi, lo_open=False, hi_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(f"{key}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise RecipeError(f"{key}: {value} is not a finite number")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise RecipeError(f"{key}: {value} is out of range (must be {'>' if lo_open else '>='} {lo})")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise RecipeError(f"{key}: {value} is out of range (must be {'<' if hi_open else '<='} {hi})")
