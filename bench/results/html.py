"""The HTML leaderboard: one self-contained file (inline CSS, JS and SVG; nothing loaded from the
network) with sortable columns, the row marks and their legend, the certified-accuracy curves and
each row's details. A pure function of a :class:`~bench.results.leaderboard.Board`; the page is
the template ``templates/leaderboard.html.j2``, rendered by jinja2 with autoescape on."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.results.leaderboard import (
    DEFENSE,
    DETAILS,
    RUN_ID,
    Board,
    Column,
    cell_with_interval,
    row_kind,
)

TEMPLATE = Path(__file__).parent / "templates" / "leaderboard.html.j2"
# a colour-blind-safe palette (Okabe-Ito), one colour per row in the curves
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
_W, _H, _PAD = 420, 260, 40  # one curve chart: width, height and padding, in px


@dataclass(frozen=True)
class Curve:
    """One row's certified accuracy (%) at the board's radii for one certifier, as SVG points."""

    label: str
    colour: str
    points: tuple[tuple[float, float], ...]  # (x, y) in px
    values: tuple[tuple[float, float], ...]  # (radius, accuracy %)

    @property
    def marks(self) -> list[tuple[float, float, float, float]]:
        """(x px, y px, radius, accuracy %) of each point."""
        return [(x, y, r, a) for (x, y), (r, a) in zip(self.points, self.values)]


@dataclass(frozen=True)
class Chart:
    certifier: str
    curves: tuple[Curve, ...]
    x_ticks: tuple[tuple[float, str], ...]  # (x px, label)
    y_ticks: tuple[tuple[float, str], ...]
    width: int = _W
    height: int = _H
    pad: int = _PAD


def _sort_value(column: Column, value: Any) -> str:
    """The cell's sort key for the page's script: a number for numeric columns, "" when missing."""
    if value is None:
        return ""
    if column.kind == "text":
        return str(value)
    return repr(float(value)) if isinstance(value, (int, float)) and math.isfinite(value) else ""


def _x(radius: float, top: float) -> float:
    """The x (px) of ``radius`` on an axis from 0 to ``top``."""
    return _PAD + (_W - 2 * _PAD) * radius / top


def _y(accuracy: float) -> float:
    """The y (px) of ``accuracy`` (%) on an axis from 0 to 100."""
    return _H - _PAD - (_H - 2 * _PAD) * accuracy / 100


def charts(board: Board) -> list[Chart]:
    """One chart per certifier: each measured row's certified accuracy against the radius, at the
    radii of the board's certified columns (the curve is known only there)."""
    by_certifier: dict[str, list[Column]] = {}
    for c in board.columns:
        if c.key.kind == "certified":
            by_certifier.setdefault(c.key.method, []).append(c)
    out = []
    for certifier, columns in by_certifier.items():
        radii = [float(c.key.radius or 0.0) for c in columns]
        top = max(radii) or 1.0
        curves = []
        measured = [r for r in board.rows if row_kind(r) == "measured"]
        for i, row in enumerate(measured):
            values = tuple((float(c.key.radius or 0.0), 100 * row[c.key]) for c in columns
                           if row.get(c.key) is not None)
            if values:
                curves.append(Curve(str(row[DEFENSE]), PALETTE[i % len(PALETTE)],
                                    tuple((_x(r, top), _y(a)) for r, a in values), values))
        if curves:
            out.append(Chart(certifier, tuple(curves), tuple((_x(r, top), f"{r:g}") for r in radii),
                             tuple((_y(a), str(a)) for a in (0, 25, 50, 75, 100))))
    return out


def legend(board: Board) -> list[str]:
    """The explanations of the page: the board's note, one entry per sentence of it."""
    return [part.strip() for part in board.note.split("; ") if part.strip()]


def render_html(board: Board) -> str:
    """The board as one self-contained HTML page (see the module docstring)."""
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(TEMPLATE.read_text(encoding="utf-8"))
    rows = [{"kind": row_kind(row), "run_id": row.get(RUN_ID), "details": row.get(DETAILS) or {},
             "cells": [{"text": cell_with_interval(c, row), "sort": _sort_value(c, row.get(c.key)),
                        "numeric": c.kind != "text"} for c in board.columns]}
            for row in board.rows]
    groups: list[int] = []
    for row in rows:  # published and difference rows stay with the measured row above them
        starts = row["kind"] == "measured" or not groups
        groups.append(len(groups) if starts else groups[-1])
    caption = f"{board.dataset}: accuracy (%) under protocol {board.protocol}."
    return template.render(board=board, caption=caption, legend=legend(board),
                           columns=board.columns, rows=list(zip(rows, groups)), charts=charts(board))
