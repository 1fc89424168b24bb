"""Resumable runs: an interrupted run continues where it stopped and ends with exactly the rows
an uninterrupted run produces; a finished run is returned without recomputation."""

from __future__ import annotations

import pytest

from bench.attacks.pgd import PGD
from bench.config import RunConfig
from bench.harness import runner
from bench.harness.checks import LARGE_EPS
from bench.harness.runner import execute
from bench.results.queries import run_summary
from bench.results.schema import RunStatus
from bench.results.store import Store

CONFIG = RunConfig(defense="standard", dataset="synthetic", eps=(0.1,), norm="Linf", steps=5, epochs=2,
                   batch_size=8, n_examples=48)



class Crash(RuntimeError):
    pass


def _rows(store: Store, run_id: int) -> list[tuple]:
    evaluations = store.evaluations(run_id)
    position = {e.id: e.position for e in evaluations}
    return sorted((position[r.evaluation_id], r.example_index, r.prediction, r.correct, r.correct_draws,
                   round(r.perturbation_norm, 6) if r.perturbation_norm is not None else None)
                  for r in store.results([e.id for e in evaluations]))


def test_interrupted_run_resumes_to_identical_rows(tmp_path, monkeypatch):
    reference = Store(f"sqlite:///{tmp_path / 'reference.db'}")
    ref_id = execute(CONFIG, reference)

    store = Store(f"sqlite:///{tmp_path / 'interrupted.db'}")
    original_run = PGD.run
    calls = {"n": 0}

    def crashing_run(self, model, x, y, threat):
        if threat.eps == LARGE_EPS:  # the large_eps sanity check's PGD, before the protocol
            return original_run(self, model, x, y, threat)
        calls["n"] += 1
        if calls["n"] == 3:  # two attack batches are stored, the third dies mid-way
            raise Crash("simulated crash")
        return original_run(self, model, x, y, threat)

    monkeypatch.setattr(PGD, "run", crashing_run)
    with pytest.raises(Crash):
        execute(CONFIG, store)
    (failed,) = store.list_runs()
    assert failed.status is RunStatus.FAILED and "simulated crash" in (failed.error or "")
    attack_eval = [e for e in store.evaluations(failed.id) if e.kind.value == "attack"][0]
    stored_before = store.count_results(attack_eval.id)
    assert stored_before == 2 * CONFIG.batch_size  # partial: committed batch by batch
    assert run_summary(store, failed.id)["complete"] is False

    monkeypatch.setattr(PGD, "run", original_run)
    seen_batches: list[int] = []

    def counting_run(self, model, x, y, threat):
        if threat.eps != LARGE_EPS:
            seen_batches.append(len(x))
        return original_run(self, model, x, y, threat)

    monkeypatch.setattr(PGD, "run", counting_run)
    resumed_id = execute(CONFIG, store)
    assert resumed_id == failed.id
    assert store.get_run(resumed_id).status is RunStatus.FINISHED
    alive = run_summary(reference, ref_id)
    n_attacked = round(alive["clean_accuracy"] * alive["n_examples"])
    assert sum(seen_batches) == n_attacked - stored_before  # only the missing examples were attacked
    assert _rows(store, resumed_id) == _rows(reference, ref_id)
    a, b = run_summary(store, resumed_id), run_summary(reference, ref_id)
    assert (a["clean_accuracy"], a["robust_accuracy"]) == (b["clean_accuracy"], b["robust_accuracy"])


def test_finished_run_is_returned_without_recomputing(tmp_path, monkeypatch):
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    run_id = execute(CONFIG, store)

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished run must not be recomputed")

    monkeypatch.setattr(runner, "_execute", forbidden)
    assert execute(CONFIG, store) == run_id


def test_changed_config_is_a_new_run(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    first = execute(CONFIG, store)
    second = execute(RunConfig(**{**CONFIG.__dict__, "seed": 1}), store)
    assert first != second
    assert len(store.list_runs(status=RunStatus.FINISHED)) == 2
