"""Exceptions shown to the user as one line (exit code 2) instead of a traceback."""
from prunekit.io.checkpoint import CheckpointError
from prunekit.core.errors import RecipeError
from prunekit.data.registry import DataError
from prunekit.training.loop import NonFiniteLoss

USER_ERRORS = (RecipeError, CheckpointError, DataError, NonFiniteLoss, FileNotFoundError, KeyError, ValueError)
