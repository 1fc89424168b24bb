"""The result store: a thin layer of queries over the schema.

``Store(url)`` opens (and creates) the database. SQLite is the default
(``sqlite:///bench.db`` in the working directory, WAL journal, foreign keys on); any
SQLAlchemy URL works, PostgreSQL for shared multi-machine use. Per-example rows are written
and committed one batch at a time, so an interrupted run loses at most one batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import Session

from bench.errors import StoreError
from bench.results.schema import (SCHEMA_VERSION, Base, CheckRow, EvalKind, EvaluationRow, ExampleResultRow,
                                  MetaRow, ModelRow, ReferenceRow, RunRow, RunStatus, utcnow)

__all__ = ["DEFAULT_URL", "Store", "resolve_url"]

DEFAULT_URL = "sqlite:///bench.db"


def resolve_url(url: str | None = None) -> str:
    """``--db`` if given, else ``$BENCH_DB``, else ``sqlite:///bench.db``."""
    return url or os.environ.get("BENCH_DB") or DEFAULT_URL


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
    except Exception:  # noqa: BLE001 - in-memory databases cannot use WAL; keep the default journal
        pass
    cursor.close()


class Store:
    """Open (and create if needed) the result store at ``url``."""

    def __init__(self, url: str | None = None, create: bool = True) -> None:
        self.url = resolve_url(url)
        if not create and self.url.startswith("sqlite:///") and self.url not in ("sqlite:///", "sqlite:///:memory:"):
            path = Path(self.url[len("sqlite:///"):])
            if not path.exists():
                raise StoreError(f"no result store at {path}: run `bench run` first, or pass --db / set BENCH_DB")
        self.engine = self._connect(self.url)

    # -- opening ------------------------------------------------------------------------
    @staticmethod
    def _connect(url: str) -> Engine:
        if url.startswith("sqlite:///") and url not in ("sqlite:///", "sqlite:///:memory:"):
            path = Path(url[len("sqlite:///"):])
            if not path.parent.exists():
                raise StoreError(f"cannot open result store '{url}': directory {path.parent} does not exist")
            if path.is_dir():
                raise StoreError(f"cannot open result store '{url}': {path} is a directory")
        try:
            engine = create_engine(url)
        except NoSuchModuleError as exc:
            raise StoreError(f"cannot open result store '{url}': unsupported database URL ({exc})") from None
        except ModuleNotFoundError as exc:
            hint = " (install bench[postgres] for PostgreSQL)" if "postgres" in url else ""
            raise StoreError(f"cannot open result store '{url}': missing driver {exc.name}{hint}") from None
        except (ArgumentError, ValueError) as exc:
            raise StoreError(f"cannot open result store '{url}': invalid database URL ({exc})") from None
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _sqlite_pragmas)
        try:
            Base.metadata.create_all(engine)
            Store._migrate(engine)
            Store._check_columns(engine, url)
            with Session(engine) as session:
                row = session.get(MetaRow, "schema_version")
                if row is None:
                    session.add(MetaRow(key="schema_version", value=str(SCHEMA_VERSION)))
                    session.commit()
                elif int(row.value) != SCHEMA_VERSION:
                    raise StoreError(
                        f"result store '{url}' has schema version {row.value}; this bench expects {SCHEMA_VERSION}"
                    )
        except (DBAPIError, SQLAlchemyError) as exc:
            detail = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            raise StoreError(f"cannot open result store '{url}': {detail}") from None
        return engine

    # columns added by each schema version (all nullable): an older store gains them in place
    MIGRATIONS = {2: {"example_results": ("count_a", "bound", "seconds")}}

    @staticmethod
    def _migrate(engine: Engine) -> None:
        """Bring a store of an older schema version up to date (only additive changes so far)."""
        from sqlalchemy import inspect, text

        with Session(engine) as session:
            row = session.get(MetaRow, "schema_version")
            if row is None or int(row.value) >= SCHEMA_VERSION:
                return
            version = int(row.value)
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for table_name, columns in Store.MIGRATIONS.get(target, {}).items():
                    table = Base.metadata.tables[table_name]
                    present = {c["name"] for c in inspect(engine).get_columns(table_name)}
                    for name in columns:
                        if name not in present:
                            kind = table.columns[name].type.compile(dialect=engine.dialect)
                            session.execute(text(f"ALTER TABLE {table_name} ADD COLUMN {name} {kind}"))
            row.value = str(SCHEMA_VERSION)
            session.commit()

    @staticmethod
    def _check_columns(engine: Engine, url: str) -> None:
        """A database made by another bench version must not fail later with a bare SQL error."""
        from sqlalchemy import inspect

        inspector = inspect(engine)
        for table in Base.metadata.sorted_tables:
            present = {c["name"] for c in inspector.get_columns(table.name)}
            missing = sorted(c.name for c in table.columns if c.name not in present)
            if missing:
                raise StoreError(f"result store '{url}' was made by another bench version: table {table.name} "
                                 f"lacks column(s) {', '.join(missing)}; use a new --db")

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    # -- models -------------------------------------------------------------------------
    def upsert_model(self, key: str, **fields: Any) -> int:
        """Return the id of the model row ``key``, creating or updating it with ``fields``."""
        with self.session() as s:
            row = s.scalar(select(ModelRow).where(ModelRow.key == key))
            if row is None:
                row = ModelRow(key=key, **fields)
                s.add(row)
            else:
                for name, value in fields.items():
                    setattr(row, name, value)
            s.commit()
            return row.id

    def get_model(self, model_id: int) -> ModelRow | None:
        with self.session() as s:
            return s.get(ModelRow, model_id)

    # -- runs ---------------------------------------------------------------------------
    def find_run(self, key: str) -> RunRow | None:
        with self.session() as s:
            return s.scalar(select(RunRow).where(RunRow.key == key))

    def get_run(self, run_id: int) -> RunRow | None:
        with self.session() as s:
            return s.get(RunRow, run_id)

    def create_run(self, key: str, **fields: Any) -> int:
        with self.session() as s:
            row = RunRow(key=key, status=RunStatus.RUNNING, **fields)
            s.add(row)
            s.commit()
            return row.id

    def update_run(self, run_id: int, **fields: Any) -> None:
        with self.session() as s:
            row = s.get(RunRow, run_id)
            assert row is not None, run_id
            for name, value in fields.items():
                setattr(row, name, value)
            s.commit()

    def add_run_cost(self, run_id: int, wall_time_s: float, forward: int = 0, backward: int = 0) -> None:
        with self.session() as s:
            row = s.get(RunRow, run_id)
            assert row is not None, run_id
            row.wall_time_s = (row.wall_time_s or 0.0) + wall_time_s
            row.forward_passes = (row.forward_passes or 0) + forward
            row.backward_passes = (row.backward_passes or 0) + backward
            s.commit()

    def finish_run(self, run_id: int) -> None:
        self.update_run(run_id, status=RunStatus.FINISHED, finished_at=utcnow(), error=None)

    def fail_run(self, run_id: int, error: str) -> None:
        self.update_run(run_id, status=RunStatus.FAILED, error=error[:2000])

    def list_runs(self, dataset: str | None = None, status: RunStatus | None = None) -> list[RunRow]:
        with self.session() as s:
            query = select(RunRow).order_by(RunRow.id)
            if dataset is not None:
                query = query.where(RunRow.dataset == dataset)
            if status is not None:
                query = query.where(RunRow.status == status)
            return list(s.scalars(query))

    # -- evaluations and per-example rows -----------------------------------------------
    def evaluation(self, run_id: int, position: int, kind: EvalKind, method: str, *, norm: str | None = None,
                   eps: float | None = None, sigma: float | None = None, params: dict[str, Any] | None = None) -> int:
        """Return the id of evaluation ``position`` of the run, creating it if needed.

        An existing row must describe the same stage; otherwise the stored run is inconsistent
        with the protocol and resuming it would mix results.
        """
        with self.session() as s:
            row = s.scalar(select(EvaluationRow).where(EvaluationRow.run_id == run_id,
                                                       EvaluationRow.position == position))
            if row is None:
                row = EvaluationRow(run_id=run_id, position=position, kind=kind, method=method, norm=norm,
                                    eps=eps, sigma=sigma, params=params or {})
                s.add(row)
                s.commit()
            elif (row.kind, row.method, row.norm, row.eps) != (kind, method, norm, eps) or \
                    (sigma is not None and row.sigma != sigma) or \
                    (params is not None and (row.params or {}) != params):
                raise StoreError(f"run {run_id}: stored evaluation {position} is {row.method} {row.norm} {row.eps} "
                                 f"{row.params}, expected {method} {norm} {eps} {params}; refusing to resume a "
                                 "different protocol")
            return row.id

    def done_indices(self, evaluation_id: int) -> set[int]:
        with self.session() as s:
            rows = s.scalars(select(ExampleResultRow.example_index)
                             .where(ExampleResultRow.evaluation_id == evaluation_id))
            return set(rows)

    def add_results(self, evaluation_id: int, rows: Iterable[dict[str, Any]], forward: int = 0,
                    backward: int = 0) -> None:
        """Insert one batch of per-example rows and the batch's cost, in one transaction."""
        with self.session() as s:
            s.add_all(ExampleResultRow(evaluation_id=evaluation_id, **row) for row in rows)
            ev = s.get(EvaluationRow, evaluation_id)
            assert ev is not None
            ev.forward_passes += forward
            ev.backward_passes += backward
            s.commit()

    def skip_evaluation(self, evaluation_id: int, reason: str) -> None:
        """Mark a stage that cannot run on this model: finished, no rows, with the reason."""
        with self.session() as s:
            ev = s.get(EvaluationRow, evaluation_id)
            assert ev is not None
            ev.skipped, ev.finished = reason[:1000], True
            s.commit()

    def finish_evaluation(self, evaluation_id: int) -> None:
        with self.session() as s:
            ev = s.get(EvaluationRow, evaluation_id)
            assert ev is not None
            ev.finished = True
            s.commit()

    def evaluations(self, run_id: int) -> list[EvaluationRow]:
        with self.session() as s:
            return list(s.scalars(select(EvaluationRow).where(EvaluationRow.run_id == run_id)
                                  .order_by(EvaluationRow.position)))

    def results(self, evaluation_ids: Sequence[int]) -> list[ExampleResultRow]:
        if not evaluation_ids:
            return []
        with self.session() as s:
            return list(s.scalars(select(ExampleResultRow)
                                  .where(ExampleResultRow.evaluation_id.in_(list(evaluation_ids)))
                                  .order_by(ExampleResultRow.evaluation_id, ExampleResultRow.example_index)))

    def correct_indices(self, evaluation_id: int) -> set[int]:
        """Indices of the examples this evaluation stored as correct."""
        with self.session() as s:
            return set(s.scalars(select(ExampleResultRow.example_index)
                                 .where(ExampleResultRow.evaluation_id == evaluation_id,
                                        ExampleResultRow.correct.is_(True))))

    def count_results(self, evaluation_id: int) -> int:
        with self.session() as s:
            return int(s.scalar(select(func.count()).select_from(ExampleResultRow)
                                .where(ExampleResultRow.evaluation_id == evaluation_id)) or 0)

    # -- checks and references ----------------------------------------------------------
    def set_check(self, run_id: int, name: str, triggered: bool, detail: str) -> None:
        with self.session() as s:
            row = s.scalar(select(CheckRow).where(CheckRow.run_id == run_id, CheckRow.name == name))
            if row is None:
                s.add(CheckRow(run_id=run_id, name=name, triggered=triggered, detail=detail))
            else:
                row.triggered, row.detail = triggered, detail
            s.commit()

    def checks(self, run_id: int) -> list[CheckRow]:
        with self.session() as s:
            return list(s.scalars(select(CheckRow).where(CheckRow.run_id == run_id).order_by(CheckRow.id)))

    def add_reference(self, **fields: Any) -> int:
        with self.session() as s:
            row = ReferenceRow(**fields)
            s.add(row)
            s.commit()
            return row.id

    def references(self, dataset: str) -> list[ReferenceRow]:
        with self.session() as s:
            return list(s.scalars(select(ReferenceRow).where(ReferenceRow.dataset == dataset)))


def iso(ts: datetime | None) -> str | None:
    return ts.isoformat() if ts is not None else None
