"""Provenance capsules: `bench export` / `bench import` round-trip every row and are idempotent;
`bench verify` re-computes seeded batches and agrees exactly with an honest capsule, and fails
(non-zero, naming the mismatch or the first disagreeing example) on a swapped checkpoint or a
tampered row."""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.config import RunConfig
from bench.harness.runner import execute
from bench.harness.verify import choose_examples
from bench.results.capsule import export_run, read_capsule, write_capsule
from bench.results.schema import RunStatus
from bench.results.store import Store
from helpers import assert_cli_user_error

runner = CliRunner()
TINY = dict(defense="standard", dataset="digits", attacks=("pgd",), steps=2, n_examples=24, batch_size=8)


def invoke(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture
def exported(tmp_path: Path, one_thread) -> tuple[str, Path, dict]:
    """A finished tiny digits run in a store, and its capsule file (written by `bench export`)."""
    url = f"sqlite:///{tmp_path / 'origin.db'}"
    run_id = execute(RunConfig(**TINY, epochs=1), Store(url))
    path = tmp_path / "run.bench.json.gz"
    result = invoke("export", str(run_id), "-o", str(path), "--db", url)
    assert result.exit_code == 0, result.stderr + result.stdout
    return url, path, export_run(Store(url, create=False), run_id)


def _rows(capsule: dict) -> list:
    return [(ev["position"], ev["kind"], ev["method"], ev["norm"], ev["eps"], ev["params"], ev["finished"],
             ev["skipped"], ev["rows"]) for ev in capsule["evaluations"]]


def test_export_import_round_trips_every_row_once(exported, tmp_path: Path):
    _, path, original = exported
    capsule = read_capsule(path)
    assert capsule["format_version"] == 1 and capsule["model"]["checkpoint_sha256"]
    assert sum(len(ev["rows"]) for ev in capsule["evaluations"]) > 24  # clean rows and attack rows
    target = f"sqlite:///{tmp_path / 'board.db'}"
    first = invoke("import", str(path), "--db", target)
    assert first.exit_code == 0 and "imported run" in first.stdout, first.stderr + first.stdout
    again = invoke("import", str(path), "--db", target)
    assert again.exit_code == 0 and "already stored" in again.stdout, again.stderr + again.stdout
    store = Store(target, create=False)
    runs = store.list_runs()
    assert len(runs) == 1 and runs[0].status is RunStatus.FINISHED
    back = export_run(store, runs[0].id)
    for name in ("key", "config", "protocol", "provenance", "indices", "indices_hash", "n_examples", "seed",
                 "forward_passes", "wall_time_s"):
        assert back["run"][name] == original["run"][name], name
    assert _rows(back) == _rows(original)
    assert back["checks"] == original["checks"] and back["model"] == original["model"]
    board = invoke("leaderboard", "--dataset", "digits", "--db", target)
    assert board.exit_code == 0 and "standard" in board.stdout, board.stderr + board.stdout


def test_export_refuses_an_unfinished_run(exported, tmp_path: Path):
    url, _, _ = exported
    store = Store(url, create=False)
    store.update_run(store.list_runs()[0].id, status=RunStatus.FAILED)
    result = invoke("export", "1", "-o", str(tmp_path / "x.json.gz"), "--db", url)
    assert_cli_user_error(result, "only finished runs")
    assert not (tmp_path / "x.json.gz").exists()


def test_verify_agrees_with_an_honest_capsule(exported):
    _, path, _ = exported
    result = invoke("verify", str(path), "--examples", "8", "--device", "cpu")
    assert result.exit_code == 0, result.stderr + result.stdout
    assert "stage 0 clean: AGREES (8 example(s) compared" in result.stdout
    assert "DISAGREES" not in result.stdout and "verified: 8 example(s)" in result.stdout
    everything = invoke("verify", str(path), "--examples", "all", "--device", "cpu")
    assert everything.exit_code == 0 and "24 example(s) compared" in everything.stdout, everything.stdout


def test_verify_names_the_first_tampered_example(exported, tmp_path: Path):
    _, path, original = exported
    tampered = copy.deepcopy(original)
    chosen = choose_examples(original["run"]["indices"], 8, 0)
    clean_rows = tampered["evaluations"][0]["rows"]
    row = next(r for r in clean_rows if r["example_index"] == chosen[2])
    row["prediction"] = (row["prediction"] + 1) % 10
    bad = write_capsule(tampered, tmp_path / "tampered.bench.json.gz")
    result = invoke("verify", str(bad), "--examples", "8", "--device", "cpu")
    assert result.exit_code == 1, result.stderr + result.stdout
    assert f"stage 0 clean, example {chosen[2]}: prediction stored" in result.stderr


def test_verify_refuses_a_swapped_checkpoint(exported, tmp_path: Path):
    _, path, original = exported
    other_url = f"sqlite:///{tmp_path / 'other.db'}"
    other_store = Store(other_url)
    other_run = other_store.get_run(execute(RunConfig(**TINY, epochs=2), other_store))
    other_ckpt = other_store.get_model(other_run.model_id).checkpoint_path
    # --checkpoint pointing at another model's file: its sha256 is not the capsule's
    result = invoke("verify", str(path), "--checkpoint", other_ckpt, "--device", "cpu")
    assert result.exit_code == 1 and "checkpoint sha256 mismatch" in result.stderr, result.stderr
    # the capsule's own model under another path is accepted
    copy_path = tmp_path / "mine.pt"
    shutil.copy(original["model"]["checkpoint_path"], copy_path)
    same = invoke("verify", str(path), "--checkpoint", str(copy_path), "--examples", "4", "--device", "cpu")
    assert same.exit_code == 0, same.stderr + same.stdout
    # the file at the recorded path swapped for another model's
    shutil.copy(other_ckpt, copy_path)
    swapped = copy.deepcopy(original)
    swapped["model"]["checkpoint_path"] = str(copy_path)
    capsule = write_capsule(swapped, tmp_path / "swapped.bench.json.gz")
    result = invoke("verify", str(capsule), "--device", "cpu")
    assert result.exit_code == 1 and f"{copy_path} has" in result.stderr, result.stderr
    # the swapped model is still run, and the report names the first example it disagrees on
    assert re.search(r"verify failed: stage \d+ [^,]+, example \d+: ", result.stderr), result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_bad_capsule_input(tmp_path: Path, exported):
    _, path, _ = exported
    (tmp_path / "junk.json").write_text("{}")
    assert_cli_user_error(invoke("verify", str(tmp_path / "junk.json")), "not a bench capsule")
    assert_cli_user_error(invoke("import", str(tmp_path / "missing.json.gz")), "cannot read capsule")
    assert not (tmp_path / "bench.db").exists()  # a refused import creates no store
    assert_cli_user_error(invoke("verify", str(path), "--examples", "0"), "--examples")
    assert_cli_user_error(invoke("verify", str(path), "--examples", "some"), "--examples")
