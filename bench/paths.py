"""Where bench keeps its files: ``$BENCH_HOME`` (default ``~/.cache/bench``)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def bench_home() -> Path:
    """The cache root: trained checkpoints and decoded datasets live below it."""
    return Path(os.environ.get("BENCH_HOME") or Path.home() / ".cache" / "bench")


def cache_subdir(name: str) -> Path:
    path = bench_home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Create ``path`` (and its folder) through ``write(tmp)`` on a temporary file beside it, then
    rename: readers see the old file or the whole new one, never a half-written file, and a
    failed or interrupted write leaves no temporary file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
