"""The HTML leaderboard, checked in a real headless browser (Debian's chromium; skipped when absent).

The page is loaded from a file, its scripts run, and the rendered DOM is read back
(``chromium --headless --dump-dom``); a sort is scripted by appending a call to the page's own
sort function, as a click on the header would."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from test_leaderboard import medical_summaries, summaries

from bench.results.html import render_html
from bench.results.leaderboard import DEFENSE, MODEL, RUN_ID, Board, N, board_from_summaries, cell_with_interval
from bench.results.render import render

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")


class Rows(HTMLParser):
    """The body rows of the board table: (data-kind, [cell texts]) in DOM order, and the header titles;
    the text of a <details> element (the last cell) is left out."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[str, list[str]]] = []
        self.headers: list[str] = []
        self._in_body = self._in_cell = self._in_details = False
        self._cell: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.rows.append((dict(attrs).get("data-kind") or "", []))
        elif tag in ("td", "th"):
            self._in_cell, self._cell = True, []
        elif tag == "details":
            self._in_details = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "tbody":
            self._in_body = False
        elif tag == "details":
            self._in_details = False
        elif tag in ("td", "th") and self._in_cell:
            self._in_cell = False
            text = "".join(self._cell).strip()
            if tag == "th" and not self._in_body:
                self.headers.append(text)
            elif self._in_body:
                self.rows[-1][1].append(text)

    def handle_data(self, data: str) -> None:
        if self._in_cell and not self._in_details:
            self._cell.append(data)


def dom(tmp_path: Path, html: str, script: str = "") -> Rows:
    """The rendered DOM of ``html`` (with ``script`` run after the page's own), parsed."""
    page = tmp_path / "board.html"
    page.write_text(html.replace("</body>", f"<script>{script}</script>\n</body>") if script else html,
                    encoding="utf-8")
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "<tbody>" in done.stdout, done.stderr[-2000:]
    parser = Rows()
    parser.feed(done.stdout)
    return parser


def expected_rows(board: Board) -> list[list[str]]:
    return [[cell_with_interval(c, row) for c in board.columns] for row in board.rows]


@pytest.fixture
def board() -> Board:
    return board_from_summaries("digits", "pgd@1", summaries())


def with_published(board: Board) -> Board:
    """``board`` with a published row and a difference row under its second row, as references.py adds them."""
    second = board.rows[1]
    published = {DEFENSE: "standard (published, authors' protocol)", MODEL: "Table 1", RUN_ID: None, N: None,
                  board.columns[2].key: 0.99}
    delta = {DEFENSE: "standard Δ measured − published", MODEL: "Table 1", RUN_ID: None, N: None,
             board.columns[2].key: second[board.columns[2].key] - 0.99}
    rows = (board.rows[0], second, published, delta, *board.rows[2:])
    return Board(board.dataset, board.protocol, board.columns, rows, board.note)


@needs_chromium
def test_the_browser_shows_the_rows_of_the_board(tmp_path: Path, board: Board) -> None:
    page = dom(tmp_path, render(board, "html"))
    assert page.headers[:len(board.columns)] == [c.title for c in board.columns]
    assert [cells[:-1] for _, cells in page.rows] == expected_rows(board)  # the last cell: details
    assert [kind for kind, _ in page.rows] == ["measured"] * 3


@needs_chromium
def test_a_click_on_a_header_sorts_and_a_second_reverses(tmp_path: Path, board: Board) -> None:
    clean = [c.key for c in board.columns].index(board.columns[2].key)
    once = dom(tmp_path, render_html(board), f"benchSortBy({clean});")
    assert [cells[0] for _, cells in once.rows] == ["pgd-at", "standard", "my_def&co"]  # clean, descending
    twice = dom(tmp_path, render_html(board), "document.querySelectorAll('#board thead th')[2].click();"
                                              "document.querySelectorAll('#board thead th')[2].click();")
    assert [cells[0] for _, cells in twice.rows] == ["my_def&co", "standard", "pgd-at"]
    robust = [c.key.id for c in board.columns].index("robust")
    by_robust = dom(tmp_path, render_html(board), f"benchSortBy({robust}); benchSortBy({robust});")
    assert [cells[0] for _, cells in by_robust.rows] == ["standard", "my_def&co", "pgd-at"]  # "-" stays last


@needs_chromium
def test_published_rows_are_marked_and_move_with_their_measured_row(tmp_path: Path, board: Board) -> None:
    published = with_published(board)
    page = dom(tmp_path, render_html(published), "benchSortBy(0);")  # by defense name, ascending
    assert [(kind, cells[0]) for kind, cells in page.rows] == [
        ("measured", "my_def&co"), ("measured", "pgd-at"), ("measured", "standard"),
        ("published", "standard (published, authors' protocol)"), ("difference", "standard Δ measured − published")]


def test_self_contained_escaped_with_legend_curves_and_details(board: Board) -> None:
    html = render_html(board)
    assert "<link" not in html and " src=" not in html and "@import" not in html
    assert html.count("http") == 1 and 'xmlns="http://www.w3.org/2000/svg"' in html  # a namespace, never fetched
    assert "my_def&amp;co" in html and "<polyline" in html and "certified accuracy of smoothing" in html
    medical = render_html(board_from_summaries("ham10000", "pgd@1", medical_summaries()))
    assert "<li>‡ certificate audit failed" in medical and "rs † ‡" in medical and "rs §" in medical
    assert "<dt>protocol</dt><dd>pgd@1</dd>" in medical.replace("\n", "").replace("    ", "")
    hostile = board_from_summaries("digits", "pgd@1", [dict(summaries()[1], defense="<script>alert(1)</script>")])
    assert "<script>alert(1)" not in render_html(hostile) and "&lt;script&gt;alert(1)" in render_html(hostile)
