"""prunekit's exception hierarchy.

Every error a user can cause — a bad recipe key or value, a missing or malformed data file, a corrupt
checkpoint, a model the tool cannot handle, an unknown registered name — is a :class:`PrunekitError`.
The CLI turns exactly these into one-line messages; anything else is a bug and keeps its traceback.
Each class also derives from the builtin that callers of earlier versions caught (``ValueError``,
``RuntimeError``), so ``except ValueError`` keeps working.
"""
from __future__ import annotations

__all__ = ["PrunekitError", "RecipeError", "UnknownNameError", "DataError", "CheckpointError", "ModelError",
           "NonFiniteLoss", "UntrustedCodeError"]


class PrunekitError(Exception):
    """Base class: a problem with what the user gave prunekit (not a bug in prunekit)."""


class RecipeError(PrunekitError, ValueError):
    """A recipe key or value (or an equivalent API argument) is invalid.  The message names the key."""


class UnknownNameError(RecipeError):
    """A name looked up in a registry (structure, score, algorithm, model, data set, task) does not
    exist.  The message lists the valid names."""


class DataError(PrunekitError, ValueError):
    """A data file is missing or malformed.  The message names the file and what is wrong with it."""


class CheckpointError(PrunekitError, RuntimeError):
    """A checkpoint is missing, corrupt, or does not fit the model."""


class ModelError(PrunekitError, ValueError):
    """The model cannot be handled as asked (no such layer, an architecture the operation does not support)."""


class NonFiniteLoss(PrunekitError, FloatingPointError):
    """The loss became NaN or inf; training stopped and the last good checkpoint is kept."""


class UntrustedCodeError(PrunekitError, PermissionError):
    """Opening a run folder would import code named in its stored recipe (a ``package.module:factory``,
    a data factory) or run a Hugging Face repository's own code, and the user did not allow it
    (``--trust-code`` / ``trust_code=True``).  The message says what would run."""
