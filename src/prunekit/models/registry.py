"""The model registry: names -> constructor functions taking keyword arguments (``num_classes`` …).

``register_model`` lets other modules (e.g. Hugging Face adapters) add entries; a name can be
registered once, so two constructors never silently shadow each other.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Callable

from torch import nn

from prunekit.models.lenet import lenet5, lenet5_classic
from prunekit.models.resnet import resnet18_cifar

__all__ = ["register_model", "get_model", "list_models"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, fn: Callable[..., nn.Module] | None = None):
    """Register ``fn`` under ``name``; usable as ``@register_model("name")``. Duplicate -> ``ValueError``."""
    def add(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS and _MODELS[name] is not f:
            raise ValueError(f"model name {name!r} is already registered to {_MODELS[name].__module__}."
                             f"{_MODELS[name].__qualname__}")
        _MODELS[name] = f
        return f
    return add if fn is None else add(fn)


def list_models(pattern: str | None = None) -> list[str]:
    """Registered names, sorted; ``pattern`` is an fnmatch filter such as ``"lenet*"``."""
    names = sorted(_MODELS)
    return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Build model ``name`` with ``kwargs``; unknown name -> ``KeyError`` listing the valid names."""
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    return _MODELS[name](**kwargs)


register_model("lenet5", lenet5)
register_model("lenet5_classic", lenet5_classic)
register_model("resnet18_cifar", resnet18_cifar)
