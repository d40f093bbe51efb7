"""The one latency-timing helper: median wall-clock milliseconds of several callables, interleaved
(A, B, C, then C, B, A, …) after a warm-up, under ``torch.inference_mode`` and a fixed thread count, so
background load on a shared machine hits every variant alike.  Compare variants as ratios of one call."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from prunekit.core.inputs import call_model

__all__ = ["interleaved_ms", "call_model", "repeat_batch", "forward_latency_ms"]


def repeat_batch(x: Any, n: int) -> Any:
    """The first example of ``x`` (a tensor or a dict/tuple of tensors) repeated to ``n`` rows."""
    if isinstance(x, Mapping):
        return {k: repeat_batch(v, n) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(repeat_batch(v, n) for v in x)
    if isinstance(x, torch.Tensor) and x.dim() > 0:
        return x[:1].expand(n, *x.shape[1:]).contiguous()
    return x


def interleaved_ms(fns: Mapping[str, Callable[[], Any]], *, repeats: int = 20, warmup: int = 3,
                   threads: int | None = None) -> dict[str, float]:
    """Median milliseconds per call of each ``fns`` entry (see the module docstring)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    times: dict[str, list[float]] = {k: [] for k in fns}
    try:
        with torch.inference_mode():
            for f in fns.values():
                for _ in range(warmup):
                    f()
            items = list(fns.items())
            for i in range(repeats):
                for k, f in (items if i % 2 == 0 else items[::-1]):
                    t0 = time.perf_counter()
                    f()
                    times[k].append(1e3 * (time.perf_counter() - t0))
    finally:
        torch.set_num_threads(old)
    return {k: statistics.median(v) for k, v in times.items()}


def forward_latency_ms(model: nn.Module, example: Any, batch: int = 1, repeats: int = 20) -> float:
    """Median wall time (ms) of one eval-mode forward pass on ``example`` repeated to ``batch`` rows."""
    inputs = repeat_batch(example, batch)
    was = model.training
    model.eval()
    try:
        return interleaved_ms({"model": lambda: call_model(model, inputs)}, repeats=repeats)["model"]
    finally:
        model.train(was)
