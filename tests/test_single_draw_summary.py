"""The single-draw headline of randomized runs (issue 18): per-example values, cascade minima,
intervals, JSON keys, the CLI run table and the leaderboard cells."""

from __future__ import annotations

import math
from typing import Any, cast

import pytest

from bench.results.intervals import clopper_pearson, mean_interval, single_draw_interval
from bench.results.schema import EvalKind
from bench.results.summary import Outcome, Stage, attack_table

CLEAN, ATTACK = EvalKind.CLEAN, EvalKind.ATTACK
R = 10


def row(i: int, correct_draws: int, draws: int = R) -> Outcome:
    """Example ``i`` (label 0) with ``correct_draws`` of ``draws`` correct; the vote is correct
    only with a strict majority of correct draws."""
    return Outcome(i, correct_draws == draws, label=0, prediction=0 if 2 * correct_draws > draws else 1,
                   draws=draws, correct_draws=correct_draws)


@pytest.fixture
def randomized() -> tuple[list[Stage], dict[int, list[Outcome]], int]:
    """n=5, R=10. Correct draws per example (no row: not attacked):
    clean 10, 7, 0, 5, (none for 4); Linf pgd 8, 9, -, 2; Linf square 10, 3, -, -; L2 pgd 4, 10, -, 5."""
    stages = [Stage(1, 0, CLEAN, "clean", None, None), Stage(2, 1, ATTACK, "pgd", "Linf", 0.1),
              Stage(3, 2, ATTACK, "square", "Linf", 0.1), Stage(4, 3, ATTACK, "pgd", "L2", 0.5)]
    outcomes = {1: [row(0, 10), row(1, 7), row(2, 0), row(3, 5)],
                2: [row(0, 8), row(1, 9), row(3, 2)],
                3: [row(0, 10), row(1, 3)],
                4: [row(0, 4), row(1, 10), row(3, 5)]}
    return stages, outcomes, 5


def test_single_draw_means_follow_the_cascade_minimum(randomized) -> None:
    table = attack_table(*randomized)
    # clean values 1, .7, 0, .5, 0 (no row)
    assert table["clean_single_draw"]["accuracy"] == pytest.approx(2.2 / 5)
    # Linf: pgd min(1,.8), min(.7,.9), 0, min(.5,.2) -> square min(.8,1), min(.7,.3), 0, 0 (no row)
    # L2: min(1,.4), min(.7,1), 0, min(.5,.5)
    singles = [a["single_draw"]["accuracy"] for a in table["attacks"]]
    assert singles == pytest.approx([1.7 / 5, 1.1 / 5, 1.6 / 5])
    threats = {(t["norm"], t["eps"]): t["robust_single_draw"]["accuracy"] for t in table["threat_models"]}
    assert threats == pytest.approx({("Linf", 0.1): 1.1 / 5, ("L2", 0.5): 1.6 / 5})
    robust = table["robust_single_draw"]
    assert robust is not None and robust["accuracy"] == pytest.approx((0.4 + 0.3) / 5)  # per-example min
    assert robust["draws"] == R and table["clean_single_draw"]["draws"] == R


def test_majority_and_worst_of_r_beside_it(randomized) -> None:
    table = attack_table(*randomized)
    assert table["clean_draws"]["majority"] == pytest.approx(2 / 5)
    # votes: clean 1,1,0,0; Linf pgd 1,1,-,0; square 1,0; L2 pgd 0,1,-,0
    assert [a["cumulative_majority"] for a in table["attacks"]] == pytest.approx([2 / 5, 1 / 5, 1 / 5])
    assert table["robust_majority"] == pytest.approx(0.0)
    # existing keys keep their meaning: worst of R (only example 0 is correct on every clean draw)
    assert table["clean_accuracy"] == pytest.approx(1 / 5)
    assert [a["accuracy"] for a in table["attacks"]] == pytest.approx([0.0, 0.0, 0.0])
    assert table["robust_accuracy"] == 0.0


def test_single_draw_interval_is_the_t_interval_over_examples(randomized) -> None:
    values = [1.0, 0.7, 0.0, 0.5, 0.0]
    mean = sum(values) / 5
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / 4)
    half = 2.7764451051977987 * s / math.sqrt(5)  # t_{0.975, 4} from a table
    lo, hi = attack_table(*randomized)["clean_single_draw"]["interval"] or [math.nan, math.nan]
    assert (lo, hi) == pytest.approx((max(0.0, mean - half), min(1.0, mean + half)))


def test_mean_interval_by_hand() -> None:
    values = [0.2, 0.4, 0.6, 0.8, 1.0, 0.5]
    mean = 3.5 / 6
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / 5)
    half = 2.570581835636314 * s / math.sqrt(6)  # t_{0.975, 5}
    assert mean_interval(values) == pytest.approx((mean - half, mean + half))
    # all equal: no variance estimate, so never a zero-width interval but Clopper-Pearson's
    assert mean_interval([1.0] * 32) == pytest.approx(clopper_pearson(32, 32))
    assert mean_interval([0.0] * 32)[1] > 0.1
    lo, hi = mean_interval([0.3, 0.3, 0.3])
    assert lo < 0.3 < hi
    assert mean_interval([]) is None
    assert mean_interval([0.4]) == (0.0, 1.0)  # one value: no variance estimate
    lo, hi = mean_interval([0.0, 1.0, 1.0, 1.0]) or (math.nan, math.nan)
    assert lo >= 0.0 and hi == 1.0  # clipped


def test_one_draw_rows_get_the_clopper_pearson_interval() -> None:
    stages = [Stage(1, 0, CLEAN, "clean", None, None), Stage(2, 1, ATTACK, "pgd", "Linf", 0.1)]
    outcomes = {1: [Outcome(i, i < 7) for i in range(10)], 2: [Outcome(i, i < 4) for i in range(7)]}
    table = attack_table(stages, outcomes, 10)
    assert table["clean_single_draw"]["accuracy"] == table["clean_accuracy"] == pytest.approx(0.7)
    assert table["clean_single_draw"]["interval"] == pytest.approx(list(clopper_pearson(7, 10)))
    assert table["clean_single_draw"]["draws"] == 1
    robust = table["robust_single_draw"]
    assert robust is not None and robust["accuracy"] == table["robust_accuracy"] == pytest.approx(0.4)
    assert robust["interval"] == pytest.approx(list(clopper_pearson(4, 10)))
    # a single row with R > 1 anywhere in the cascade switches to the t interval
    outcomes[2][0] = Outcome(0, False, draws=R, correct_draws=6)
    mixed = attack_table(stages, outcomes, 10)["attacks"][0]["single_draw"]
    assert mixed["accuracy"] == pytest.approx(3.6 / 10)
    assert mixed["interval"] == pytest.approx(list(single_draw_interval([0.6, 1, 1, 1, 0, 0, 0, 0, 0, 0], False)))


def test_no_examples_and_no_attacks() -> None:
    table = attack_table([Stage(1, 0, CLEAN, "clean", None, None)], {}, 0)
    assert table["clean_single_draw"] == {"accuracy": None, "interval": None, "draws": 1}
    assert table["robust_single_draw"] is None and table["robust_majority"] is None
    assert attack_table([], {}, 3)["clean_single_draw"]["accuracy"] is None  # no clean stage


def _conforms(record: dict, typed: type) -> None:
    keys = set(record)
    assert typed.__required_keys__ <= keys, (typed.__name__, sorted(typed.__required_keys__ - keys))
    assert keys <= typed.__required_keys__ | typed.__optional_keys__, (typed.__name__, sorted(keys))


def test_json_keys_are_added_and_typed(randomized) -> None:
    from bench.results import types

    table = attack_table(*randomized)
    _conforms(dict(table), types.AttackTable)
    for block in (table["clean_single_draw"], table["robust_single_draw"],
                  *(a["single_draw"] for a in table["attacks"]),
                  *(t["robust_single_draw"] for t in table["threat_models"])):
        assert block is not None
        _conforms(dict(block), types.SingleDraw)
    for attack in table["attacks"]:
        _conforms(dict(attack), types.AttackRow)
    for threat in table["threat_models"]:
        _conforms(dict(threat), types.ThreatRow)


def summary_of(stages: list[Stage], outcomes: dict[int, list[Outcome]], n: int, **extra: Any) -> Any:
    """A run summary around :func:`attack_table` (the keys the renderers read)."""
    table = attack_table(stages, outcomes, n)
    return cast(Any, {"run_id": 1, "defense": "dcs", "dataset": "digits", "protocol": "quick@2", "n_examples": n,
                      "certified": [], "checks": [], "model": None, "imbalanced": False, "task": "multiclass",
                      "config": {}, "provenance": {}, **table, **extra})


def table_text(summary: Any) -> str:
    from rich.console import Console

    from bench.cli.output import summary_table

    console = Console(width=250, record=True)
    console.print(summary_table(summary))
    return console.export_text()


def test_cli_table_of_a_randomized_run_shows_the_labelled_columns(randomized) -> None:
    text = table_text(summary_of(*randomized))
    assert "Accuracy (single draw, 95% CI)" in text and "all 10 draws" in text and "majority of 10" in text
    lo, hi = attack_table(*randomized)["clean_single_draw"]["interval"] or [0.0, 0.0]
    clean_line = next(line for line in text.splitlines() if line.strip("│ ").startswith("clean"))
    assert f"44.0% [{100 * lo:.1f}, {100 * hi:.1f}]" in clean_line
    assert "20.00%" in clean_line and "40.00%" in clean_line  # all 10 draws, majority of 10
    robust_line = next(line for line in text.splitlines() if "robust (worst case)" in line)
    assert "14.0% [" in robust_line and robust_line.count("0.00%") == 2


def test_cli_table_of_an_exact_enumeration_omits_worst_and_majority() -> None:
    stages = [Stage(1, 0, CLEAN, "clean", None, None)]
    outcomes = {1: [row(0, 270, 300), row(1, 300, 300), row(2, 150, 300)]}
    exact = {"protocol": {"name": "quick", "version": 2, "exact_draws": True}}
    text = table_text(summary_of(stages, outcomes, 3, robust_accuracy=None, config=exact))
    assert "single-draw (exact over 300 draws)" in text
    assert "all 300 draws" not in text and "majority of" not in text
    assert "80.0% [" in text
    sampled = table_text(summary_of(stages, outcomes, 3, robust_accuracy=None))  # 300 sampled draws
    assert "all 300 draws" in sampled and "exact" not in sampled


def test_the_board_shows_no_worst_of_r_for_an_exact_enumeration(randomized) -> None:
    from bench.results.leaderboard import WORST_OF_R, _row

    exact = {"protocol": {"name": "quick", "version": 2, "exact_draws": True}}
    assert _row(summary_of(*randomized, config=exact, robust_accuracy=0.0), "")[WORST_OF_R] is None
    assert _row(summary_of(*randomized, robust_accuracy=0.0), "")[WORST_OF_R] == 0.0


def test_cli_table_of_a_deterministic_run_is_unchanged() -> None:
    stages = [Stage(1, 0, CLEAN, "clean", None, None), Stage(2, 1, ATTACK, "pgd", "Linf", 0.1)]
    outcomes = {1: [Outcome(i, i < 3) for i in range(4)], 2: [Outcome(i, i < 1) for i in range(3)]}
    text = table_text(summary_of(stages, outcomes, 4))
    assert "Accuracy" in text and "single draw" not in text and "draws" not in text and "[" not in text
    assert "75.00%" in text and "25.00%" in text


def test_leaderboard_headline_of_a_randomized_row_is_single_draw(randomized) -> None:
    from bench.results.leaderboard import (
        CLEAN as CLEAN_COL,
        DEFENSE,
        ROBUST,
        WORST_OF_R,
        ColumnKey,
        board_from_summaries,
        interval,
        render_markdown,
    )

    stages, outcomes, n = randomized
    deterministic = [Stage(1, 0, CLEAN, "clean", None, None), Stage(2, 1, ATTACK, "pgd", "Linf", 0.1),
                     Stage(4, 3, ATTACK, "pgd", "L2", 0.5)]
    det_outcomes = {1: [Outcome(i, i < 2) for i in range(5)], 2: [Outcome(0, True), Outcome(1, False)],
                    4: [Outcome(0, False), Outcome(1, True)]}
    rand = summary_of(stages, outcomes, n)
    det = summary_of(deterministic, det_outcomes, n, run_id=2, defense="pgd-at")
    board = board_from_summaries("digits", "quick@2", [det, rand])
    titles = [c.title for c in board.columns]
    assert "Robust (all R draws)" in titles and titles.index("Robust (all R draws)") == titles.index(ROBUST.title) + 1
    by_defense = {r[DEFENSE]: r for r in board.rows}
    row = by_defense["dcs"]
    assert row[CLEAN_COL] == pytest.approx(2.2 / 5) and row[ROBUST] == pytest.approx(0.7 / 5)
    assert row[ColumnKey("attack", "square", "Linf", 0.1)] == pytest.approx(1.1 / 5)
    assert row[WORST_OF_R] == 0.0  # the stricter figure beside it
    column = next(c for c in board.columns if c.key == ROBUST)
    assert interval(column, row) == pytest.approx(tuple(rand["robust_single_draw"]["interval"]))
    assert by_defense["pgd-at"][ROBUST] == 0.0  # deterministic: worst case, unchanged
    # ranked by the headline (0.14 > 0); by worst of R the tie would go to pgd-at's clean 40% > 20%
    assert [r[DEFENSE] for r in board.rows] == ["dcs", "pgd-at"]
    assert "single-draw" in board.note and "R = 10" in board.note
    text = render_markdown(board)
    assert "Robust (all R draws)" in text and "Student-t" in text


def test_deterministic_board_has_no_worst_of_r_column() -> None:
    from bench.results.leaderboard import board_from_summaries

    stages = [Stage(1, 0, CLEAN, "clean", None, None), Stage(2, 1, ATTACK, "pgd", "Linf", 0.1)]
    outcomes = {1: [Outcome(i, i < 3) for i in range(4)], 2: [Outcome(i, i < 1) for i in range(3)]}
    board = board_from_summaries("digits", "pgd@1", [summary_of(stages, outcomes, 4)])
    assert "Robust (all R draws)" not in [c.title for c in board.columns] and "single-draw" not in board.note
