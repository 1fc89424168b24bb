"""Per-example views of a stored run, for the exact certified-accuracy curve (``bench plot``) and
per-example comparisons of two runs (``bench compare``).

Both read the stored per-example rows (the source of truth) through the store; nothing here
aggregates beyond what its docstring says.
"""

from __future__ import annotations

from bench.results.queries import get_run_or_fail
from bench.results.schema import EvalKind
from bench.results.store import Store

__all__ = ["certified_radii", "stage_outcomes"]


def certified_radii(store: Store, run_id: int) -> dict[int, list[float]]:
    """Per certification stage (by its position in the run), the certified radius of every example
    the stage certified correctly (correct, not abstained, with a radius). An example missing from
    the list is certified at no radius; the certified accuracy at ``r`` is the number of radii
    ``>= r`` divided by the run's ``n_examples``."""
    get_run_or_fail(store, run_id)
    stages = [e for e in store.evaluations(run_id) if e.kind is EvalKind.CERTIFY]
    radii: dict[int, list[float]] = {e.position: [] for e in stages}
    by_id = {e.id: e.position for e in stages}
    for row in store.results(list(by_id)):
        if row.correct and not row.abstained and row.radius is not None:
            radii[by_id[row.evaluation_id]].append(float(row.radius))
    return radii


def stage_outcomes(store: Store, run_id: int) -> dict[str, dict[int, bool]]:
    """Per stage, ``example index -> correct``, for every example of the run's example set.

    Stages are named ``clean``; ``NORM EPS`` for a threat model (the cumulative outcome of its
    attack cascade, as the robust accuracy counts it: robust when clean-correct and correct under
    every finished attack; attacks store rows only for the examples still robust, so a missing row
    means "not robust"); and ``CERTIFIER@POSITION`` for a certification stage (correct and not
    abstained, at any radius). Skipped or unfinished attack stages are left out."""
    from bench.config import format_eps

    run = get_run_or_fail(store, run_id)
    indices = list(run.indices or [])
    stages = store.evaluations(run_id)
    rows: dict[int, dict[int, bool]] = {e.id: {} for e in stages}
    for row in store.results([e.id for e in stages]):
        rows[row.evaluation_id][row.example_index] = bool(row.correct and not row.abstained)
    out: dict[str, dict[int, bool]] = {}
    clean = next((e for e in stages if e.kind is EvalKind.CLEAN), None)
    clean_ok = {i: rows[clean.id].get(i, False) for i in indices} if clean is not None else {}
    if clean is not None:
        out["clean"] = clean_ok
    for stage in sorted(stages, key=lambda e: e.position):
        if stage.kind is EvalKind.ATTACK and stage.finished and not stage.skipped:
            name = f"{stage.norm} {format_eps(stage.eps or 0.0)}"
            before = out.get(name, clean_ok)
            out[name] = {i: before.get(i, False) and rows[stage.id].get(i, False) for i in indices}
        elif stage.kind is EvalKind.CERTIFY:
            out[f"{stage.method}@{stage.position}"] = {i: rows[stage.id].get(i, False) for i in indices}
    return out
