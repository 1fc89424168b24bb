"""The README's main job on the embedded digits dataset: PGD adversarial training must beat
standard training under PGD at the dataset's default eps, on the leaderboard too. (The main job's
default protocol is AutoAttack standard, about ten minutes on two cores; the suite runs the same
models under ``--protocol pgd``. benchmarks/main_job.py times the default.)"""

from __future__ import annotations

import json

from typer.testing import CliRunner

from bench.cli import app

runner = CliRunner()


def test_pgd_at_beats_standard_on_digits(db_url):
    results = {}
    for defense in ("standard", "pgd-at"):
        args = ["run", "--defense", defense, "--dataset", "digits", "--protocol", "pgd", "--db", db_url, "--json"]
        out = runner.invoke(app, args)
        assert out.exit_code == 0, out.stderr
        results[defense] = json.loads(out.stdout)
    for summary in results.values():
        assert summary["n_examples"] == 450
        assert summary["clean_accuracy"] > 0.9  # both models learn the task
        assert [(a["norm"], a["eps"]) for a in summary["attacks"]] == [("Linf", 0.1), ("L2", 0.5)]
    linf = {d: s["attacks"][0]["accuracy"] for d, s in results.items()}
    assert linf["pgd-at"] > linf["standard"] + 0.1, linf
    assert results["pgd-at"]["robust_accuracy"] > results["standard"]["robust_accuracy"]

    board = runner.invoke(app, ["leaderboard", "--dataset", "digits", "--format", "json", "--db", db_url])
    rows = json.loads(board.stdout)["rows"]
    assert [r["defense"] for r in rows] == ["pgd-at", "standard"]
