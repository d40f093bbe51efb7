"""The one timing helper: medians per variant, interleaving, inputs repeated to a batch."""
from __future__ import annotations

import pytest
import torch

from prunekit.deploy import timing


def test_interleaved_ms_orders_calls_and_takes_medians(monkeypatch):
    clock = iter(range(1000))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock) / 1000.0)
    calls: list[str] = []
    ms = timing.interleaved_ms({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                               repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]   # warm-up, then a b / b a / a b
    assert ms == {"a": 1.0, "b": 1.0}                            # every call took one fake millisecond


def test_interleaved_ms_restores_threads_and_checks_arguments():
    before = torch.get_num_threads()
    timing.interleaved_ms({"x": lambda: None}, repeats=1, threads=1)
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="repeats >= 1"):
        timing.interleaved_ms({"x": lambda: None}, repeats=0)


def test_repeat_batch_and_call_model():
    x = {"input_ids": torch.arange(6).view(2, 3), "n": 5}
    r = timing.repeat_batch(x, 4)
    assert r["input_ids"].shape == (4, 3) and bool((r["input_ids"] == torch.tensor([0, 1, 2])).all()) and r["n"] == 5
    lin = torch.nn.Linear(3, 2)
    t = torch.ones(1, 3)
    assert torch.equal(timing.call_model(lin, t), lin(t)) and torch.equal(timing.call_model(lin, (t,)), lin(t))
