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
from bench.results.leaderboard import (
    CHECKS,
    DEFENSE,
    MODEL,
    ROBUST,
    RUN_ID,
    Board,
    ColumnKey,
    board_from_summaries,
    latex_escape,
    render_csv,
    render_json,
    render_latex,
    render_markdown,
)
from bench.results.render import render

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
    assert [r[DEFENSE] for r in board.rows] == ["my_def&co", "standard", "pgd-at"]
    assert [r[ROBUST] for r in board.rows] == [0.5, 0.08888888888888889, None]


def test_columns(board: Board) -> None:
    assert [(c.key.id, c.title, c.kind) for c in board.columns] == [
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
    assert [r[MODEL] for r in board.rows] == ["cnn-small fedcba98", "cnn-small 01234567", "model"]


def test_ties_broken_by_clean_then_name() -> None:
    base = summaries()[1]
    rows = [dict(base, run_id=i, defense=name, clean_accuracy=clean, robust_accuracy=0.5)
            for i, (name, clean) in enumerate([("b", 0.8), ("a", 0.8), ("c", 0.9)])]
    board = board_from_summaries("digits", "pgd@1", rows)
    assert [r[DEFENSE] for r in board.rows] == ["c", "a", "b"]


def test_zero_robust_accuracy_ranks_above_none() -> None:
    a = dict(summaries()[1], run_id=1, defense="zero", robust_accuracy=0.0)
    b = dict(summaries()[0], run_id=2, defense="none")
    assert [r[DEFENSE] for r in board_from_summaries("d", "p", [b, a]).rows] == ["zero", "none"]


def test_empty_board_renders_headers_only() -> None:
    board = board_from_summaries("digits", "pgd@1", [])
    assert board.rows == ()
    assert render_csv(board) == ("Defense,Model,Clean,Clean_lo,Clean_hi,Robust (worst case),Robust (worst case)_lo,"
                                 "Robust (worst case)_hi,N\n")
    assert json.loads(render_json(board))["rows"] == []


def medical_summaries() -> list[dict[str, Any]]:
    """Two runs on an imbalanced dataset: BA twins, a repeated attack, certified and ACR columns, and
    the marks (run 1: randomized under a non-adaptive protocol, failed certificate audit)."""
    def attack(eps: float, accuracy: float, balanced: float) -> dict[str, Any]:
        return {"name": "pgd", "norm": "L2", "eps": eps, "accuracy": accuracy, "balanced_accuracy": balanced}

    common = {"dataset": "ham10000", "n_examples": 20, "model": None, "imbalanced": True,
              "config": {"defense_info": {"randomized": True}}}
    return [
        {**common, "run_id": 1, "defense": "rs", "protocol": "pgd@1", "clean_accuracy": 0.8, "balanced_accuracy": 0.5,
         "attacks": [attack(0.5, 0.6, 0.375), attack(0.5 + 1e-12, 0.4, 0.25)],  # the same column name twice
         "robust_accuracy": 0.4, "robust_balanced_accuracy": 0.25,
         "certified": [{"certifier": "smoothing", "radius": 0.25, "accuracy": 0.55}],
         "certificate": [{"certifier": "smoothing", "average_radius": 0.1234}],
         "checks": [{"name": "certified_vs_empirical", "triggered": True, "detail": "unsound"}]},
        {**common, "run_id": 2, "defense": "rs", "protocol": "adaptive@1", "clean_accuracy": 0.7,
         "balanced_accuracy": 0.6, "attacks": [attack(0.5, 0.5, 0.3)], "robust_accuracy": 0.5,
         "robust_balanced_accuracy": 0.3, "certified": [], "certificate": [],
         "checks": [{"name": "randomized", "triggered": True, "detail": "not an audit check"}]},
    ]


def test_imbalanced_board_twins_accuracy_columns_and_marks_rows() -> None:
    board = board_from_summaries("ham10000", "p", medical_summaries())
    assert [(c.key.id, c.title, c.kind) for c in board.columns] == [
        ("defense", "Defense", "text"), ("model", "Model", "text"),
        ("clean", "Clean", "accuracy"), ("clean_ba", "Clean (BA)", "accuracy"),
        ("attack:pgd L2 0.5", "pgd L2 0.5", "accuracy"), ("attack:pgd L2 0.5:ba", "pgd L2 0.5 (BA)", "accuracy"),
        ("attack:pgd L2 0.5#2", "pgd L2 0.5 #2", "accuracy"),
        ("attack:pgd L2 0.5#2:ba", "pgd L2 0.5 #2 (BA)", "accuracy"),
        ("robust", "Robust (worst case)", "accuracy"), ("robust_ba", "Robust (worst case) (BA)", "accuracy"),
        ("certified:smoothing@0.25", "smoothing r=0.25", "accuracy"), ("acr:smoothing", "smoothing ACR", "radius"),
        ("n", "N", "int"),
    ]
    first, second = board.rows
    # adaptive@1 is not marked † but its triggered check (no audit check) is §; ranked by robust
    assert (first[DEFENSE], second[DEFENSE]) == ("rs §", "rs † ‡")
    assert first[CHECKS] == ("randomized",) and second[CHECKS] == ("certified_vs_empirical",)
    repeat = ColumnKey("attack", "pgd", "L2", 0.5, repeat=2)
    assert second[repeat] == 0.4 and second[repeat.twin()] == 0.25 and repeat not in first
    assert second[ColumnKey.acr("smoothing")] == 0.1234 and second[ColumnKey.certified("smoothing", 0.25)] == 0.55
    assert board.note.startswith("† randomized defense") and "‡ certificate audit failed" in board.note
    assert board.note.endswith("§ a check triggered, the number may be wrong (see docs/checks.md and bench show "
                               "RUN): rs (run 2: randomized)")
    assert json.loads(render_json(board))["rows"][1]["attack:pgd L2 0.5#2:ba"] == 0.25


def test_column_keys_are_equal_when_their_names_are() -> None:
    assert ColumnKey("attack", "pgd", "Linf", 0.1) == ColumnKey("attack", "pgd", "Linf", 0.1 + 1e-12)
    assert len({ColumnKey("attack", "pgd", "Linf", 0.1), ColumnKey("attack", "pgd", "Linf", 8 / 255)}) == 2
    assert ColumnKey("clean").twin().id == "clean_ba" and ColumnKey.certified("ibp", 0.5).id == "certified:ibp@0.5"
    assert ColumnKey("attack", "pgd", "Linf", 8 / 255).title == "pgd Linf 8/255"


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
        rows.append([re.sub(r"^\\textbf\{([^}]*)\}", r"\1", c) for c in cells])
    return rows


def test_all_renderers_have_the_same_rows_in_the_same_order(board: Board) -> None:
    payload = json.loads(render_json(board))
    json_rows = payload["rows"]
    csv_rows = list(csv.reader(io.StringIO(render_csv(board))))
    header, csv_body = csv_rows[0], csv_rows[1:]
    md, tex = md_rows(render_markdown(board)), latex_rows(render_latex(board))
    n = len(board.rows)
    assert len(json_rows) == len(csv_body) == len(md) == len(tex) == n == 3
    titles = [h for h in header if not h.endswith(("_lo", "_hi"))]
    assert titles == [c.title for c in board.columns] == [c["title"] for c in payload["columns"]]
    for i, row in enumerate(board.rows):
        assert json_rows[i]["run_id"] == row[RUN_ID]
        by_title = dict(zip(header, csv_body[i]))
        for j, col in enumerate(board.columns):
            value = row.get(col.key)
            assert json_rows[i][col.key.id] == value
            if col.kind == "accuracy":
                shown = "-" if value is None else f"{100 * value:.2f}"
                assert md[i][j].split(" ±")[0] == shown and (value is None) == (" ±" not in md[i][j])
                assert tex[i][j].split(r"\,")[0] == shown and (value is None) == (r"$\pm$" not in tex[i][j])
                assert by_title[col.title] == ("" if value is None else repr(value))
                lo, hi = json_rows[i][f"{col.key.id}_lo"], json_rows[i][f"{col.key.id}_hi"]
                assert (lo is None) == (value is None)
                if value is not None:
                    assert float(by_title[col.title]) == value  # full precision in CSV
                    assert lo <= value <= hi
                    assert (float(by_title[f"{col.title}_lo"]), float(by_title[f"{col.title}_hi"])) == (lo, hi)
                    assert float(md[i][j].split(" ±")[1]) == round(100 * max(value - lo, hi - value), 1)
            elif col.kind == "int":
                assert md[i][j] == tex[i][j] == by_title[col.title] == str(value)
            else:
                assert md[i][j] == str(value)
                assert tex[i][j] == latex_escape(str(value))
                assert by_title[col.title] == str(value)


def test_latex_bolds_the_best_value_of_each_accuracy_column_with_values_to_compare(board: Board) -> None:
    tex = render_latex(board)
    body = tex.split("\\midrule\n")[1].split("\\bottomrule")[0].strip().splitlines()
    raw_cells = [[c.strip() for c in re.split(r"(?<!\\)&", ln.removesuffix(r" \\"))] for ln in body]
    for j, col in enumerate(board.columns):
        values = [r.get(col.key) for r in board.rows]
        bold = [cells[j].startswith(r"\textbf{") for cells in raw_cells]
        if col.kind != "accuracy":
            assert not any(bold), col.key
            continue
        present = [v for v in values if v is not None]
        if len(present) < 2:  # nothing to compare: no bold (a one-row board has none)
            assert not any(bold), col.key
            continue
        assert bold == [v == max(present) for v in values], col.key


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
