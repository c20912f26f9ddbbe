"""Where qforge keeps what it builds or converts: compiled kernels, converted models."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """$QFORGE_CACHE (default ~/.cache/qforge), joined with `parts`, created on demand."""
    root = Path(os.environ.get("QFORGE_CACHE") or Path.home() / ".cache" / "qforge")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
