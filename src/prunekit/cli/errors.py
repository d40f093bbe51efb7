"""Exceptions shown to the user as one line (exit code 2) instead of a traceback."""
from prunekit.checkpoint import CheckpointError
from prunekit.config import RecipeError
from prunekit.data.registry import DataError
from prunekit.train import NonFiniteLoss

USER_ERRORS = (RecipeError, CheckpointError, DataError, NonFiniteLoss, FileNotFoundError, KeyError, ValueError)
