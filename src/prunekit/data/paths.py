"""Where data lives: an explicit option, then ``$PRUNEKIT_DATA``, then ``../shared/data`` if it exists."""
from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "PRUNEKIT_DATA"


def resolve_data_root(option: str | os.PathLike | None = None) -> Path:
    """Return the data folder.

    Order: ``option`` (e.g. the recipe's ``data.root`` or ``--set data.root=...``), then the
    ``PRUNEKIT_DATA`` environment variable, then ``../shared/data`` relative to the current
    working directory, then ``../shared/data`` relative to this source checkout.
    Raises ``FileNotFoundError`` naming every place it looked.
    """
    tried: list[str] = []
    if option:
        p = Path(option).expanduser()
        if p.is_dir():
            return p.resolve()
        raise FileNotFoundError(f"data root {str(p)!r} (from the data.root option) is not a directory")
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env).expanduser()
        if p.is_dir():
            return p.resolve()
        raise FileNotFoundError(f"data root {env!r} (from ${ENV_VAR}) is not a directory")
    candidates = [Path.cwd() / ".." / "shared" / "data", Path(__file__).resolve().parents[3] / ".." / "shared" / "data"]
    for c in candidates:
        tried.append(str(c))
        if c.is_dir():
            return c.resolve()
    raise FileNotFoundError(
        "no data folder found: pass data.root (recipe or --set data.root=DIR), or set "
        f"${ENV_VAR}; also looked in: {', '.join(tried)}"
    )
