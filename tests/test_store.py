"""The SQLAlchemy result store: opening, pragmas, round trips, constraints, precision."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy
from sqlalchemy import inspect, text
from sqlalchemy.orm import Session

from bench.errors import StoreError
from bench.results.schema import SCHEMA_VERSION, EvalKind, ExampleResultRow, RunStatus
from bench.results.store import Store, resolve_url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A new store: an SQLite file, and (marked ``postgres``) a fresh PostgreSQL database."""
    sqlite = request.param == "sqlite"
    s = Store("sqlite:///" + str(tmp_path / "x.db") if sqlite else request.getfixturevalue("postgres_url"))
    yield s
    s.close()


def make_run(store: Store, key: str = "run-1") -> tuple[int, int]:
    model_id = store.upsert_model("model-1", defense="standard", dataset="digits", arch="cnn-small",
                                  hparams={"arch": "cnn-small"}, source="trained")
    run_id = store.create_run(key, model_id=model_id, defense="standard", dataset="digits", protocol="pgd",
                              protocol_version=1, config={"defense": "standard"}, seed=0, n_examples=4)
    return model_id, run_id


def rows(indices: list[int], correct: bool = True) -> list[dict]:
    return [{"example_index": i, "label": i % 10, "prediction": i % 10 if correct else (i + 1) % 10,
             "correct": correct} for i in indices]


# -- opening ---------------------------------------------------------------------------------
def test_creates_file_and_tables(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    s = Store("sqlite:///" + str(path))
    try:
        assert path.is_file()
        tables = set(inspect(s.engine).get_table_names())
        assert {"models", "runs", "evaluations", "example_results", "checks", "references", "bench_meta"} <= tables
        with s.engine.connect() as conn:
            stored = conn.execute(text("SELECT value FROM bench_meta WHERE key='schema_version'")).scalar()
            assert stored == str(SCHEMA_VERSION)
    finally:
        s.close()


def test_a_version_1_store_is_migrated_in_place(tmp_path: Path) -> None:
    """Schema 2 added nullable certification columns; a version-1 store keeps its rows and gains them."""
    url = "sqlite:///" + str(tmp_path / "old.db")
    s = Store(url)
    _, run_id = make_run(s)
    s.close()
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:  # turn it into a version-1 store
        for column in ("count_a", "bound", "seconds"):
            conn.execute(text(f"ALTER TABLE example_results DROP COLUMN {column}"))
        conn.execute(text("UPDATE bench_meta SET value='1' WHERE key='schema_version'"))
    engine.dispose()
    s2 = Store(url)
    try:
        assert s2.get_run(run_id) is not None
        columns = {c["name"] for c in inspect(s2.engine).get_columns("example_results")}
        assert {"count_a", "bound", "seconds"} <= columns
        with s2.engine.connect() as conn:
            assert conn.execute(text("SELECT value FROM bench_meta WHERE key='schema_version'")).scalar() == "2"
    finally:
        s2.close()


def test_reopening_keeps_data(tmp_path: Path) -> None:
    url = "sqlite:///" + str(tmp_path / "x.db")
    s = Store(url)
    _, run_id = make_run(s)
    s.close()
    s2 = Store(url)
    try:
        run = s2.get_run(run_id)
        assert run is not None and run.defense == "standard"
    finally:
        s2.close()


def test_wal_and_foreign_keys_are_on(store: Store) -> None:
    if store.engine.dialect.name != "sqlite":
        pytest.skip("SQLite pragmas")
    with store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar().lower() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1


def test_foreign_keys_are_enforced(store: Store) -> None:
    with Session(store.engine) as s:
        s.add(ExampleResultRow(evaluation_id=12345, example_index=0, label=0, prediction=0, correct=True))
        with pytest.raises(sqlalchemy.exc.IntegrityError):
            s.commit()


@pytest.mark.parametrize("make_url", [
    lambda p: "sqlite:///" + str(p / "missing" / "x.db"),
    lambda p: "notadb://x",
    lambda p: "sqlite:///" + str(p),
    lambda p: "sqlite:///" + str(p / "not-a-db.txt"),
    lambda p: "::garbage::",
], ids=["missing-dir", "unknown-dialect", "directory", "not-a-database", "garbage"])
def test_bad_urls_raise_store_error(tmp_path: Path, make_url) -> None:
    (tmp_path / "not-a-db.txt").write_text("this is not an SQLite database\n" * 200)
    with pytest.raises(StoreError) as info:
        Store(make_url(tmp_path))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "missing").exists()


def test_resolve_url_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BENCH_DB", raising=False)
    assert resolve_url(None) == "sqlite:///bench.db"
    monkeypatch.setenv("BENCH_DB", "sqlite:///env.db")
    assert resolve_url(None) == "sqlite:///env.db"
    assert resolve_url("sqlite:///cli.db") == "sqlite:///cli.db"


# -- round trips -----------------------------------------------------------------------------
def test_upsert_model_creates_then_updates(store: Store) -> None:
    first = store.upsert_model("k", defense="standard", dataset="digits", source="trained", hparams={"a": 1})
    second = store.upsert_model("k", defense="standard", dataset="digits", source="file", hparams={"a": 2},
                                checkpoint_sha256="ab" * 32)
    assert first == second
    model = store.get_model(first)
    assert model is not None
    assert (model.source, model.hparams, model.checkpoint_sha256) == ("file", {"a": 2}, "ab" * 32)
    other = store.upsert_model("k2", defense="pgd-at", dataset="digits", source="trained")
    assert other != first


def test_run_round_trip(store: Store) -> None:
    model_id, run_id = make_run(store)
    run = store.get_run(run_id)
    assert run is not None
    assert (run.model_id, run.protocol, run.protocol_version, run.status) == (model_id, "pgd", 1, RunStatus.RUNNING)
    assert run.config == {"defense": "standard"}
    assert store.find_run("run-1").id == run_id
    assert store.find_run("nope") is None
    store.add_run_cost(run_id, 1.5, forward=10, backward=4)
    store.add_run_cost(run_id, 0.5, forward=1)
    store.finish_run(run_id)
    run = store.get_run(run_id)
    assert (run.wall_time_s, run.forward_passes, run.backward_passes) == (2.0, 11, 4)
    assert run.status is RunStatus.FINISHED and run.finished_at is not None
    assert [r.id for r in store.list_runs(dataset="digits", status=RunStatus.FINISHED)] == [run_id]
    assert store.list_runs(dataset="cifar10") == []


def test_duplicate_run_key_rejected(store: Store) -> None:
    make_run(store, "same")
    with pytest.raises(sqlalchemy.exc.IntegrityError):
        store.create_run("same", defense="standard", dataset="digits", protocol="pgd", protocol_version=1,
                         config={}, seed=0)


def test_evaluation_and_results_round_trip(store: Store) -> None:
    _, run_id = make_run(store)
    clean = store.evaluation(run_id, 0, EvalKind.CLEAN, "clean")
    attack = store.evaluation(run_id, 1, EvalKind.ATTACK, "pgd", norm="Linf", eps=0.1, params={"steps": 20})
    assert clean != attack
    assert store.evaluation(run_id, 1, EvalKind.ATTACK, "pgd", norm="Linf", eps=0.1) == attack  # idempotent
    assert store.done_indices(clean) == set()

    store.add_results(clean, rows([0, 1]), forward=2)
    store.add_results(clean, rows([3]) + rows([2], correct=False), forward=2)
    assert store.done_indices(clean) == {0, 1, 2, 3}
    assert store.count_results(clean) == 4
    assert store.done_indices(attack) == set()
    stored = store.results([clean])
    assert [r.example_index for r in stored] == [0, 1, 2, 3]
    assert [r.correct for r in stored] == [True, True, False, True]
    assert stored[2].prediction == 3 and stored[2].label == 2

    store.finish_evaluation(clean)
    evs = store.evaluations(run_id)
    assert [(e.position, e.kind, e.method, e.finished) for e in evs] == [
        (0, EvalKind.CLEAN, "clean", True), (1, EvalKind.ATTACK, "pgd", False)]
    assert evs[0].forward_passes == 4
    assert evs[1].params == {"steps": 20}


def test_evaluation_mismatch_refuses_to_resume(store: Store) -> None:
    _, run_id = make_run(store)
    store.evaluation(run_id, 1, EvalKind.ATTACK, "pgd", norm="Linf", eps=0.1)
    with pytest.raises(StoreError):
        store.evaluation(run_id, 1, EvalKind.ATTACK, "pgd", norm="Linf", eps=0.2)
    with pytest.raises(StoreError):
        store.evaluation(run_id, 1, EvalKind.ATTACK, "apgd-ce", norm="Linf", eps=0.1)


def test_example_results_unique_per_evaluation(store: Store) -> None:
    _, run_id = make_run(store)
    ev = store.evaluation(run_id, 0, EvalKind.CLEAN, "clean")
    other = store.evaluation(run_id, 1, EvalKind.ATTACK, "pgd", norm="L2", eps=0.5)
    store.add_results(ev, rows([0, 1]), forward=2)
    with pytest.raises(sqlalchemy.exc.IntegrityError), Session(store.engine) as s:  # the database enforces it
        s.add(ExampleResultRow(evaluation_id=ev, example_index=1, correct=True))
        s.commit()
    # add_results stores each row once: a row another writer stored first is kept, the new one added
    store.add_results(ev, rows([5, 1]), forward=2)
    assert store.done_indices(ev) == {0, 1, 5}
    assert store.evaluations(run_id)[0].forward_passes == 4
    store.add_results(ev, rows([0, 5]), forward=2)  # nothing new: a duplicate batch costs nothing
    assert store.evaluations(run_id)[0].forward_passes == 4
    assert store.get_run(run_id).forward_passes == 4
    store.add_results(other, rows([0, 1]))  # the same index in another evaluation is fine
    assert store.done_indices(other) == {0, 1}


def test_checks_upsert(store: Store) -> None:
    _, run_id = make_run(store)
    store.set_check(run_id, "gradients", False, "ok")
    store.set_check(run_id, "gradients", True, "zero gradients")
    store.set_check(run_id, "randomness", False, "")
    checks = store.checks(run_id)
    assert [(c.name, c.triggered, c.detail) for c in checks] == [("gradients", True, "zero gradients"),
                                                                  ("randomness", False, "")]


def test_floats_stored_at_full_precision(store: Store) -> None:
    value = 0.1234567890123
    eps = 8 / 255
    _, run_id = make_run(store)
    ev = store.evaluation(run_id, 1, EvalKind.CERTIFY, "smoothing", eps=eps, sigma=1 / 3)
    store.add_results(ev, [{"example_index": 0, "label": 1, "prediction": 1, "correct": True, "radius": value,
                            "perturbation_norm": 1 / 7}])
    store.add_run_cost(run_id, value)
    store.close()
    reopened = Store(store.url)
    try:
        row = reopened.results([ev])[0]
        assert row.radius == value
        assert row.perturbation_norm == 1 / 7
        stage = reopened.evaluations(run_id)[0]
        assert stage.eps == eps and stage.sigma == 1 / 3
        assert reopened.get_run(run_id).wall_time_s == value
        # resuming with the same eps matches the stored row exactly
        assert reopened.evaluation(run_id, 1, EvalKind.CERTIFY, "smoothing", eps=8 / 255) == ev
    finally:
        reopened.close()


def test_references_round_trip(store: Store) -> None:
    ref = store.add_reference(defense="pgd-at", dataset="cifar10", metric="robust", norm="Linf", eps=8 / 255,
                              value=0.4712345678901, source="Madry et al. 2018")
    got = store.references("cifar10")
    assert [(r.id, r.value, r.eps) for r in got] == [(ref, 0.4712345678901, 8 / 255)]
    assert store.references("digits") == []
