"""Where bench keeps its files: ``$BENCH_HOME`` (default ``~/.cache/bench``)."""

from __future__ import annotations

import os
from pathlib import Path


def bench_home() -> Path:
    """The cache root: trained checkpoints and decoded datasets live below it."""
    return Path(os.environ.get("BENCH_HOME") or Path.home() / ".cache" / "bench")


def cache_subdir(name: str) -> Path:
    path = bench_home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path
