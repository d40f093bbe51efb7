"""The errors the CLI shows as one line (exit code 2) instead of a traceback: prunekit's own
:class:`~prunekit.core.errors.PrunekitError` family and a missing input file.  Anything else is a bug and
keeps its traceback."""
from prunekit.core.errors import PrunekitError

USER_ERRORS = (PrunekitError, FileNotFoundError)
