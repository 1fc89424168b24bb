"""Which column ranks a leaderboard (``bench leaderboard --rank-by``).

The default stays robust accuracy (then clean accuracy); a certified board can be ranked by its
certified accuracy at a chosen radius. The average certified radius (ACR) is shown but is never a
ranking criterion: it can be raised by certifying a few examples at huge radii while losing many
at small ones (Sun et al., 2024).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from bench.errors import BenchError
from bench.results.leaderboard import CLEAN, DEFENSE, ROBUST, RUN_ID, Board, ColumnKey

__all__ = ["RANK_BY_HELP", "rank_board"]

RANK_BY_HELP = ("robust (default), clean, certified@R (certified accuracy at radius R) or "
                "certified:CERTIFIER@R when several certifiers have a column at R")


def _certified_column(board: Board, text: str) -> ColumnKey:
    """The certified column ``text`` (``certified@R`` or ``certified:CERTIFIER@R``) names."""
    name, _, radius_text = text.partition("@")
    certifier = name.partition(":")[2] or None
    try:
        radius = float(radius_text)
    except ValueError:
        radius = math.nan
    if not math.isfinite(radius) or radius < 0:
        raise BenchError(f"invalid --rank-by '{text}': use {RANK_BY_HELP}")
    found = [c.key for c in board.columns if c.key.kind == "certified" and c.key.radius is not None
             and math.isclose(c.key.radius, radius, abs_tol=1e-12) and certifier in (None, c.key.method)]
    if not found:
        radii = sorted({f"{c.key.method}@{c.key.radius:g}" for c in board.columns if c.key.kind == "certified"})
        raise BenchError(f"--rank-by {text}: the board has no certified column at radius {radius:g}"
                         + (f"; it has {', '.join(radii)}" if radii else " (no run on it certifies)"))
    if len(found) > 1:
        raise BenchError(f"--rank-by {text}: several certifiers at radius {radius:g} "
                         f"({', '.join(k.method for k in found)}); use certified:CERTIFIER@{radius:g}")
    return found[0]


def rank_key(board: Board, rank_by: str) -> ColumnKey:
    """The column ``rank_by`` names on ``board``; a one-line :class:`BenchError` otherwise (ACR included)."""
    text = rank_by.strip().lower()
    if text in ("robust", ""):
        return ROBUST
    if text == "clean":
        return CLEAN
    if text.startswith("certified"):
        return _certified_column(board, text)
    if text.startswith("acr"):
        raise BenchError("ACR is shown but never ranks a board (it can be gamed: Sun et al. 2024); "
                         "rank by certified@R instead")
    raise BenchError(f"invalid --rank-by '{rank_by}': use {RANK_BY_HELP}")


def rank_board(board: Board, rank_by: str = "robust") -> Board:
    """``board`` with its rows ranked by the column ``rank_by`` names (descending, missing values
    last), ties broken by robust accuracy, clean accuracy, defense and run id; the note says which
    column ranks when it is not the default. Rank before adding published rows."""
    key = rank_key(board, rank_by)
    if key == ROBUST:
        return board

    def order(row: dict[Any, Any]) -> tuple[Any, ...]:
        return (row.get(key) is None, -(row.get(key) or 0.0), row.get(ROBUST) is None, -(row.get(ROBUST) or 0.0),
                -(row.get(CLEAN) or 0.0), row[DEFENSE], row[RUN_ID])

    note = f"ranked by {key.title}"
    return replace(board, rows=tuple(sorted(board.rows, key=order)), note="; ".join(filter(None, [note, board.note])))
