"""Knowledge distillation from the dense fine-tuned model, and progressive distillation.

Distillation (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015).  The
teacher is a frozen copy (``eval()`` mode, no gradients) of the model at the moment the distiller is
made — in the pipeline, right after dense fine-tuning.  With student logits ``s``, teacher logits
``t``, temperature ``T``, weight ``α`` and the task loss ``L_task``, the training loss becomes::

    L = (1 - α) · L_task  +  α · T² · KL( softmax(t/T) ‖ softmax(s/T) )      (batch mean)
        + β · mean_l MSE(h_s^l, h_t^l)                                       (hidden_weight β > 0)

The ``T²`` factor keeps gradient magnitudes independent of ``T`` (Hinton et al. §2).  For a
regression task (one output, STS-B) the logit term is ``α · MSE(s, t)`` (no temperature).  Hidden
states are every layer's output incl. the embeddings (HF ``output_hidden_states``), same shapes in
teacher and student because the student is a pruned copy.  As a :class:`~prunekit.algorithms.hooks.Hook`, the
distiller returns ``L - L_task`` from ``extra_loss`` (the loop adds ``L_task`` itself).

Recipe section (``distill:``), every key optional::

    distill: {alpha: 0.5, temperature: 2.0, hidden_weight: 0.0, stages: [search, retrain]}

``stages``: the pipeline phases that distill (``search`` = the algorithm's own phase, ``retrain`` =
hard-pruned retraining); the runner calls ``set_stage("retrain")`` before retraining.

Progressive distillation (algorithm ``progressive_distill``): gradual magnitude pruning — sparsity
raised step by step on the cubic schedule of Zhu & Gupta (2018), see :mod:`.gradual` — while the
student distils from the dense teacher at every step of the ramp (as in the progressive-pruning +
distillation recipes of e.g. Sanh et al. 2020, "Movement Pruning").  Its ``Params`` are the gradual
ones plus ``alpha``, ``temperature`` and ``hidden_weight``; the teacher is the dense fine-tuned model: the
pipeline hands it over with ``set_teacher`` (the dense stage's weights, reloaded from ``dense/`` on a resume —
never the resumed student); used alone, the model as it enters the search phase.  ``gradual`` + a ``distill:`` section is equivalent and also
distils during retraining; ``progressive_distill`` needs no extra section.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.algorithms.base import register
from prunekit.algorithms.gradual import Gradual
from prunekit.algorithms.hooks import Hook, TrainContext
from prunekit.core.errors import RecipeError
from prunekit.core.plan import PruneSpec

__all__ = ["DistillConfig", "Distiller", "kd_loss", "make_distiller", "ProgressiveDistill"]

STAGES = ("search", "retrain")


@dataclass
class DistillConfig:
    alpha: float = 0.5            # weight of the distillation term; (1 - alpha) weighs the task loss
    temperature: float = 2.0      # softmax temperature T
    hidden_weight: float = 0.0    # β: weight of the hidden-state MSE (0 = logits only)
    stages: list[str] = field(default_factory=lambda: list(STAGES))

    def __post_init__(self) -> None:
        if not (0.0 <= float(self.alpha) <= 1.0):
            raise RecipeError(f"distill.alpha must be in [0, 1], got {self.alpha}")
        if not float(self.temperature) > 0:
            raise RecipeError(f"distill.temperature must be > 0, got {self.temperature}")
        if not float(self.hidden_weight) >= 0:
            raise RecipeError(f"distill.hidden_weight must be >= 0, got {self.hidden_weight}")
        if isinstance(self.stages, str):
            self.stages = [self.stages]
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise RecipeError(f"distill.stages: {bad} not in {list(STAGES)}")

    @classmethod
    def from_dict(cls, cfg: dict[str, Any] | None) -> DistillConfig:
        cfg = dict(cfg or {})
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(cfg) - set(valid))
        if unknown:
            raise RecipeError(f"unknown distill key(s) {unknown}; valid keys: {valid}")
        for k in ("alpha", "temperature", "hidden_weight"):
            if k in cfg and (isinstance(cfg[k], bool) or not isinstance(cfg[k], (int, float))):
                raise RecipeError(f"distill.{k}: expected a number, got {cfg[k]!r}")
        return cls(**cfg)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T² · KL(softmax(t/T) ‖ softmax(s/T))``, averaged over the batch (Hinton et al. 2015)."""
    T = float(temperature)
    log_p_s = nn.functional.log_softmax(student_logits.float() / T, dim=-1)
    log_p_t = nn.functional.log_softmax(teacher_logits.float() / T, dim=-1)
    return nn.functional.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (T * T)


def _inputs(batch: Any) -> Any:
    if isinstance(batch, dict):
        return {k: v for k, v in batch.items() if k != "labels"}
    return batch[0]


class Distiller(Hook):
    """Hook adding the distillation terms (see module doc) with a frozen copy of ``model`` as teacher."""

    def __init__(self, model: nn.Module, task: Any, cfg: DistillConfig | dict[str, Any] | None = None):
        self.cfg = cfg if isinstance(cfg, DistillConfig) else DistillConfig.from_dict(cfg)
        self.task = task
        self.teacher = copy.deepcopy(model).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.stage = "search"
        if self.cfg.hidden_weight > 0:
            if not hasattr(task, "output_hidden_states"):
                raise RecipeError("distill.hidden_weight > 0 needs a task that can return hidden states (GLUE)")
            task.output_hidden_states = True

    def set_stage(self, stage: str) -> None:
        if stage not in STAGES:
            raise RecipeError(f"stage {stage!r} not in {list(STAGES)}")
        self.stage = stage

    @property
    def active(self) -> bool:
        return self.stage in self.cfg.stages

    @torch.no_grad()
    def teacher_outputs(self, batch: Any) -> Any:
        self.teacher.eval()
        if hasattr(self.task, "forward"):
            return self.task.forward(self.teacher, batch, output_hidden_states=self.cfg.hidden_weight > 0)
        x = _inputs(batch)
        return self.teacher(**x) if isinstance(x, dict) else self.teacher(x)

    def _task_loss(self, logits: Tensor, batch: Any) -> Tensor:
        if hasattr(self.task, "loss"):
            task_loss: Tensor = self.task.loss(logits, batch)
            return task_loss
        return nn.functional.cross_entropy(logits, batch[1])

    def loss(self, batch: Any, outputs: Any) -> Tensor:
        """The distillation part: ``α·T²·KL (+ β·hidden MSE) − α·L_task`` (see module doc)."""
        logits_of = getattr(self.task, "logits", lambda o: o)
        t_out = self.teacher_outputs(batch)
        s, t = logits_of(outputs), logits_of(t_out)
        a = float(self.cfg.alpha)
        regression = s.shape[-1] == 1
        kd = nn.functional.mse_loss(s.float(), t.float()) if regression else kd_loss(s, t, self.cfg.temperature)
        total = a * (kd - self._task_loss(s, batch))
        if self.cfg.hidden_weight > 0:
            hs, ht = getattr(outputs, "hidden_states", None), getattr(t_out, "hidden_states", None)
            if hs is None or ht is None:
                raise RecipeError("hidden-state distillation: the model outputs have no hidden_states")
            mse = torch.stack([nn.functional.mse_loss(a_.float(), b_.float()) for a_, b_ in zip(hs, ht)]).mean()
            total = total + float(self.cfg.hidden_weight) * mse
        return total

    def extra_loss(self, ctx: TrainContext, batch: Any, outputs: Any) -> Tensor | None:
        if not self.active:
            return None
        return self.loss(batch, outputs)


def make_distiller(cfg: dict[str, Any], model: nn.Module, task: Any) -> Distiller:
    """The runner's entry point: validate the recipe's ``distill`` section and freeze the teacher."""
    try:
        c = DistillConfig.from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise RecipeError(str(e)) from None
    return Distiller(model, task, c)


@register
class ProgressiveDistill(Gradual):
    """Gradual (cubic) pruning while distilling from the dense model (see module doc)."""

    name = "progressive_distill"
    has_search = True

    @dataclass
    class Params(Gradual.Params):
        alpha: float = 0.5
        temperature: float = 2.0
        hidden_weight: float = 0.0

        def __post_init__(self) -> None:
            super().__post_init__()
            DistillConfig(self.alpha, self.temperature, self.hidden_weight)

    params: Params

    def __init__(self, params: ProgressiveDistill.Params, spec: PruneSpec):
        super().__init__(params, spec)
        self.distiller: Distiller | None = None
        self.teacher: nn.Module | None = None

    def set_teacher(self, model: nn.Module) -> None:
        """The dense model to distil from (the pipeline passes the dense weights, also on a resume, where the
        model entering ``fit`` is not the dense one)."""
        self.teacher, self.distiller = model, None

    def begin(self, ctx: TrainContext) -> None:
        if self.distiller is None:  # teacher = set_teacher's model, else the model entering the ramp
            p = self.params
            self.distiller = Distiller(self.teacher if self.teacher is not None else ctx.model, ctx.task,
                                       DistillConfig(p.alpha, p.temperature, p.hidden_weight))
        super().begin(ctx)

    def extra_loss(self, ctx: TrainContext, batch: Any, outputs: Any) -> Tensor | None:
        return self.distiller.loss(batch, outputs) if self.distiller is not None else None
