"""lowbit's cache directory: materialised reference models, cached base-model outputs, sensitivity tables."""

from __future__ import annotations

import os
from pathlib import Path

ENV_CACHE = "LOWBIT_CACHE"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else $LOWBIT_CACHE, else ~/.cache/lowbit."""
    root = cache_dir or os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "lowbit"
    return Path(root).expanduser()
