"""Shared by the benchmark scripts: replace one "## Title" section of docs/performance.md."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "performance.md"
HEADER = ("# Performance\n\nMeasurements written by the scripts in `benchmarks/` (see benchmarks/README.md). "
          "Each section is\nreplaced when its script runs again.\n\n")


def write_section(title: str, body: str, path: Path = DOC) -> None:
    """Replace the section headed ``## title`` (or append it) with ``## title`` + ``body``."""
    new = f"## {title}\n\n{body.strip()}\n"
    text = path.read_text() if path.exists() else HEADER
    pattern = re.compile(rf"^## {re.escape(title)}\s*$.*?(?=^## |\Z)", re.M | re.S)
    text = pattern.sub(lambda _: new + "\n", text, count=1) if pattern.search(text) else text.rstrip() + "\n\n" + new
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip() + "\n")
