"""The LaTeX leaderboard fits a two-column paper: compiled with pdflatex (skipped when absent).

The boards are built from hand-made summaries, as in tests/test_leaderboard.py: a 9-column board
and the 13-column board of the seed defenses under quick@1."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from test_leaderboard import summaries

from bench.errors import BenchError
from bench.results.leaderboard import Board, LatexOptions, board_from_summaries, latex_layout, render_latex
from bench.results.render import render

PDFLATEX = shutil.which("pdflatex")
needs_pdflatex = pytest.mark.skipif(PDFLATEX is None, reason="pdflatex not installed")


def quick_summaries() -> list[dict[str, Any]]:
    """Seed defenses under quick@1: 4 attack columns, robust, 3 certified radii and an ACR: 13 columns."""
    def attacks(acc: float) -> list[dict[str, Any]]:
        return [{"name": name, "norm": norm, "eps": eps, "accuracy": acc}
                for norm, eps in (("Linf", 0.1), ("L2", 0.5)) for name in ("eot", "square")]

    def certified(accs: list[float]) -> list[dict[str, Any]]:
        return [{"certifier": "smoothing", "radius": r, "accuracy": a} for r, a in zip((0.0, 0.25, 0.5), accs)]

    rows = [("hycas", "hycas-small d25f404c", 0.865, 0.615, [0.805, 0.62, 0.335], 0.354),
            ("rs", "cnn-small 787a37dd", 0.975, 0.69, [0.965, 0.84, 0.49], 0.459),
            ("dds-rcs", "cnn-small ec334319", 0.96, 0.77, [0.955, 0.875, 0.615], 0.501),
            ("standard", None, 0.965, 0.47, [], None)]
    return [{"run_id": i, "defense": name, "dataset": "digits", "n_examples": 200, "protocol": "quick@1",
             "model": {"hparams": {"arch": model.split()[0]}, "checkpoint_sha256": model.split()[1] * 8}
             if model else None,
             "clean_accuracy": clean, "attacks": attacks(robust + 0.02), "robust_accuracy": robust,
             "certified": certified(cert), "certificate": [{"certifier": "smoothing", "average_radius": acr}]
             if acr is not None else []}
            for i, (name, model, clean, robust, cert, acr) in enumerate(rows, 1)]


def nine_column_board() -> Board:
    return board_from_summaries("digits", "pgd@1", summaries())


def quick_board() -> Board:
    return board_from_summaries("digits", "quick@1", quick_summaries())


def compile_log(tmp_path: Path, body: str) -> str:
    """pdflatex's log of ``body`` inside a minimal two-column article."""
    (tmp_path / "paper.tex").write_text("\\documentclass[twocolumn]{article}\n\\usepackage{booktabs,graphicx}\n"
                                        "\\begin{document}\nSome text of the paper.\n\n" + body +
                                        "\nMore text of the paper.\n\\end{document}\n")
    done = subprocess.run([PDFLATEX, "-interaction=nonstopmode", "-halt-on-error", "paper.tex"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    log = (tmp_path / "paper.log").read_text(errors="replace")
    assert done.returncode == 0, log[-3000:]
    return log


def test_the_quick_board_has_13_columns_and_auto_chooses_by_column_count() -> None:
    assert len(quick_board().columns) == 13 and len(nine_column_board().columns) == 9
    assert latex_layout(quick_board()) == "wide" and latex_layout(nine_column_board()) == "wide"
    small = board_from_summaries("digits", "pgd@1", [dict(summaries()[0], attacks=[])])
    assert latex_layout(small) == "narrow"
    many = [dict(s, certified=[{"certifier": "smoothing", "radius": r / 4, "accuracy": 0.5} for r in range(8)])
            for s in quick_summaries()]
    assert latex_layout(board_from_summaries("digits", "quick@1", many)) == "transposed"


@needs_pdflatex
def test_the_overfull_check_can_fail(tmp_path: Path) -> None:
    too_wide = "\\begin{tabular}{" + "r" * 30 + "}\n" + " & ".join(["99.99"] * 30) + " \\\\\n\\end{tabular}\n"
    assert "Overfull \\hbox" in compile_log(tmp_path, too_wide)


@needs_pdflatex
@pytest.mark.parametrize("layout", ["auto", "wide", "narrow", "transposed"])
@pytest.mark.parametrize("make_board", [nine_column_board, quick_board], ids=["9-columns", "quick@1-13-columns"])
def test_compiles_in_a_two_column_paper_without_overfull_box(tmp_path: Path, make_board: Any, layout: str) -> None:
    log = compile_log(tmp_path, render_latex(make_board(), LatexOptions(layout)))
    assert "Overfull \\hbox" not in log, log[log.find("Overfull"):][:500]


def test_math_headers_caption_label_and_environment() -> None:
    tex = render_latex(quick_board())
    assert r"$\ell_\infty$" in tex and r"$\ell_2$" in tex and r"$\epsilon = 0.1$" in tex
    assert r"certified at $r = 0.5$" in tex and "Linf" not in tex
    assert r"\begin{table*}" in tex and r"\caption{digits: accuracy (\%) under protocol quick@1.}" in tex
    assert r"\label{tab:leaderboard-digits}" in tex
    narrow = render_latex(quick_board(), LatexOptions("narrow", caption="My 50% board", label="tab:mine"))
    assert r"\begin{table}[t]" in narrow and r"\caption{My 50\% board}" in narrow and r"\label{tab:mine}" in narrow
    assert render(quick_board(), "latex", LatexOptions("narrow", "My 50% board", "tab:mine")) == narrow
    with pytest.raises(BenchError, match="layout"):
        render_latex(quick_board(), LatexOptions("tiny"))


def test_transposed_puts_defenses_in_columns() -> None:
    tex = render_latex(quick_board(), LatexOptions("transposed"))
    body = tex.split("\\midrule\n")[1].split("\\bottomrule")[0].strip().splitlines()
    assert len(body) == 11  # every column but Defense and Model, one line each
    assert body[0].startswith("Clean & ") and body[-1] == "N & 200 & 200 & 200 & 200 \\\\"
    assert tex.split("\\midrule")[0].count("dds-rcs") == 1  # the header names each defense once
    assert r"\textbf{97.50}" in body[0]  # rs has the best clean accuracy, bold along the row


def test_bold_only_where_a_column_has_values_to_compare() -> None:
    one_row = render_latex(board_from_summaries("digits", "pgd@1", [summaries()[1]]))
    assert r"\textbf" not in one_row
    tex = render_latex(nine_column_board())
    assert r"\textbf{70.00}" not in tex  # a certified column with a single value
    assert r"\textbf{99.33}" in tex
