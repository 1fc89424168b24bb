"""Shared by the benchmark scripts: replace one "## Title" section of docs/performance.md (keeping its
hand-written notes), read each stage's seconds from bench's progress lines, and end a script the
same way."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "performance.md"
HEADER = ("# Performance\n\nMeasurements written by the scripts in `benchmarks/` (see benchmarks/README.md). "
          "Each section is\nreplaced when its script runs again, except its hand-written notes.\n\n")


NOTES = "<!-- notes: written by hand, kept when the script reruns -->"


def write_section(title: str, body: str, path: Path = DOC) -> None:
    """Replace the section headed ``## title`` (or append it) with ``## title`` + ``body``. Hand-written
    notes of the old section, from a line ``NOTES`` to its end, are kept after the new body."""
    text = path.read_text() if path.exists() else HEADER
    pattern = re.compile(rf"^## {re.escape(title)}\s*$.*?(?=^## |\Z)", re.M | re.S)
    found = pattern.search(text)
    old = found.group(0) if found else ""
    notes = old[old.index(NOTES):].strip() if NOTES in old else ""
    new = f"## {title}\n\n{body.strip()}\n" + (f"\n{notes}\n" if notes else "")
    text = pattern.sub(lambda _: new + "\n", text, count=1) if found else text.rstrip() + "\n\n" + new
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip() + "\n")


def stage_seconds(log: str) -> dict[str, int]:
    """Seconds per stage from bench's progress lines (the last, finished one of each):
    ``[k/n] LABEL: DONE/TOTAL [fields] (N s)`` (the ``[k/n]`` prefix dropped, so runs whose plans
    number stages differently compare) and ``eot_saturation THREAT: passed in N s``."""
    out: dict[str, int] = {}
    for label, done, total, seconds in re.findall(r"^(?:\[\d+/\d+\] )?(.+?): (\d+)/(\d+)(?: [^(]*)? \((\d+) s\)\s*$",
                                                  log, flags=re.M):
        if done == total:
            out[label.strip()] = int(seconds)
    for label, seconds in re.findall(r"^(eot_saturation .+?): (?:passed|triggered) in (\d+) s", log, flags=re.M):
        out[label] = int(seconds)
    return out


def finish(result: dict, ok: bool, write: Callable[[dict, bool], None], no_write: bool) -> int:
    """Print ``result`` as JSON, write the doc section unless ``no_write``; the exit status (1 if a
    target is missed)."""
    print(json.dumps(result, indent=2))
    if not no_write:
        write(result, ok)
    return 0 if ok else 1


def unpack(revision: str, dest: Path) -> Path:
    """The source tree of ``revision`` of this repository, unpacked into ``dest`` with ``git archive``."""
    root = DOC.parent.parent
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(root), "archive", revision], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def use_tree(src: str) -> None:
    """Import ``bench`` from the source tree ``src`` (a worker process timing one version); fails
    if another copy was imported instead."""
    sys.path.insert(0, src)
    import bench

    assert Path(bench.__file__).resolve().is_relative_to(Path(src).resolve()), bench.__file__
