"""The model registry: names -> constructor functions taking keyword arguments (``num_classes`` …).

``register_model`` lets other modules (e.g. Hugging Face adapters) add entries; a name can be
registered once, so two constructors never silently shadow each other.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

from torch import nn

from prunekit.core.registry import Registry
from prunekit.models.lenet import lenet5, lenet5_classic
from prunekit.models.resnet import resnet18_cifar

__all__ = ["MODELS", "register_model", "get_model", "list_models"]

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def register_model(name: str, fn: Callable[..., nn.Module] | None = None):
    """Register ``fn`` under ``name``; usable as ``@register_model("name")``. Duplicate -> ``ValueError``."""
    return MODELS.register(name) if fn is None else MODELS.add(name, fn)


def list_models(pattern: str | None = None) -> list[str]:
    """Registered names, sorted; ``pattern`` is an fnmatch filter such as ``"lenet*"``."""
    names = MODELS.names()
    return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Build model ``name`` with ``kwargs``; unknown name -> :class:`UnknownNameError` listing the valid names."""
    return MODELS.get(name)(**kwargs)


register_model("lenet5", lenet5)
register_model("lenet5_classic", lenet5_classic)
register_model("resnet18_cifar", resnet18_cifar)
