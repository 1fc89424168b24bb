"""The result store: a thin layer of queries over the schema.

``Store(url)`` opens (and creates) the database; ``Store(url, create=False)`` opens only an
existing bench store and never writes into a file that is not one. SQLite is the default
(``sqlite:///bench.db`` in the working directory, WAL journal, foreign keys on); any
SQLAlchemy URL works, PostgreSQL for shared multi-machine use. Per-example rows are written
and committed one batch at a time, so an interrupted run loses at most one batch. JSON columns
always hold valid JSON: they are written with ``allow_nan=False`` (:mod:`bench.results.jsonvalues`).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, func, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import Session

from bench.errors import StoreError
from bench.results.jsonvalues import null_non_finite, strict_dumps
from bench.results.schema import (SCHEMA_VERSION, Base, CheckRow, EvalKind, EvaluationRow, ExampleResultRow,
                                  MetaRow, ModelRow, ReferenceRow, RunRow, RunStatus, utcnow)

__all__ = ["DEFAULT_URL", "NoStoreError", "Store", "resolve_url"]

DEFAULT_URL = "sqlite:///bench.db"


class NoStoreError(StoreError):
    """There is no bench store at the URL (no file, or a database without bench's tables)."""


def resolve_url(url: str | None = None) -> str:
    """``--db`` if given, else ``$BENCH_DB``, else ``sqlite:///bench.db``; an empty or blank
    ``--db`` or ``$BENCH_DB`` is a :class:`StoreError` (never silently the default)."""
    if url is not None:
        if not url.strip():
            raise StoreError(f"invalid --db {url!r}: an empty database URL; give one, e.g. sqlite:///bench.db")
        return url
    env = os.environ.get("BENCH_DB")
    if env is not None:
        if not env.strip():
            raise StoreError("BENCH_DB is set but empty: unset it or give a database URL, e.g. sqlite:///bench.db")
        return env
    return DEFAULT_URL


def sqlite_file(url: str) -> Path | None:
    """The file of a file-backed SQLite URL; ``None`` for in-memory SQLite and other databases."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def _is_bench_file(path: Path) -> bool:
    """Whether the SQLite file ``path`` holds bench's tables; opened read-only, so nothing is written."""
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open result store at {path}: {exc}") from None
    try:
        query = "SELECT 1 FROM sqlite_master WHERE type='table' AND name='bench_meta'"
        return conn.execute(query).fetchone() is not None
    except sqlite3.DatabaseError:  # "file is not a database"
        return False
    finally:
        conn.close()


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
    """The result store at ``url``.

    ``create=True`` (``bench run``) creates the database and its tables if needed.
    ``create=False`` (every other command) opens only an existing bench store: a missing file,
    or a database without bench's tables (an empty file, another program's SQLite file), is a
    :class:`NoStoreError` and nothing is written to it. Either way an older bench store is
    migrated in place (:meth:`_migrate`).
    """

    def __init__(self, url: str | None = None, create: bool = True) -> None:
        self.url = resolve_url(url)
        path = sqlite_file(self.url)
        if not create and path is not None and path.parent.is_dir() and not path.is_dir():  # else: _connect says why
            if not path.exists():
                raise NoStoreError(f"no result store at {path}: run `bench run` first, or pass --db / set BENCH_DB")
            if not _is_bench_file(path):  # checked before connecting: the WAL pragma would write a header
                raise NoStoreError(f"{path} is not a bench result store (it has no bench tables); "
                                   "pass --db / set BENCH_DB to a store `bench run` made")
        self.engine = self._connect(self.url, create)

    @classmethod
    def existing(cls, url: str | None = None) -> Store | None:
        """The bench store at ``url``, or ``None`` when there is none yet; creates nothing.
        Other problems (a bad URL, a missing directory, another schema version) still raise."""
        try:
            return cls(url, create=False)
        except NoStoreError:
            return None

    # -- opening ------------------------------------------------------------------------
    @staticmethod
    def _connect(url: str, create: bool = True) -> Engine:
        path = sqlite_file(url)
        if path is not None:
            if not path.parent.exists():
                raise StoreError(f"cannot open result store '{url}': directory {path.parent} does not exist")
            if path.is_dir():
                raise StoreError(f"cannot open result store '{url}': {path} is a directory")
        try:
            engine = create_engine(url, json_serializer=strict_dumps)
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
            if not create:
                Store._require_bench_tables(engine, url)
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

    @staticmethod
    def _require_bench_tables(engine: Engine, url: str) -> None:
        """Refuse a database without bench's tables (``create=False``), before anything is written."""
        from sqlalchemy import inspect

        if not inspect(engine).has_table(MetaRow.__tablename__):
            engine.dispose()
            raise NoStoreError(f"'{url}' is not a bench result store (it has no bench tables); "
                               "pass --db / set BENCH_DB to a store `bench run` made")

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
        """Return the id of the model row ``key``, creating or updating it with ``fields``.

        A non-finite number in ``train_summary`` (a diverged loss) is stored as null, and the
        paths of the nulled values are listed under its ``non_finite`` key."""
        if fields.get("train_summary") is not None:
            fields["train_summary"] = _finite_summary(fields["train_summary"])
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
        """Insert one batch of per-example rows and the batch's cost, in one transaction.
        A non-finite multilabel score (a model whose output is NaN) is stored as null."""
        with self.session() as s:
            s.add_all(ExampleResultRow(evaluation_id=evaluation_id, **_finite_multilabel(row)) for row in rows)
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


def _finite_summary(summary: Any) -> Any:
    clean, nulled = null_non_finite(summary)
    if nulled and isinstance(clean, dict):
        clean["non_finite"] = nulled
    return clean


def _finite_multilabel(row: dict[str, Any]) -> dict[str, Any]:
    if row.get("multilabel") is None:
        return row
    return {**row, "multilabel": null_non_finite(row["multilabel"])[0]}


def iso(ts: datetime | None) -> str | None:
    return ts.isoformat() if ts is not None else None
