"""The user's own models: ``package.module:factory`` import paths and weights to start from.

``model.name`` in a recipe is one of

* a built-in name (:func:`prunekit.models.registry.list_models`);
* an import path ``package.module:factory`` (or ``package.module:Class``): the module is imported and
  ``factory(**model.args)`` must return an :class:`torch.nn.Module`.  **This runs the user's code**
  with the rights of the ``prunekit`` process: only name modules you trust.  The module must be
  importable: installed, on ``$PYTHONPATH``, or in the current directory (appended to ``sys.path``
  last, so it never shadows an installed package).  A factory that rejects ``model.args`` or raises is a
  one-line :class:`~prunekit.core.errors.ModelError` naming it (the cause chained), as is a built-in
  model given an argument it does not take;
* for text data, a Hugging Face hub name or local model folder (see :mod:`prunekit.adapters.hf`).

``model.checkpoint`` is a ``.safetensors`` file (a plain state dict, e.g. written by
``safetensors.torch.save_file(model.state_dict(), path)``) or a prunekit run folder
(``manifest.json`` + ``model.safetensors``, checksums verified).  Either is loaded *strictly*: every
tensor name of the model must be present with the same shape, and no extra names may remain; the
error names the first offending key.
"""
from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from prunekit.core.errors import CheckpointError, ModelError, UnknownNameError
from prunekit.io.checkpoint import load_checkpoint, load_into
from prunekit.models.registry import MODELS, list_models

__all__ = ["ModelImportError", "is_import_path", "import_object", "call_checked", "call_factory", "build_user_model",
           "build_model", "load_weights"]

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


class ModelImportError(ModelError):
    """An import path (``package.module:name``) could not be imported or called.  The message names
    the path and the reason."""


def is_import_path(name: str) -> bool:
    """``True`` for ``package.module:attr`` (a colon, dotted identifiers on both sides)."""
    return bool(_IMPORT_PATH.match(name.strip()))


def import_object(path: str, what: str = "object") -> Any:
    """Import ``package.module:attr.sub`` and return the attribute.  Runs the module's code.

    Errors (:class:`ModelImportError`) name the path and the reason: a malformed path, a module that
    cannot be imported (and why: missing, or an exception raised by the module itself), a missing
    attribute."""
    if not is_import_path(path):
        raise ModelImportError(f"{what} {path!r} is not an import path of the form package.module:name")
    mod_name, _, attr = path.strip().partition(":")
    if os.getcwd() not in sys.path:     # `prunekit run` from the folder of my_model.py: like `python -m`,
        sys.path.append(os.getcwd())    # but last, so installed packages are never shadowed
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        reason = (f"module {e.name!r} not found (is it installed, on PYTHONPATH or in the current directory?)"
                  if e.name else str(e))
        raise ModelImportError(f"cannot import {what} {path!r}: {reason}") from e
    except Exception as e:  # noqa: BLE001 - the user's module raised while importing
        raise ModelImportError(f"cannot import {what} {path!r}: importing {mod_name!r} raised "
                               f"{type(e).__name__}: {e}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelImportError(f"cannot import {what} {path!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {' / '.join(lines)}" if lines else type(e).__name__


def call_checked(fn: Callable[..., Any], args: dict | None, label: str, args_key: str,
                 error: type[ModelError] = ModelError) -> Any:
    """``fn(**args)``; ``error`` (one line, the cause chained) names ``label`` when ``fn`` does not take
    the arguments (given as ``args_key``) or raises anything while building."""
    kw = dict(args or {})
    try:
        inspect.signature(fn).bind(**kw)
    except TypeError as e:
        raise error(f"{label} rejected {args_key} {sorted(kw)}: {e}") from e
    except ValueError:          # no signature to check (a builtin): the call below says it
        pass
    try:
        return fn(**kw)
    except Exception as e:  # noqa: BLE001 - the user's code raised: one line naming it, the cause kept
        raise error(f"{label} raised {_one_line(e)}") from e


def call_factory(path: str, args: dict | None, what: str, args_key: str) -> Any:
    """Import ``path`` and call it with ``args`` as keyword arguments; :class:`ModelImportError` names the
    path when it cannot be imported, is not callable, rejects the arguments (given as ``args_key``) or
    raises (the exception's type and message, the cause chained)."""
    factory: Callable[..., Any] = import_object(path, what)
    if not callable(factory):
        raise ModelImportError(f"{what} {path!r} is not callable (it is a {type(factory).__name__})")
    return call_checked(factory, args, f"{what} {path!r}", args_key, ModelImportError)


def build_user_model(path: str, args: dict | None = None) -> nn.Module:
    """Call the factory at import path ``path`` with ``args`` as keyword arguments; must return a module."""
    model = call_factory(path, args, "model factory", "model.args")
    if not isinstance(model, nn.Module):
        raise ModelImportError(f"model factory {path!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def build_model(name: str, args: dict | None = None, num_classes: int | None = None) -> nn.Module:
    """A built-in model (``num_classes`` filled in unless ``args`` has it) or an import-path model
    (``args`` only: the factory is called exactly with ``model.args``)."""
    if is_import_path(name):
        return build_user_model(name, args)
    if name not in list_models():
        raise UnknownNameError(f"unknown model {name!r}; valid: {list_models()} or an import path package.module:factory")
    kw = dict(args or {})
    if num_classes is not None:
        kw.setdefault("num_classes", num_classes)
    return call_checked(MODELS.get(name), kw, f"built-in model {name!r}", "model.args")


def load_weights(model: nn.Module, checkpoint: str | Path) -> str:
    """Load ``checkpoint`` (a ``.safetensors`` file or a prunekit run folder) into ``model``, strictly.

    Returns a one-line description of what was loaded.  :class:`CheckpointError` names the file and
    the first missing / unexpected / mismatching key."""
    p = Path(checkpoint).expanduser()
    if p.is_dir():
        if not (p / "manifest.json").is_file():
            raise CheckpointError(f"model.checkpoint {p} is a folder but not a prunekit run folder "
                                  "(no manifest.json); give the run folder or a .safetensors file")
        load_checkpoint(p, model, strict=True)
        return f"prunekit checkpoint {p}"
    if not p.is_file():
        raise CheckpointError(f"model.checkpoint {p} does not exist")
    if p.suffix != ".safetensors":
        raise CheckpointError(f"model.checkpoint {p}: expected a .safetensors file or a prunekit run folder")
    try:
        state = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read model.checkpoint {p}: {e}") from None
    load_into(model, state, source=str(p), strict=True)
    return f"safetensors file {p}"
