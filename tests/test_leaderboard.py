"""Leaderboard building and rendering against checked-in golden files.

To regenerate the golden files after an intended change to a renderer:
``BENCH_UPDATE_GOLDEN=1 pytest tests/test_leaderboard.py``, then read the diff.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from bench.errors import BenchError
from bench.results.leaderboard import (Board, board_from_summaries, latex_escape, render, render_csv, render_json,
                                       render_latex, render_markdown)

GOLDEN = Path(__file__).parent / "golden"
RENDERERS = {"md": render_markdown, "tex": render_latex, "csv": render_csv, "json": render_json}


def attack(name: str, norm: str, eps: float, accuracy: float | None) -> dict[str, Any]:
    return {"name": name, "norm": norm, "eps": eps, "accuracy": accuracy}


def summaries() -> list[dict[str, Any]]:
    """Three hand-written run summaries (the keys board_from_summaries reads), deliberately unsorted."""
    return [
        {   # no attack ran: robust accuracy None, ranked last despite the best clean accuracy
            "run_id": 3, "defense": "pgd-at", "dataset": "digits", "n_examples": 450,
            "model": None,
            "clean_accuracy": 0.9933333333333333, "attacks": [], "robust_accuracy": None, "certified": [],
        },
        {
            "run_id": 1, "defense": "standard", "dataset": "digits", "n_examples": 450,
            "model": {"hparams": {"arch": "cnn-small"}, "checkpoint_sha256": "0123456789abcdef" * 4},
            "clean_accuracy": 0.9755555555555555,
            "attacks": [attack("pgd", "Linf", 0.1, 0.1), attack("pgd", "L2", 0.5, 0.3022222222222222)],
            "robust_accuracy": 0.08888888888888889, "certified": [],
        },
        {
            "run_id": 2, "defense": "my_def&co", "dataset": "digits", "n_examples": 450,
            "model": {"hparams": {"arch": "cnn-small"}, "checkpoint_sha256": "fedcba9876543210" * 4},
            "clean_accuracy": 0.9,
            "attacks": [attack("pgd", "Linf", 0.1, 0.6), attack("pgd", "L2", 0.5, 0.5511111111111111)],
            "robust_accuracy": 0.5,
            "certified": [{"certifier": "smoothing", "radius": 0.0, "accuracy": 0.7},
                          {"certifier": "smoothing", "radius": 0.25, "accuracy": 0.4066666666666667}],
        },
    ]


@pytest.fixture
def board() -> Board:
    return board_from_summaries("digits", "pgd@1", summaries())


# -- the board -------------------------------------------------------------------------------
def test_rows_sorted_by_robust_accuracy_with_none_last(board: Board) -> None:
    assert [r["defense"] for r in board.rows] == ["my_def&co", "standard", "pgd-at"]
    assert [r["robust"] for r in board.rows] == [0.5, 0.08888888888888889, None]


def test_columns(board: Board) -> None:
    assert [(c.key, c.title, c.kind) for c in board.columns] == [
        ("defense", "Defense", "text"),
        ("model", "Model", "text"),
        ("clean", "Clean", "accuracy"),
        ("attack:pgd Linf 0.1", "pgd Linf 0.1", "accuracy"),
        ("attack:pgd L2 0.5", "pgd L2 0.5", "accuracy"),
        ("robust", "Robust (worst case)", "accuracy"),
        ("certified:smoothing@0", "smoothing r=0", "accuracy"),
        ("certified:smoothing@0.25", "smoothing r=0.25", "accuracy"),
        ("n", "N", "int"),
    ]
    assert [r["model"] for r in board.rows] == ["cnn-small fedcba98", "cnn-small 01234567", "model"]


def test_ties_broken_by_clean_then_name() -> None:
    base = summaries()[1]
    rows = [dict(base, run_id=i, defense=name, clean_accuracy=clean, robust_accuracy=0.5)
            for i, (name, clean) in enumerate([("b", 0.8), ("a", 0.8), ("c", 0.9)])]
    board = board_from_summaries("digits", "pgd@1", rows)
    assert [r["defense"] for r in board.rows] == ["c", "a", "b"]


def test_zero_robust_accuracy_ranks_above_none() -> None:
    a = dict(summaries()[1], run_id=1, defense="zero", robust_accuracy=0.0)
    b = dict(summaries()[0], run_id=2, defense="none")
    assert [r["defense"] for r in board_from_summaries("d", "p", [b, a]).rows] == ["zero", "none"]


def test_empty_board_renders_headers_only() -> None:
    board = board_from_summaries("digits", "pgd@1", [])
    assert board.rows == ()
    assert render_csv(board) == "Defense,Model,Clean,Robust (worst case),N\n"
    assert json.loads(render_json(board))["rows"] == []


# -- golden files ----------------------------------------------------------------------------
@pytest.mark.parametrize("ext", sorted(RENDERERS))
def test_matches_golden_file(board: Board, ext: str) -> None:
    path = GOLDEN / f"leaderboard.{ext}"
    text = RENDERERS[ext](board)
    if os.environ.get("BENCH_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{path.name} differs; see the module docstring to regenerate"


def test_render_dispatch(board: Board) -> None:
    assert render(board, "md") == render_markdown(board)
    assert render(board, "latex") == render_latex(board)
    assert render(board, "csv") == render_csv(board)
    assert render(board, "json") == render_json(board)
    with pytest.raises(BenchError, match="format"):
        render(board, "html5")


# -- the renderers agree -----------------------------------------------------------------------
def md_rows(text: str) -> list[list[str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    return [[cell.strip() for cell in ln.strip("|").split(" | ")] for ln in lines[2:]]


def latex_rows(text: str) -> list[list[str]]:
    body = text.split("\\midrule\n")[1].split("\\bottomrule")[0]
    rows = []
    for line in body.strip().splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)&", line.removesuffix(r" \\"))]
        rows.append([re.sub(r"^\\textbf\{(.*)\}$", r"\1", c) for c in cells])
    return rows


def test_all_renderers_have_the_same_rows_in_the_same_order(board: Board) -> None:
    payload = json.loads(render_json(board))
    json_rows = payload["rows"]
    csv_rows = list(csv.reader(io.StringIO(render_csv(board))))
    header, csv_body = csv_rows[0], csv_rows[1:]
    md, tex = md_rows(render_markdown(board)), latex_rows(render_latex(board))
    n = len(board.rows)
    assert len(json_rows) == len(csv_body) == len(md) == len(tex) == n == 3
    assert header == [c.title for c in board.columns] == [c["title"] for c in payload["columns"]]
    for i, row in enumerate(board.rows):
        assert json_rows[i]["run_id"] == row["run_id"]
        for j, col in enumerate(board.columns):
            value = row.get(col.key)
            assert json_rows[i][col.key] == value
            if col.kind == "accuracy":
                shown = "-" if value is None else f"{100 * value:.2f}"
                assert md[i][j] == shown
                assert tex[i][j] == shown
                assert csv_body[i][j] == ("" if value is None else repr(value))
                if value is not None:
                    assert float(csv_body[i][j]) == value  # full precision in CSV
            elif col.kind == "int":
                assert md[i][j] == tex[i][j] == csv_body[i][j] == str(value)
            else:
                assert md[i][j] == str(value)
                assert tex[i][j] == latex_escape(str(value))
                assert csv_body[i][j] == str(value)


def test_latex_bolds_the_best_value_of_each_accuracy_column(board: Board) -> None:
    tex = render_latex(board)
    body = tex.split("\\midrule\n")[1].split("\\bottomrule")[0].strip().splitlines()
    raw_cells = [[c.strip() for c in re.split(r"(?<!\\)&", ln.removesuffix(r" \\"))] for ln in body]
    for j, col in enumerate(board.columns):
        values = [r.get(col.key) for r in board.rows]
        bold = [cells[j].startswith(r"\textbf{") for cells in raw_cells]
        if col.kind != "accuracy":
            assert not any(bold), col.key
            continue
        best = max(v for v in values if v is not None)
        assert bold == [v == best for v in values], col.key


def test_latex_escaping() -> None:
    assert latex_escape("my_def&co") == r"my\_def\&co"
    assert latex_escape(r"50% $x$ #1 {a} ~ ^ \ ") == \
        r"50\% \$x\$ \#1 \{a\} \textasciitilde{} \textasciicircum{} \textbackslash{} "
    tex = render_latex(board_from_summaries("digits", "pgd@1", summaries()))
    assert r"my\_def\&co" in tex
    assert "my_def&co" not in tex


def test_markdown_escapes_pipes() -> None:
    rows = [dict(summaries()[1], defense="a|b")]
    md = render_markdown(board_from_summaries("digits", "pgd@1", rows))
    assert r"a\|b" in md
    assert md_rows(md)[0][0] == r"a\|b"
