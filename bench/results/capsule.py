"""Provenance capsules: one finished run, exported to a gzip'd JSON file and imported into a store.

A capsule holds everything the store knows about a run: its ``runs`` row (the resolved
configuration verbatim, protocol, provenance, status, example indices and their hash, key, cost),
its ``models`` row (checkpoint path and sha256, hyperparameters, source), every evaluation with
every per-example row, and every check. It is strict JSON (a non-finite float is written as
null and its path listed under ``non_finite``). ``bench verify`` (:mod:`bench.harness.verify`)
re-computes part of it.

Guarantees:

* :func:`export_run` refuses a run that is not finished (one-line :class:`BenchError`).
* :func:`import_capsule` is idempotent: the run key identifies the run, and a finished run with
  that key already in the store is reported, not added again. A failed import leaves nothing
  of the run behind.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.errors import BenchError
from bench.results.jsonvalues import null_non_finite
from bench.results.schema import EvalKind, ExampleResultRow, ModelRow, RunStatus, utcnow
from bench.results.store import Store, iso

__all__ = ["FORMAT", "FORMAT_VERSION", "Imported", "export_run", "import_capsule", "read_capsule", "write_capsule"]

FORMAT = "bench-run-capsule"
FORMAT_VERSION = 1
ADD_BATCH = 500  # per-example rows per committed insert on import

_RUN_FIELDS = ("key", "defense", "dataset", "protocol", "protocol_version", "config", "seed", "status",
               "n_examples", "indices_hash", "indices", "provenance", "wall_time_s", "forward_passes",
               "backward_passes", "created_at", "finished_at")
_MODEL_FIELDS = ("key", "defense", "dataset", "arch", "hparams", "recipe", "source", "checkpoint_path",
                 "checkpoint_sha256", "train_summary", "created_at")
_EVAL_FIELDS = ("position", "kind", "method", "norm", "eps", "sigma", "params", "finished", "skipped",
                "forward_passes", "backward_passes")
ROW_FIELDS = tuple(c.name for c in ExampleResultRow.__table__.columns if c.name not in ("id", "evaluation_id"))


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, (RunStatus, EvalKind)):
        return value.value
    return value


def _fields(row: Any, names: tuple[str, ...]) -> dict[str, Any]:
    return {name: _plain(getattr(row, name)) for name in names}


def export_run(store: Store, run_id: int) -> dict[str, Any]:
    """The capsule of finished run ``run_id`` (a JSON-ready dict, strict: no NaN or infinity)."""
    from bench import __version__

    run = store.get_run(run_id)
    if run is None:
        raise BenchError(f"no run {run_id} in the store (see `bench list runs`)")
    if run.status is not RunStatus.FINISHED:
        raise BenchError(f"run {run_id} is {run.status.value}; only finished runs can be exported")
    model = store.get_model(run.model_id) if run.model_id is not None else None
    evaluations = store.evaluations(run_id)
    rows = store.results([ev.id for ev in evaluations])
    by_eval: dict[int, list[dict[str, Any]]] = {ev.id: [] for ev in evaluations}
    for row in rows:
        by_eval[row.evaluation_id].append(_fields(row, ROW_FIELDS))
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "bench_version": __version__,
           "run": _fields(run, _RUN_FIELDS),
           "model": _fields(model, _MODEL_FIELDS) if model is not None else None,
           "evaluations": [{**_fields(ev, _EVAL_FIELDS), "rows": by_eval[ev.id]} for ev in evaluations],
           "checks": [{"name": c.name, "triggered": c.triggered, "detail": c.detail} for c in store.checks(run_id)]}
    clean, nulled = null_non_finite(doc)
    if nulled:
        clean["non_finite"] = nulled
    return clean


def write_capsule(capsule: dict[str, Any], path: str | Path) -> Path:
    """Write ``capsule`` as gzip'd strict JSON to ``path``."""
    path = Path(path)
    try:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            json.dump(capsule, fh, allow_nan=False, separators=(",", ":"))
    except OSError as exc:
        raise BenchError(f"cannot write capsule {path}: {exc.strerror or exc}") from None
    return path


def read_capsule(path: str | Path) -> dict[str, Any]:
    """A capsule read from ``path`` (gzip'd or plain JSON), checked for its format and version."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        text = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
        doc = json.loads(text)
    except OSError as exc:
        raise BenchError(f"cannot read capsule {path}: {exc.strerror or exc}") from None
    except (ValueError, EOFError, gzip.BadGzipFile) as exc:
        raise BenchError(f"{path} is not a bench capsule: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BenchError(f"{path} is not a bench capsule (no format '{FORMAT}')")
    if doc.get("format_version") != FORMAT_VERSION:
        raise BenchError(f"{path}: capsule format version {doc.get('format_version')} is not supported "
                         f"(this bench reads version {FORMAT_VERSION})")
    for name in ("run", "evaluations", "checks"):
        if name not in doc:
            raise BenchError(f"{path}: capsule lacks its '{name}'")
    return doc


@dataclass(frozen=True)
class Imported:
    """The outcome of :func:`import_capsule`: the run's id and whether this import added it."""

    run_id: int
    added: bool


def _parse_time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def _find_model(store: Store, key: str) -> ModelRow | None:
    from sqlalchemy import select

    with store.session() as s:
        return s.scalar(select(ModelRow).where(ModelRow.key == key))


def _model_id(store: Store, model: dict[str, Any] | None) -> int | None:
    """The store's row for the capsule's model: an existing row with the same key (and checkpoint
    sha256) is reused as it is, so a local model's checkpoint path is never overwritten."""
    if model is None:
        return None
    existing = _find_model(store, model["key"])
    if existing is not None:
        if existing.checkpoint_sha256 != model.get("checkpoint_sha256"):
            raise BenchError(f"model {model['key'][:12]} is stored with checkpoint sha256 "
                             f"{(existing.checkpoint_sha256 or '')[:12]}, the capsule's has "
                             f"{(model.get('checkpoint_sha256') or '')[:12]}; refusing to mix them")
        return existing.id
    fields = {k: v for k, v in model.items() if k not in ("key", "created_at")}
    return store.upsert_model(model["key"], **fields, created_at=_parse_time(model.get("created_at")) or utcnow())


def import_capsule(store: Store, capsule: dict[str, Any]) -> Imported:
    """Add the capsule's run to ``store`` (see the module docstring for the guarantees)."""
    run = capsule["run"]
    if run.get("status") != RunStatus.FINISHED.value:
        raise BenchError(f"the capsule's run is {run.get('status')}; only finished runs can be imported")
    existing = store.find_run(run["key"])
    if existing is not None:
        if existing.status is RunStatus.FINISHED:
            return Imported(existing.id, False)
        raise BenchError(f"run {existing.id} has the capsule's key but is {existing.status.value}; "
                         "delete it first (`bench delete`)")
    model_id = _model_id(store, capsule.get("model"))
    fields = {k: run[k] for k in ("defense", "dataset", "protocol", "protocol_version", "config", "seed",
                                  "n_examples", "indices_hash", "indices", "provenance")}
    run_id = store.create_run(run["key"], model_id=model_id, **fields)
    try:
        _fill(store, run_id, capsule)
        store.finish_run(run_id)
        store.update_run(run_id, wall_time_s=run.get("wall_time_s") or 0.0,
                         forward_passes=run.get("forward_passes") or 0,
                         backward_passes=run.get("backward_passes") or 0,
                         created_at=_parse_time(run.get("created_at")) or utcnow(),
                         finished_at=_parse_time(run.get("finished_at")))
    except BaseException:
        from bench.results.compare import delete_run

        delete_run(store, run_id)
        raise
    return Imported(run_id, True)


def _fill(store: Store, run_id: int, capsule: dict[str, Any]) -> None:
    """The capsule's evaluations, per-example rows and checks, through the store's public writers."""
    for ev in capsule["evaluations"]:
        ev_id = store.evaluation(run_id, int(ev["position"]), EvalKind(ev["kind"]), ev["method"], norm=ev.get("norm"),
                                 eps=ev.get("eps"), sigma=ev.get("sigma"), params=ev.get("params") or {})
        rows = [{k: r.get(k) for k in ROW_FIELDS if k in r} for r in ev.get("rows", [])]
        forward, backward = int(ev.get("forward_passes") or 0), int(ev.get("backward_passes") or 0)
        for begin in range(0, len(rows), ADD_BATCH):  # the stage's cost counts with its first batch
            store.add_results(ev_id, rows[begin:begin + ADD_BATCH], forward=forward if begin == 0 else 0,
                              backward=backward if begin == 0 else 0)
        if ev.get("skipped"):
            store.skip_evaluation(ev_id, ev["skipped"])
        elif ev.get("finished"):
            store.finish_evaluation(ev_id)
    for check in capsule["checks"]:
        store.set_check(run_id, check["name"], bool(check["triggered"]), check.get("detail") or "")
