"""fastdia's cache folder (materialised base models and judges, built CUDA extensions, op
measurements): ``$FASTDIA_CACHE``, default ``~/.cache/fastdia``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The fastdia cache folder: ``$FASTDIA_CACHE`` or ``~/.cache/fastdia``."""
    return Path(os.environ.get("FASTDIA_CACHE") or Path.home() / ".cache" / "fastdia")
