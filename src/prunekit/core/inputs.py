"""Example inputs: a tensor, a tuple/list of positional arguments, or a mapping of keyword arguments (the
batches of Hugging Face models).  One dispatch for everything that runs a model on them."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

__all__ = ["split_inputs", "call_model"]


def split_inputs(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` for ``model(*args, **kwargs)``."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a mapping, ``model(*inputs)`` for a tuple/list, else ``model(inputs)``."""
    args, kwargs = split_inputs(inputs)
    return model(*args, **kwargs)
