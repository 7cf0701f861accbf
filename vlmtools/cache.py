"""Where vlmtools keeps what it makes: ``$VLMTOOLS_CACHE``, else ``~/.cache/vlmtools``; never inside the
installed package, which a system install makes read-only."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("VLMTOOLS_CACHE", Path.home() / ".cache" / "vlmtools"))
