"""The board explains itself: which protocol and why, what was left out, triggered checks, and
terminal headers that are never cut. build_board runs on a stand-in store (no runs are executed)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console
from test_leaderboard import summaries
from test_leaderboard_latex import quick_summaries

import bench.results.queries
from bench.results.leaderboard import (
    DEFENSE,
    board_from_summaries,
    build_board,
    protocol_note,
    render_rich,
    strip_marks,
)
from bench.results.render import render


class FakeStore:
    """``list_runs`` of finished runs: (id, defense, model, protocol@version), one example set."""

    url = "sqlite:///fake.db"

    def __init__(self, runs: list[tuple[int, str, int, str]]) -> None:
        self.runs = [SimpleNamespace(id=i, defense=d, model_id=m, protocol=p.split("@")[0],
                                     protocol_version=int(p.split("@")[1]), indices_hash="abc", n_examples=200)
                     for i, d, m, p in runs]

    def list_runs(self, dataset: str | None = None, status: Any = None) -> list[Any]:
        return self.runs


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> FakeStore:
    runs = [(1, "standard", 1, "pgd@1"), (2, "pgd-at", 2, "pgd@1"), (3, "hycas", 3, "quick@1"),
            (4, "rs", 4, "quick@1"), (5, "rs", 4, "quick@1"), (6, "dcs", 5, "quick@1"), (7, "dcs", 5, "adaptive@1")]
    fake = FakeStore(runs)
    by_id = {r.id: r for r in fake.runs}

    def summary(_store: Any, run_id: int) -> dict[str, Any]:
        run = by_id[run_id]
        return dict(summaries()[1], run_id=run_id, defense=run.defense, n_examples=200,
                    protocol=f"{run.protocol}@{run.protocol_version}")

    monkeypatch.setattr(bench.results.queries, "run_summary", summary)
    return fake


def test_the_default_protocol_is_named_with_why_and_what_was_left_out(store: FakeStore) -> None:
    board = build_board(store, "digits")  # type: ignore[arg-type]
    assert board.protocol == "quick@1"
    assert sorted(r[DEFENSE] for r in board.rows) == ["dcs", "hycas", "rs"]
    assert board.note == ("protocol quick@1: the one with the most finished runs (4), 3 run(s) of other protocols "
                          "left out (adaptive@1: 1, pgd@1: 2), choose one with --protocol; "
                          "1 older run(s) of the same defense and model left out (the latest counts)")
    for fmt, where in (("md", "Note: protocol quick@1"), ("latex", "% protocol quick@1"),
                       ("json", '"note": "protocol quick@1'), ("html", "<li>protocol quick@1")):
        assert where in render(board, fmt), fmt


def test_an_explicit_protocol_still_says_what_it_left_out(store: FakeStore) -> None:
    board = build_board(store, "digits", "pgd")  # type: ignore[arg-type]
    assert board.protocol == "pgd@1" and len(board.rows) == 2
    assert board.note == "5 run(s) of other protocols left out (adaptive@1: 1, quick@1: 4), choose one with --protocol"


def test_protocol_note_is_empty_with_one_protocol() -> None:
    assert protocol_note("pgd@1", ["pgd@1", "pgd@1"], defaulted=True) == ""


def test_triggered_checks_are_marked_per_row_with_a_legend() -> None:
    rows = summaries()
    rows[1] = dict(rows[1], checks=[{"name": "square_beats_whitebox", "triggered": True, "detail": "x"},
                                    {"name": "zero_gradient", "triggered": False, "detail": ""}])
    board = board_from_summaries("digits", "pgd@1", rows)
    assert [r[DEFENSE] for r in board.rows] == ["my_def&co", "standard §", "pgd-at"]
    assert strip_marks("standard † ‡ §") == "standard"
    assert board.note == ("§ a check triggered, the number may be wrong (see docs/checks.md and bench show RUN): "
                          "standard (run 1: square_beats_whitebox)")


def test_terminal_headers_are_never_cut() -> None:
    board = board_from_summaries("digits", "quick@1", quick_summaries())
    for width in (200, 100, 60):
        console = Console(width=width, record=True)
        console.print(render_rich(board, width))
        text = console.export_text()
        assert "…" not in text, (width, text)
        assert "smoothing" in text and "hycas-small" in text
    narrow = Console(width=100, record=True)
    narrow.print(render_rich(board, 100))
    assert "transposed" in narrow.export_text()
