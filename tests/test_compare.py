"""`bench compare` (per-example differences and McNemar's exact test) and `bench delete`, on runs
built by hand in the store (nothing trained)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.errors import BenchError
from bench.results.compare import compare_runs, delete_run
from bench.results.intervals import mcnemar_exact
from bench.results.schema import EvalKind
from bench.results.store import Store
from helpers import assert_cli_user_error

runner = CliRunner()


def _row(i: int, correct: bool, radius: float | None = None) -> dict[str, Any]:
    return {"example_index": i, "label": 0, "prediction": 0 if correct else 1, "correct": correct, "radius": radius,
            "abstained": False, "samples_used": None, "draws": 1, "correct_draws": None, "perturbation_norm": None}


def _run(store: Store, key: str, indices: list[int], clean: set[int], robust: set[int],
         certified: set[int] | None = None, checkpoint: Path | None = None) -> int:
    """A finished run: clean-correct ``clean``; one L2 PGD stage with rows for the clean-correct
    examples, ``robust`` surviving; optionally a certification stage correct on ``certified``."""
    model_id = store.upsert_model(f"model-{key}", defense="standard", dataset="synthetic", source="trained",
                                  checkpoint_path=str(checkpoint) if checkpoint else None)
    run_id = store.create_run(key, model_id=model_id, defense="standard", dataset="synthetic", protocol="custom",
                              protocol_version=1, seed=0, n_examples=len(indices), indices=indices,
                              indices_hash="h-" + "-".join(map(str, indices)), config={})
    stages: list[tuple[EvalKind, str, list[dict[str, Any]], dict[str, Any]]] = [
        (EvalKind.CLEAN, "clean", [_row(i, i in clean) for i in indices], {}),
        (EvalKind.ATTACK, "pgd", [_row(i, i in robust) for i in indices if i in clean], {"norm": "L2", "eps": 0.5})]
    if certified is not None:
        stages.append((EvalKind.CERTIFY, "smoothing", [_row(i, i in certified, 0.3) for i in indices],
                       {"sigma": 0.25}))
    for position, (kind, method, rows, kw) in enumerate(stages):
        ev = store.evaluation(run_id, position, kind, method, **kw)
        store.add_results(ev, rows)
        store.finish_evaluation(ev)
    store.set_check(run_id, "gradient_masking", False, "ok")
    store.finish_run(run_id)
    return run_id


@pytest.fixture
def store(db_url: str) -> Store:
    return Store(db_url, create=True)


def test_per_stage_differences_and_mcnemar(store: Store) -> None:
    a = _run(store, "a", list(range(10)), clean=set(range(9)), robust={0, 1, 2, 3, 4, 5}, certified={0, 1})
    b = _run(store, "b", list(range(10)), clean=set(range(1, 10)), robust={7, 8}, certified={0, 1})
    comparison = compare_runs(store, a, b)
    assert comparison.common == 10 and comparison.note == "" and comparison.to_dict()["same_examples"]
    clean, l2, cert = comparison.stages
    assert (clean.stage, clean.correct_a, clean.correct_b, clean.only_a, clean.only_b) == ("clean", 9, 9, (0,), (9,))
    assert clean.p_value == 1.0
    # robust: A {0..5} (all clean-correct), B {7, 8}
    assert (l2.stage, l2.only_a, l2.only_b) == ("L2 0.5", (0, 1, 2, 3, 4, 5), (7, 8))
    assert l2.p_value == pytest.approx(mcnemar_exact(6, 2)) and l2.p_value == pytest.approx(2 * 37 / 256)
    assert (cert.stage, cert.only_a, cert.only_b, cert.p_value) == ("smoothing@2", (), (), 1.0)


def test_different_example_sets_compare_on_the_intersection(store: Store) -> None:
    a = _run(store, "a", [0, 1, 2, 3], clean={0, 1, 2, 3}, robust={0, 1}, certified={0})
    b = _run(store, "b", [2, 3, 4, 5], clean={2, 4}, robust={2})
    comparison = compare_runs(store, a, b)
    assert (comparison.common, comparison.only_in_a, comparison.only_in_b) == (2, 2, 2)
    assert "different example sets: compared on the 2 examples both evaluated" in comparison.note
    assert f"stages only in run {a}: smoothing@2" in comparison.note
    clean = comparison.stages[0]
    assert (clean.n, clean.correct_a, clean.correct_b, clean.only_a, clean.only_b) == (2, 2, 1, (3,), ())
    c = _run(store, "c", [7, 8], clean={7}, robust=set())
    with pytest.raises(BenchError, match="share no evaluated example"):
        compare_runs(store, a, c)
    with pytest.raises(BenchError, match="two different runs"):
        compare_runs(store, a, a)


def test_cli_compare_table_and_json(store: Store, db_url: str) -> None:
    a = _run(store, "a", list(range(6)), clean=set(range(6)), robust={0, 1, 2, 3})
    b = _run(store, "b", list(range(6)), clean=set(range(6)), robust={4})
    out = runner.invoke(app, ["compare", str(a), str(b), "--db", db_url, "--json"])
    assert out.exit_code == 0, out.stderr
    payload = json.loads(out.stdout)
    assert payload["same_examples"] and payload["stages"][1]["only_a"] == [0, 1, 2, 3]
    assert payload["stages"][1]["only_b"] == [4] and payload["stages"][1]["p_value"] == pytest.approx(0.375)
    table = runner.invoke(app, ["compare", str(a), str(b), "--db", db_url])
    assert table.exit_code == 0 and "McNemar p" in table.stdout and "0.375" in table.stdout
    assert_cli_user_error(runner.invoke(app, ["compare", str(a), "99", "--db", db_url]), "no run with id 99")


def test_delete_removes_the_run_and_its_rows_but_not_the_model(store: Store, db_url: str, tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    a = _run(store, "a", list(range(4)), clean={0, 1}, robust={0}, certified={0}, checkpoint=checkpoint)
    keep = _run(store, "b", list(range(4)), clean={0}, robust=set())
    model_id = store.get_run(a).model_id
    for answer in ("n\n", ""):  # no, and no answer at all
        refused = runner.invoke(app, ["delete", str(a), "--db", db_url], input=answer)
        assert refused.exit_code == 0 and "nothing deleted" in refused.stderr and store.get_run(a) is not None
    done = runner.invoke(app, ["delete", str(a), "--db", db_url], input="y\n")
    assert done.exit_code == 0, done.stderr
    assert "with 3 evaluation(s), 10 per-example row(s) and 1 check(s)" in done.stdout
    assert store.get_run(a) is None and store.evaluations(a) == [] and store.checks(a) == []
    model = store.get_model(model_id)
    assert model is not None and model.checkpoint_path == str(checkpoint) and checkpoint.read_bytes() == b"weights"
    assert store.get_run(keep) is not None and len(store.evaluations(keep)) == 2
    assert_cli_user_error(runner.invoke(app, ["delete", str(a), "--yes", "--db", db_url]), f"no run with id {a}")
    assert delete_run(store, keep)["evaluations"] == 2 and store.list_runs() == []
