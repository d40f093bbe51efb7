"""The sensitivity sweep as a run: dense (``model.checkpoint`` or the ``dense`` phase, saved to ``out/dense``) →
each target layer pruned alone over the sweep → ``out/sensitivity.json`` and ``out/overrides.yaml``.
Checkpointed and resumable like every run (:func:`prunekit.pipelines.runner.run_stages`)."""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from prunekit.core.errors import RecipeError
from prunekit.pipelines.runner import open_run, run_stages
from prunekit.pipelines.stages import Dense, SensitivitySweep

__all__ = ["run_sensitivity"]


def run_sensitivity(recipe, out_dir: str | os.PathLike, sweep: Sequence[float], budget: float, *,
                    log: Callable[[str], None] = print, resume: bool = False):
    """Returns ``(results, sensitivity)``: the dict written to ``sensitivity.json`` and the
    :class:`~prunekit.algorithms.sensitivity.Sensitivity` (curves, structures, sizes)."""
    if not 0.0 < float(budget) < 1.0:
        raise RecipeError(f"--budget must be in (0, 1); got {budget}")
    ctx, state = open_run(recipe, out_dir, resume=resume, log=log)
    ctx.results = {}
    res = run_stages(ctx, [Dense(evaluate=False), SensitivitySweep(sweep, budget)], state,
                     results_file="sensitivity.json")
    return res, ctx.cache["sensitivity"]
