"""One entry point for every leaderboard format: :func:`render` dispatches to the pure renderers of
:mod:`bench.results.leaderboard` and :mod:`bench.results.html` (imported only for ``html``, so
jinja2 loads only when a page is written)."""

from __future__ import annotations

from bench.errors import BenchError
from bench.results.leaderboard import (
    FORMATS,
    Board,
    LatexOptions,
    render_csv,
    render_json,
    render_latex,
    render_markdown,
)

__all__ = ["FORMATS", "render"]

RENDERERS = {"md": render_markdown, "latex": render_latex, "csv": render_csv, "json": render_json}


def render(board: Board, fmt: str, latex: LatexOptions | None = None) -> str:
    """``board`` in format ``fmt`` (one of :data:`FORMATS` but ``table``); ``latex`` applies to ``latex``."""
    if fmt == "latex":
        return render_latex(board, latex)
    if fmt == "html":
        from bench.results.html import render_html  # jinja2 is imported only for this format

        return render_html(board)
    if fmt not in RENDERERS:
        raise BenchError(f"unknown format '{fmt}'; use one of: {', '.join(FORMATS)}")
    return RENDERERS[fmt](board)
