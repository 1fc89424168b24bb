"""`bench leaderboard --rank-by`: certified boards ranked at a chosen radius; ACR never ranks."""

from __future__ import annotations

from typing import Any

import pytest

from bench.errors import BenchError
from bench.results.leaderboard import board_from_summaries


def rs_summary() -> dict[str, Any]:
    return {"run_id": 7, "defense": "rs", "dataset": "cifar10", "n_examples": 100, "model": None,
            "clean_accuracy": 0.7, "attacks": [], "robust_accuracy": None, "certified": []}

def test_rank_by_certified_accuracy_at_a_radius() -> None:
    from bench.results.leaderboard import RUN_ID
    from bench.results.ranking import rank_board

    a = {**rs_summary(), "run_id": 1, "defense": "a", "clean_accuracy": 0.9,
         "certified": [{"certifier": "smoothing", "radius": 0.25, "accuracy": 0.3},
                       {"certifier": "smoothing", "radius": 0.5, "accuracy": 0.2}],
         "certificate": [{"certifier": "smoothing", "average_radius": 0.9}]}
    b = {**rs_summary(), "run_id": 2, "defense": "b", "clean_accuracy": 0.5,
         "certified": [{"certifier": "smoothing", "radius": 0.25, "accuracy": 0.4},
                       {"certifier": "smoothing", "radius": 0.5, "accuracy": 0.1}],
         "certificate": [{"certifier": "smoothing", "average_radius": 0.2}]}
    board = board_from_summaries("cifar10", "certify@1", [a, b])
    assert [r[RUN_ID] for r in board.rows] == [1, 2]  # default: robust (none here), then clean
    assert rank_board(board) == board
    at25 = rank_board(board, "certified@0.25")
    assert [r[RUN_ID] for r in at25.rows] == [2, 1] and at25.note.startswith("ranked by smoothing r=0.25")
    assert [r[RUN_ID] for r in rank_board(board, "certified:smoothing@0.5").rows] == [1, 2]
    for bad, fragment in [("acr", "never ranks"), ("certified@0.3", "no certified column at radius 0.3"),
                          ("certified@x", "invalid --rank-by"), ("bogus", "invalid --rank-by"),
                          ("certified:other@0.25", "no certified column")]:
        with pytest.raises(BenchError, match=fragment):
            rank_board(board, bad)
