"""Where trained zoo weights live: a user cache directory, never the network."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$BITMIX_CACHE_DIR`, else `$XDG_CACHE_HOME/bitmix`, else `~/.cache/bitmix`."""
    root = os.environ.get("BITMIX_CACHE_DIR")
    if root:
        path = Path(root)
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bitmix"
    path.mkdir(parents=True, exist_ok=True)
    return path
