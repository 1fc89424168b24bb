"""Bad input at the CLI / config / store boundary: one ``error:`` line, exit status 2, nothing
stored and nothing created on disk; NaN and Infinity never reach the store's JSON columns."""

from __future__ import annotations

import json
import math
import pickle
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy
import torch
from typer.testing import CliRunner

from bench.cli import app
from bench.config import MAX_COUNT, RunConfig
from bench.errors import BenchError, StoreError
from bench.harness.runner import execute, prepare, resolve
from bench.results.jsonvalues import non_finite_paths, null_non_finite
from bench.results.store import NoStoreError, Store, resolve_url
from helpers import assert_cli_user_error

runner = CliRunner()

RUN = ["run", "-d", "standard", "--dataset", "digits"]


def _strict_loads(text: str) -> object:
    def refuse(constant: str) -> object:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def _checkpoints(folder: Path) -> dict[str, Path]:
    """Files `--checkpoint` must refuse: none of them may leave a bench.db behind."""
    folder.mkdir()

    class Payload:  # a pickled object that weights_only=True must refuse to construct
        def __reduce__(self):
            return (print, ("code ran during unpickling",))

    files = {"text": folder / "notes.txt", "zero-bytes": folder / "zero.pt", "random-bytes": folder / "random.pt",
             "malicious": folder / "malicious.pt", "wrong-architecture": folder / "wrong.pt",
             "no-state-dict": folder / "epoch.pt", "truncated": folder / "truncated.pt"}
    files["text"].write_text("this is not a checkpoint\n")
    files["zero-bytes"].write_bytes(b"")
    files["random-bytes"].write_bytes(bytes(range(256)) * 8)
    with open(files["malicious"], "wb") as fh:
        pickle.dump({"state_dict": Payload()}, fh)
    torch.save({"state_dict": {"fc.weight": torch.zeros(3, 3)}}, files["wrong-architecture"])
    torch.save({"epoch": 3}, files["no-state-dict"])
    torch.save({"state_dict": {"w": torch.zeros(100)}}, files["truncated"])
    files["truncated"].write_bytes(files["truncated"].read_bytes()[:50])
    return files


REFUSED_RUNS = {
    "radii-nan": [*RUN, "--radii", "nan"],
    "radii-inf": [*RUN, "--radii", "0,inf"],
    "radii-negative": [*RUN, "--radii", "-1"],
    "eps-nan": [*RUN, "--eps", "nan"],
    "eps-inf": [*RUN, "--eps", "inf"],
    "n-huge": [*RUN, "-n", "99999999999"],
    "n-zero": [*RUN, "-n", "0"],
    "seed-huge": [*RUN, "--seed", str(MAX_COUNT + 1)],
    "batch-size-huge": [*RUN, "--batch-size", str(2**40)],
    "epochs-zero": [*RUN, "--epochs", "0"],
    "image-size-zero": [*RUN, "--image-size", "0"],
    "db-empty": [*RUN, "--db", ""],
    "db-blank": [*RUN, "--db", "  "],
    "checkpoint-missing": [*RUN, "--checkpoint", "no-such-file.pt"],
    "checkpoint-directory": [*RUN, "--checkpoint", "."],
    # refused after resolution, by prepare(): before PR 13 these left an empty bench.db
    "attack-parameter": [*RUN, "--attack", "pgd", "--eps", "0.1", "--attack-param", "steps=-1"],
    "uncertifiable-model": [*RUN, "--certify", "lipschitz"],
    "dataset-files-missing": ["run", "-d", "standard", "--dataset", "cifar10", "--data-dir", "no-such-dir"],
}


@pytest.mark.parametrize("args", list(REFUSED_RUNS.values()), ids=list(REFUSED_RUNS))
def test_refused_run_says_one_line_and_creates_nothing(args: list[str], tmp_path: Path) -> None:
    result = runner.invoke(app, args)
    assert_cli_user_error(result)
    assert result.stdout == ""
    assert not Path("bench.db").exists() and not list(tmp_path.glob("bench.db*"))


def test_empty_bench_db_variable_is_refused(tmp_path: Path) -> None:
    for args in ([*RUN], ["list", "runs"], ["show", "1"]):
        assert_cli_user_error(runner.invoke(app, args, env={"BENCH_DB": ""}), "BENCH_DB")
    assert not Path("bench.db").exists()


@pytest.mark.parametrize("kind", ["text", "zero-bytes", "random-bytes", "malicious", "wrong-architecture",
                                  "no-state-dict", "truncated"])
def test_refused_checkpoint_creates_no_store(kind: str, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    path = _checkpoints(tmp_path / "files")[kind]
    result = runner.invoke(app, [*RUN, "--checkpoint", str(path)])
    assert_cli_user_error(result)
    assert "code ran during unpickling" not in capfd.readouterr().out
    assert not Path("bench.db").exists()


READ_ONLY = {
    "show": ["show", "1"],
    "show-json": ["show", "1", "--json"],
    "show-examples": ["show", "1", "--examples"],
    "list-runs": ["list", "runs"],
    "leaderboard": ["leaderboard"],
    "attack": ["attack", "1", "--attack", "fgsm"],
    "audit": ["audit", "1"],
    "plot": ["plot", "1"],
}


def _foreign_sqlite(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (text TEXT)")
    conn.execute("INSERT INTO notes VALUES ('not bench')")
    conn.commit()
    conn.close()


@pytest.mark.parametrize("args", list(READ_ONLY.values()), ids=list(READ_ONLY))
@pytest.mark.parametrize("content", ["zero-bytes", "foreign-sqlite", "missing"])
def test_read_only_commands_never_write_into_a_non_store(args: list[str], content: str, tmp_path: Path) -> None:
    path = tmp_path / "bench.db"
    if content == "zero-bytes":
        path.touch()
    elif content == "foreign-sqlite":
        _foreign_sqlite(path)
    before = path.read_bytes() if path.exists() else None
    err = assert_cli_user_error(runner.invoke(app, args))
    assert ("no result store" if content == "missing" else "is not a bench result store") in err
    assert (path.read_bytes() if path.exists() else None) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if content == "missing" else ["bench.db"])


def test_store_open_without_create_refuses_a_non_store(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(NoStoreError, match="is not a bench result store"):
        Store(f"sqlite:///{empty}", create=False)
    assert empty.stat().st_size == 0
    assert Store.existing(f"sqlite:///{empty}") is None
    assert Store.existing(f"sqlite:///{tmp_path / 'missing.db'}") is None
    assert not (tmp_path / "missing.db").exists()
    with pytest.raises(NoStoreError):
        Store("sqlite://", create=False)  # in memory: never a bench store
    url = f"sqlite:///{tmp_path / 'real.db'}"
    Store(url).close()
    found = Store.existing(url)
    assert found is not None and found.list_runs() == []
    found.close()
    with pytest.raises(StoreError, match="cannot open result store"):  # other problems still raise
        Store.existing(f"sqlite:///{tmp_path / 'no-dir' / 'x.db'}")


def test_empty_url_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(StoreError, match="empty database URL"):
        resolve_url("")
    monkeypatch.setenv("BENCH_DB", "")
    with pytest.raises(StoreError, match="BENCH_DB is set but empty"):
        resolve_url(None)
    assert resolve_url("sqlite:///given.db") == "sqlite:///given.db"  # --db still wins


@pytest.mark.parametrize("field", ["n_examples", "batch_size", "epochs", "image_size", "steps", "restarts",
                                   "draws", "seed"])
def test_counts_above_the_bound_are_refused(field: str) -> None:
    custom = {"eps": (0.1,)} if field in ("steps", "restarts", "draws") else {}
    RunConfig(defense="standard", dataset="digits", **custom, **{field: MAX_COUNT}).validate()
    with pytest.raises(BenchError, match=str(MAX_COUNT)):
        RunConfig(defense="standard", dataset="digits", **custom, **{field: MAX_COUNT + 1}).validate()


@pytest.mark.parametrize("radius", [math.nan, math.inf, -0.5])
def test_radii_must_be_finite_and_non_negative(radius: float) -> None:
    with pytest.raises(BenchError, match="radii must be finite and >= 0"):
        RunConfig(defense="standard", dataset="digits", radii=(0.0, radius)).validate()


# -- NaN and Infinity in the JSON columns ----------------------------------------------------
def _json_columns(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT config FROM runs UNION ALL SELECT provenance FROM runs "
                            "UNION ALL SELECT hparams FROM models UNION ALL SELECT train_summary FROM models "
                            "UNION ALL SELECT params FROM evaluations UNION ALL SELECT multilabel FROM example_results")
        return [text for (text,) in rows if text is not None]
    finally:
        conn.close()


def test_a_nan_cannot_be_written_as_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    store = Store(f"sqlite:///{path}")
    with pytest.raises(sqlalchemy.exc.StatementError, match="not JSON compliant"):
        store.upsert_model("m", defense="standard", dataset="digits", arch="a", hparams={"lr": math.nan},
                           source="file")
    model_id = store.upsert_model("m", defense="standard", dataset="digits", arch="a", hparams={}, source="file")
    with pytest.raises(sqlalchemy.exc.StatementError, match="not JSON compliant"):
        store.create_run("r", model_id=model_id, defense="standard", dataset="digits", protocol="pgd",
                         protocol_version=1, config={"radii": [0.0, math.inf]}, seed=0, n_examples=1)
    assert store.list_runs() == []
    store.close()
    for text in _json_columns(path):
        _strict_loads(text)


def test_run_time_non_finite_values_are_stored_as_null(tmp_path: Path) -> None:
    from bench.results.schema import EvalKind

    path = tmp_path / "x.db"
    store = Store(f"sqlite:///{path}")
    summary = {"final_loss": math.nan, "history": [{"loss": 1.0}, {"loss": -math.inf}], "epochs": 2}
    model_id = store.upsert_model("m", defense="standard", dataset="digits", arch="a", hparams={}, source="trained",
                                  train_summary=summary)
    stored = store.get_model(model_id)
    assert stored is not None and stored.train_summary == {
        "final_loss": None, "history": [{"loss": 1.0}, {"loss": None}], "epochs": 2,
        "non_finite": ["final_loss", "history[1].loss"]}
    assert summary["final_loss"] != summary["final_loss"]  # the caller's dict is left as it was
    run_id = store.create_run("r", model_id=model_id, defense="standard", dataset="digits", protocol="clean",
                              protocol_version=1, config={}, seed=0, n_examples=1)
    ev = store.evaluation(run_id, 0, EvalKind.CLEAN, "clean")
    store.add_results(ev, [{"example_index": 0, "label": None, "prediction": None, "correct": False,
                            "multilabel": {"y": [1, 0], "pred": [0, 0], "score": [math.nan, 0.25]}}])
    (row,) = store.results([ev])
    assert row.multilabel == {"y": [1, 0], "pred": [0, 0], "score": [None, 0.25]}
    store.close()
    for text in _json_columns(path):
        _strict_loads(text)


def test_null_non_finite_paths() -> None:
    value = {"a": [1.0, math.nan, {"b": math.inf}], "c": (2, -math.inf), "d": "nan"}
    clean, paths = null_non_finite(value)
    assert clean == {"a": [1.0, None, {"b": None}], "c": [2, None], "d": "nan"}
    assert paths == ["a[1]", "a[2].b", "c[1]"]
    assert non_finite_paths({"x": 1, "y": [0.5]}) == []
    assert null_non_finite(math.nan) == (None, ["(value)"])


def test_non_finite_configuration_is_refused_before_the_store(tmp_path: Path) -> None:
    resolved = resolve(RunConfig(defense="standard", dataset="digits", eps=(0.1,), steps=1))
    bad = replace(resolved, hparams={**resolved.hparams, "lr": math.nan})
    with pytest.raises(BenchError, match=r"hparams\.lr must be a finite number"):
        prepare(bad)
    with pytest.raises(BenchError, match=r"hparams\.lr"):
        execute(bad, Store(f"sqlite:///{tmp_path / 'x.db'}"))
    assert Store(f"sqlite:///{tmp_path / 'x.db'}").list_runs() == []


def test_show_json_is_valid_even_for_a_store_holding_nan(tmp_path: Path) -> None:
    """A store written before bench refused NaN can hold it; ``--json`` still prints valid JSON."""
    path = tmp_path / "old.db"
    store = Store(f"sqlite:///{path}")
    run_id = execute(RunConfig(defense="standard", dataset="synthetic", epochs=1, eps=(0.1,), steps=1,
                               n_examples=8), store)
    store.close()
    texts = _json_columns(path)
    assert len(texts) >= 4
    for text in texts:  # what this bench writes is valid JSON
        _strict_loads(text)
    conn = sqlite3.connect(path)
    prov = json.loads(conn.execute("SELECT provenance FROM runs WHERE id = ?", (run_id,)).fetchone()[0])
    prov["seed"] = math.nan
    conn.execute("UPDATE runs SET provenance = ? WHERE id = ?", (json.dumps(prov), run_id))  # NaN, as before
    conn.commit()
    conn.close()
    result = runner.invoke(app, ["show", str(run_id), "--json", "--db", f"sqlite:///{path}"])
    assert result.exit_code == 0, result.stderr
    shown = _strict_loads(result.stdout)
    assert isinstance(shown, dict) and shown["provenance"]["seed"] is None


def test_n_larger_than_the_split_evaluates_the_whole_split(tmp_path: Path) -> None:
    """-n above the split's size is capped: every example is evaluated, runs.n_examples holds the
    real count, and both the log and the warning say so."""
    db = f"sqlite:///{tmp_path / 'x.db'}"
    result = runner.invoke(app, ["run", "-d", "standard", "--dataset", "synthetic", "--epochs", "1", "--eps", "0.1",
                                 "--steps", "1", "-n", "100000", "--db", db, "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["n_examples"] == 64  # the synthetic test split
    assert "fewer than the 100000 asked for: evaluating all 64" in result.stderr
    assert "-n 100000 exceeds the split: evaluated all 64 examples" in result.stderr
    (run,) = Store(db, create=False).list_runs()
    assert run.n_examples == 64 and run.config["protocol"]["n_examples"] == 100000
