"""The loop's hook protocol: what an algorithm sees (``TrainContext``) and may do (``Hook``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.core.masks import HardPrune, MaskSet


@dataclass
class TrainContext:
    """What hooks see.  ``hard_prune`` is live when masks are attached (call ``.refresh()`` after
    changing ``masks``)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None   # None in a Pruner built without one (set later)
    masks: MaskSet | None
    hard_prune: HardPrune | None
    task: Any
    step: int = 0                 # optimizer steps done in this phase
    epoch: int = 0                # epochs done in this phase
    total_steps: int = 0
    steps_per_epoch: int = 0
    phase: str = ""
    loss: Tensor | None = None    # the last step's total loss (detached), set before ``after_step``


class Hook:
    """Base algorithm hook: every method optional."""

    def begin(self, ctx: TrainContext) -> None: ...

    def extra_loss(self, ctx: TrainContext, batch: Any, outputs: Any) -> Tensor | None:
        return None

    def after_step(self, ctx: TrainContext) -> None: ...

    def epoch_end(self, ctx: TrainContext) -> None: ...

    def evaluated(self, ctx: TrainContext, metrics: dict[str, Any]) -> None: ...
