"""A store many writers share (issue 14): concurrent first use, identical runs and ``bench attack``
stages at once, cached checkpoints written once, cost totals that survive kills, failures that end
in one error line, and no password in anything shown or stored.

The concurrency tests start real processes at once (``bench`` through ``python -m bench``, or
light workers through the spawn context) on SQLite and, marked ``postgres``, on a fresh
PostgreSQL database (``$BENCH_TEST_POSTGRES``; skipped without it).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

WORKERS = 4
DIGITS = ["--defense", "standard", "--dataset", "digits", "--protocol", "clean", "-n", "16", "--epochs", "1",
          "--batch-size", "8"]


# -- helpers ---------------------------------------------------------------------------------
def _first_use(url: str, number: int, barrier: Any) -> str:
    """One writer's first use of a new store: open (create) it, the same model as the others,
    its own run and one stage with a row. Returns "ok" or the error."""
    from bench.results.schema import EvalKind
    from bench.results.store import Store

    try:
        barrier.wait(60)
        store = Store(url)
        model_id = store.upsert_model("shared-model", defense="standard", dataset="digits", source="trained")
        run_id, created = store.get_or_create_run(f"run-{number}", model_id=model_id, defense="standard",
                                                  dataset="digits", protocol="clean", protocol_version=1,
                                                  config={}, seed=0)
        ev = store.evaluation(run_id, 0, EvalKind.CLEAN, "clean")
        store.add_results(ev, [{"example_index": number, "correct": True}], forward=1)
        store.close()
        return "ok" if created else "not created"
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        return f"{type(exc).__name__}: {exc}"


def _bench(*args: str, home: Path, cwd: Path, preexec: Any = None) -> subprocess.Popen[str]:
    env = {**os.environ, "BENCH_HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("BENCH_DB", None)
    return subprocess.Popen([sys.executable, "-m", "bench", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=cwd, preexec_fn=preexec)


def _finish(procs: list[subprocess.Popen[str]], timeout: float = 540) -> list[tuple[int, str, str]]:
    out = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        out.append((proc.returncode, stdout, stderr))
    return out


def _no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr


# -- many writers ----------------------------------------------------------------------------
def test_first_use_of_a_new_store_by_many_writers_at_once(new_store_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Manager().Barrier(WORKERS)
    with ctx.Pool(WORKERS) as pool:
        outcomes = pool.starmap(_first_use, [(new_store_url, n, barrier) for n in range(WORKERS)], chunksize=1)
    assert outcomes == ["ok"] * WORKERS

    from bench.results.store import Store

    store = Store(new_store_url, create=False)
    runs = store.list_runs()
    assert sorted(r.key for r in runs) == [f"run-{n}" for n in range(WORKERS)]
    assert len({r.model_id for r in runs}) == 1  # one model row, found by every writer
    store.close()


def test_identical_runs_at_once_cooperate(new_store_url: str, tmp_path: Path) -> None:
    """Both end with exit 0 and the same result; the model is trained once and the recorded
    checkpoint hash is the file's."""
    home = tmp_path / "home"  # a cache of its own: both processes need to train the same model
    args = ["run", *DIGITS, "--db", new_store_url, "--json"]
    results = _finish([_bench(*args, home=home, cwd=tmp_path) for _ in range(2)])
    for rc, _, stderr in results:
        assert rc == 0, stderr
    first, second = (json.loads(stdout) for _, stdout, _ in results)
    assert first["run_id"] == second["run_id"] and first["clean_accuracy"] == second["clean_accuracy"]
    assert sum("training standard" in stderr for _, _, stderr in results) == 1  # the other waited and loaded

    from bench.results.schema import RunStatus
    from bench.results.store import Store
    from bench.training.checkpoints import sha256_file

    store = Store(new_store_url, create=False)
    (run,) = store.list_runs()
    assert run.status is RunStatus.FINISHED
    (clean,) = store.evaluations(run.id)
    assert store.count_results(clean.id) == 16 and clean.finished
    assert clean.forward_passes == 16 and run.forward_passes == 16  # a batch stored twice is counted once
    model = store.get_model(run.model_id)
    assert model is not None and model.checkpoint_sha256 == sha256_file(model.checkpoint_path)
    store.close()


def test_concurrent_attacks_on_one_run_are_all_stored(new_store_url: str, tmp_path: Path) -> None:
    from bench.config import RunConfig
    from bench.harness.runner import execute
    from bench.results.schema import EvalKind, RunStatus
    from bench.results.store import Store
    from bench.results.stored import StoredConfig

    store = Store(new_store_url)
    run_id = execute(RunConfig(defense="standard", dataset="digits", protocol="clean", n_examples=16, epochs=1,
                               batch_size=8), store)
    common = ["--norm", "Linf", "--eps", "0.1", "--db", new_store_url, "--json"]
    commands = [["attack", str(run_id), "--attack", name, *common] for name in ("fgsm", "fgsm", "mifgsm")]
    results = _finish([_bench(*c, home=Path(os.environ["BENCH_HOME"]), cwd=tmp_path) for c in commands])
    for rc, _, stderr in results:
        assert rc == 0, stderr
    attacks = [e for e in store.evaluations(run_id) if e.kind is EvalKind.ATTACK]
    assert sorted(e.method for e in attacks) == ["fgsm", "mifgsm"] and all(e.finished for e in attacks)
    run = store.get_run(run_id)
    assert run is not None and run.status is RunStatus.FINISHED
    recorded = StoredConfig.from_json(run.config).extra_attacks
    assert sorted((e.position, e.spec.attack) for e in recorded) == sorted((e.position, e.method) for e in attacks)
    store.close()


# -- checkpoints -----------------------------------------------------------------------------
def test_checkpoint_lock_excludes_a_second_holder(tmp_path: Path) -> None:
    from bench.training.checkpoints import checkpoint_lock

    path = tmp_path / "m.pt"
    code = ("import fcntl, sys\n"
            f"h = open({str(path) + '.lock'!r}, 'a')\n"
            "try:\n    fcntl.flock(h, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n    sys.exit(3)\n")
    with checkpoint_lock(path):
        held = subprocess.run([sys.executable, "-c", code], timeout=60)
    free = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert (held.returncode, free.returncode) == (3, 0)


def test_corrupt_partial_training_state_is_discarded(tmp_path: Path, data: Any, one_thread: None) -> None:
    import torch

    from bench.progress import Progress
    from bench.training.loop import fit
    from bench.training.recipe import Recipe
    from helpers import linear_model

    class Log(Progress):
        lines: list[str] = []

        def log(self, message: str) -> None:
            self.lines.append(message)

    train, _ = data
    partial = tmp_path / "model.partial.pt"
    partial.write_bytes(b"not a checkpoint")
    recipe = Recipe(epochs=1, batch_size=64, lr=0.05, optimizer="sgd")
    model, reference = linear_model(0), linear_model(0)
    fit(reference, train, recipe, device=torch.device("cpu"), seed=0)
    progress = Log()
    fit(model, train, recipe, device=torch.device("cpu"), seed=0, progress=progress, resume=partial)
    assert any("discarding unreadable partial training state" in line for line in progress.lines)
    for name, value in reference.state_dict().items():  # trained from the start, like a fresh run
        assert torch.equal(model.state_dict()[name], value), name


# -- cost totals survive kills ---------------------------------------------------------------
def test_cost_of_committed_batches_survives_a_kill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A session that dies without its end-of-session accounting (kill -9) keeps the cost of the
    batches it committed; the resumed run's totals equal an uninterrupted run's."""
    from bench.attacks.pgd import PGD
    from bench.config import RunConfig
    from bench.harness.checks import LARGE_EPS
    from bench.harness.runner import execute
    from bench.results.store import Store

    config = RunConfig(defense="standard", dataset="synthetic", eps=(0.1,), norm="Linf", steps=5, epochs=2,
                       batch_size=8, n_examples=48)
    reference = Store(f"sqlite:///{tmp_path / 'reference.db'}")
    expected = reference.get_run(execute(config, reference))
    assert expected is not None

    store = Store(f"sqlite:///{tmp_path / 'killed.db'}")
    original, calls = PGD.run, {"n": 0}

    def dying(self: Any, model: Any, x: Any, y: Any, threat: Any) -> Any:
        if threat.eps != LARGE_EPS:
            calls["n"] += 1
            if calls["n"] == 3:
                raise SystemExit(137)  # the third attack batch never commits
        return original(self, model, x, y, threat)

    monkeypatch.setattr(PGD, "run", dying)
    monkeypatch.setattr(Store, "add_run_cost", lambda *a, **k: None)  # a killed process accounts nothing at its end
    with pytest.raises(SystemExit):
        execute(config, store)
    (killed,) = store.list_runs()
    committed = sum(e.forward_passes for e in store.evaluations(killed.id))
    assert killed.forward_passes == committed > 0 and killed.wall_time_s > 0

    monkeypatch.undo()
    resumed = store.get_run(execute(config, store))
    assert resumed is not None
    assert (resumed.forward_passes, resumed.backward_passes) == (expected.forward_passes, expected.backward_passes)


def test_uninterrupted_totals_are_the_sum_of_the_stages(tmp_path: Path) -> None:
    from bench.config import RunConfig
    from bench.harness.runner import execute
    from bench.results.store import Store

    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    run = store.get_run(execute(RunConfig(defense="standard", dataset="synthetic", eps=(0.1,), norm="Linf", steps=3,
                                          epochs=2, batch_size=16, n_examples=32), store))
    assert run is not None
    stages = store.evaluations(run.id)
    assert run.forward_passes == sum(e.forward_passes for e in stages) > 0
    assert run.backward_passes == sum(e.backward_passes for e in stages) > 0
    assert run.wall_time_s > 0


# -- failures end cleanly --------------------------------------------------------------------
@pytest.mark.parametrize("message", ["attempt to write a readonly database", "database or disk is full",
                                     "server closed the connection unexpectedly"])
def test_a_store_that_stops_accepting_writes_is_one_error_line(message: str, tmp_path: Path) -> None:
    import sqlite3

    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    from typer.testing import CliRunner

    from bench.cli.app import app
    from bench.results.schema import RunStatus
    from bench.results.store import Store

    url = f"sqlite:///{tmp_path / 'r.db'}"
    args = ["run", "--defense", "standard", "--dataset", "synthetic", "--protocol", "clean", "-n", "32",
            "--epochs", "2", "--batch-size", "8", "--db", url, "--json"]
    calls = {"n": 0}

    def refuse(conn: Any, cursor: Any, statement: str, *args: Any) -> None:  # the database refuses the 2nd batch
        if statement.lstrip().upper().startswith("INSERT INTO EXAMPLE_RESULTS"):
            calls["n"] += 1
            if calls["n"] == 2:
                raise sqlite3.OperationalError(message)

    event.listen(Engine, "before_cursor_execute", refuse)
    try:
        result = CliRunner().invoke(app, args)
    finally:
        event.remove(Engine, "before_cursor_execute", refuse)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1] and "r.db" in lines[-1]
    _no_traceback(result.stderr)
    store = Store(url, create=False)
    (run,) = store.list_runs()
    assert run.status is RunStatus.FAILED  # the store still accepted this write: nothing marked finished

    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["run_id"] == run.id and store.get_run(run.id).status is RunStatus.FINISHED


def test_a_full_disk_is_one_error_line_and_the_next_run_resumes(tmp_path: Path) -> None:
    """A real file-size limit (RLIMIT_FSIZE, what a full disk looks like to the writer)."""
    import resource
    import signal

    from bench.results.schema import RunStatus
    from bench.results.store import Store

    url = f"sqlite:///{tmp_path / 'r.db'}"
    Store(url).close()  # the store exists; the limit then stops its growth
    limit = (tmp_path / "r.db").stat().st_size + 8192

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    home = Path(os.environ["BENCH_HOME"])
    args = ["run", "--defense", "standard", "--dataset", "synthetic", "--protocol", "clean", "-n", "64",
            "--batch-size", "1", "--db", url]
    ((rc, _, stderr),) = _finish([_bench(*args, "--checkpoint", str(_synthetic_checkpoint(tmp_path)), home=home,
                                         cwd=tmp_path, preexec=small_disk)])
    assert rc == 2, stderr
    _no_traceback(stderr)
    assert stderr.strip().splitlines()[-1].startswith("error: "), stderr
    store = Store(url, create=False)
    assert all(r.status is not RunStatus.FINISHED for r in store.list_runs())
    ((rc, _, stderr),) = _finish([_bench(*args, "--checkpoint", str(_synthetic_checkpoint(tmp_path)), home=home,
                                         cwd=tmp_path)])
    assert rc == 0, stderr
    (run,) = store.list_runs()
    assert run.status is RunStatus.FINISHED and store.count_results(store.evaluations(run.id)[0].id) == 64


def _synthetic_checkpoint(tmp_path: Path) -> Path:
    """A state dict of the standard defense's model for the synthetic dataset."""
    import torch

    from bench.config import RunConfig
    from bench.harness.resolve import resolve

    path = tmp_path / "synthetic.pt"
    if not path.exists():
        resolved = resolve(RunConfig(defense="standard", dataset="synthetic", protocol="clean"))
        model = resolved.defense.build(resolved.spec, resolved.image_size, **resolved.hparams)
        torch.save(model.state_dict(), path)
    return path


# -- passwords -------------------------------------------------------------------------------
def test_passwords_never_appear_in_messages_or_provenance() -> None:
    from bench.errors import StoreError
    from bench.harness.provenance import command_line
    from bench.results.store import Store, redact

    url = "postgresql+psycopg://bench:s3cret@127.0.0.1:1/bench"  # nothing listens on port 1
    with pytest.raises(StoreError) as caught:
        Store(url)
    assert "s3cret" not in str(caught.value) and "bench:***@127.0.0.1:1" in str(caught.value)
    line = command_line(["bench", "run", "--db", url, "--db=sqlite:///x.db", f"--db={url}"])
    assert line is not None and "s3cret" not in line and line.count("bench:***@127.0.0.1") == 2
    assert redact("sqlite:///bench.db") == "sqlite:///bench.db"
