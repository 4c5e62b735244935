"""Where gradfix keeps what it builds once per machine (the zoo's scenarios, the vote kernel)."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "GRADFIX_CACHE"


def cache_root(override: str | Path | None = None) -> Path:
    """The cache folder: ``override``, else ``$GRADFIX_CACHE``, else the user cache folder."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "gradfix"
