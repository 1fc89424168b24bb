"""Reading metadata tables and locating image files, with one-line errors."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def read_csv(path: Path, required: Sequence[str], dataset: Any, **kwargs: Any) -> Any:
    """Read ``path`` with pandas; a missing file or missing columns is a user error naming them."""
    import pandas as pd

    if not path.is_file():
        raise dataset.missing(path.parent, path.name)
    try:
        table = pd.read_csv(path, **kwargs)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise dataset.invalid(path, f"not a readable CSV ({str(exc).splitlines()[0][:200]})") from None
    absent = [c for c in required if c not in table.columns]
    if absent:
        found = ", ".join(map(str, table.columns[:12]))
        raise dataset.invalid(path, f"missing column(s) {', '.join(absent)}; found {found}")
    return table


def find_files(root: Path, dirs: Iterable[str], pattern: str) -> dict[str, str]:
    """Map file stem -> path (a string: cheap for tens of thousands of files) for files matching
    ``pattern`` in each of ``dirs`` under ``root`` (``dirs`` may be glob patterns such as
    ``images*/images``); the first match wins."""
    import fnmatch
    import os

    found: dict[str, str] = {}
    for d in dirs:
        bases = [root] if d == "." else sorted(p for p in root.glob(d) if p.is_dir())
        for base in bases:
            with os.scandir(base) as entries:
                names = sorted(e.name for e in entries if fnmatch.fnmatchcase(e.name, pattern))
            prefix = os.path.join(str(base), "")
            for name in names:
                found.setdefault(name.rsplit(".", 1)[0], prefix + name)
    return found
