"""Two runs compared example by example (``bench compare``), and deleting a run (``bench delete``).

:func:`compare_runs` reads the stored per-example rows of both runs
(:func:`bench.results.perexample.stage_outcomes`) and, per stage present in both, counts the
examples correct in one run and not the other, with McNemar's exact test on those discordant
pairs (:func:`bench.results.intervals.mcnemar_exact`). Runs on different example sets are
compared on their intersection, and the comparison says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import delete, func, select

from bench.errors import BenchError
from bench.results.intervals import mcnemar_exact
from bench.results.perexample import stage_outcomes
from bench.results.queries import get_run_or_fail
from bench.results.schema import CheckRow, EvaluationRow, ExampleResultRow, RunRow
from bench.results.store import Store

__all__ = ["Comparison", "StageComparison", "compare_runs", "delete_run", "run_contents"]


@dataclass(frozen=True)
class StageComparison:
    """One stage on the examples both runs evaluated: ``only_a`` are the indices correct in run A
    and not in run B, ``only_b`` the reverse; ``p_value`` is McNemar's exact two-sided p-value."""

    stage: str
    n: int
    correct_a: int
    correct_b: int
    only_a: tuple[int, ...]
    only_b: tuple[int, ...]
    p_value: float


@dataclass(frozen=True)
class Comparison:
    run_a: int
    run_b: int
    common: int  # examples both runs evaluated
    only_in_a: int  # examples only run A evaluated (left out of every stage)
    only_in_b: int
    stages: tuple[StageComparison, ...]
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"same_examples": not (self.only_in_a or self.only_in_b)}


def compare_runs(store: Store, run_a: int, run_b: int) -> Comparison:
    """The per-example comparison of two stored runs, stage by stage (the stages of run A, in its
    order, that run B has too); stages present in only one run are named in the note."""
    if run_a == run_b:
        raise BenchError(f"compare two different runs (got run {run_a} twice)")
    rows = get_run_or_fail(store, run_a), get_run_or_fail(store, run_b)
    index_a, index_b = set(rows[0].indices or []), set(rows[1].indices or [])
    common = sorted(index_a & index_b)
    if not common:
        raise BenchError(f"runs {run_a} and {run_b} share no evaluated example; nothing to compare")
    outcomes_a, outcomes_b = stage_outcomes(store, run_a), stage_outcomes(store, run_b)
    stages = tuple(_stage(name, outcomes_a[name], outcomes_b[name], common)
                   for name in outcomes_a if name in outcomes_b)
    notes = []
    if index_a != index_b:
        notes.append(f"the runs evaluated different example sets: compared on the {len(common)} examples both "
                     f"evaluated ({len(index_a - index_b)} only in run {run_a}, {len(index_b - index_a)} only in "
                     f"run {run_b})")
    for run, mine, theirs in ((run_a, outcomes_a, outcomes_b), (run_b, outcomes_b, outcomes_a)):
        missing = [name for name in mine if name not in theirs]
        if missing:
            notes.append(f"stages only in run {run}: {', '.join(missing)}")
    return Comparison(run_a, run_b, len(common), len(index_a - index_b), len(index_b - index_a), stages,
                      "; ".join(notes))


def _stage(name: str, a: dict[int, bool], b: dict[int, bool], common: list[int]) -> StageComparison:
    only_a = tuple(i for i in common if a.get(i, False) and not b.get(i, False))
    only_b = tuple(i for i in common if b.get(i, False) and not a.get(i, False))
    correct_a, correct_b = sum(a.get(i, False) for i in common), sum(b.get(i, False) for i in common)
    return StageComparison(name, len(common), correct_a, correct_b, only_a, only_b,
                           mcnemar_exact(len(only_a), len(only_b)))


# -- deleting a run ----------------------------------------------------------------------------
def run_contents(store: Store, run_id: int) -> dict[str, int]:
    """How many evaluations, per-example rows and checks :func:`delete_run` would delete."""
    get_run_or_fail(store, run_id)
    with store.session() as s:
        evaluations = [e for e in s.scalars(select(EvaluationRow.id).where(EvaluationRow.run_id == run_id))]
        results = s.scalar(select(func.count()).select_from(ExampleResultRow)
                           .where(ExampleResultRow.evaluation_id.in_(evaluations))) if evaluations else 0
        checks = s.scalar(select(func.count()).select_from(CheckRow).where(CheckRow.run_id == run_id))
    return {"evaluations": len(evaluations), "example_results": int(results or 0), "checks": int(checks or 0)}


def delete_run(store: Store, run_id: int) -> dict[str, int]:
    """Delete run ``run_id`` with its evaluations, their per-example rows and its checks, in one
    transaction; the model row and its checkpoint file are kept (other runs may use them).
    Returns the counts deleted (as :func:`run_contents`)."""
    counts = run_contents(store, run_id)
    with store.session() as s:
        evaluations = select(EvaluationRow.id).where(EvaluationRow.run_id == run_id).scalar_subquery()
        s.execute(delete(ExampleResultRow).where(ExampleResultRow.evaluation_id.in_(evaluations)))
        s.execute(delete(EvaluationRow).where(EvaluationRow.run_id == run_id))
        s.execute(delete(CheckRow).where(CheckRow.run_id == run_id))
        s.execute(delete(RunRow).where(RunRow.id == run_id))
        s.commit()
    return counts
