"""The result store: a thin layer of queries over the schema.

``Store(url)`` opens (and creates) the database; ``Store(url, create=False)`` opens only an
existing bench store and never writes into a file that is not one. SQLite is the default
(``sqlite:///bench.db`` in the working directory, WAL journal, foreign keys on); any
SQLAlchemy URL works, PostgreSQL for shared multi-machine use. Per-example rows are written
and committed one batch at a time, so an interrupted run loses at most one batch. JSON columns
always hold valid JSON: they are written with ``allow_nan=False`` (:mod:`bench.results.jsonvalues`).

Many writers may share one store (processes, machines, ranks of a torchrun job; docs/store.md):
creating the schema is serialized (a PostgreSQL advisory lock; retried on SQLite), models, runs
and stages are got-or-created on their unique keys, and per-example rows are inserted with
insert-or-ignore on (evaluation, example index), so two writers of the same deterministic rows
cooperate instead of failing. A database error (read-only file, full disk, lost connection) is
a :class:`StoreError` naming the store with its password hidden (:func:`redact`).
"""

from __future__ import annotations

import functools
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy import Table, and_, create_engine, event, func, or_, select, text, update
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    IntegrityError,
    NoSuchModuleError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.orm import Session

from bench.errors import StoreError
from bench.results.jsonvalues import null_non_finite, strict_dumps
from bench.results.schema import (
    SCHEMA_VERSION,
    Base,
    CheckRow,
    EvalKind,
    EvaluationRow,
    ExampleResultRow,
    MetaRow,
    ModelRow,
    ReferenceRow,
    RunRow,
    RunStatus,
    utcnow,
)

__all__ = ["DEFAULT_URL", "NoStoreError", "Store", "redact", "resolve_url"]

DEFAULT_URL = "sqlite:///bench.db"
SCHEMA_LOCK = 0x62656E6368  # the PostgreSQL advisory lock key held while creating or migrating the schema
RETRIES = 8  # attempts of a write that lost a race (a unique key taken, SQLite busy) before it fails

T = TypeVar("T")
_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")


def redact(text_: str) -> str:
    """``text_`` with the password of every database URL in it replaced by ``***`` (as SQLAlchemy's
    ``render_as_string(hide_password=True)`` writes it). Every URL bench shows or stores passes here."""
    return _PASSWORD.sub(r"\1***@", text_)


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


def _detail(exc: BaseException) -> str:
    """The first line of a database error, passwords hidden."""
    return redact((str(getattr(exc, "orig", None) or exc).splitlines() or [type(exc).__name__])[0])


def _retrying(write: Callable[[], T], attempts: int = RETRIES) -> T:
    """``write()``, again after a short pause when it lost a race with another writer (a unique key
    taken meanwhile, SQLite busy, a catalog collision); the last attempt's error propagates."""
    for attempt in range(attempts):
        try:
            return write()
        except (IntegrityError, OperationalError, DBAPIError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def _guarded(method: Callable[..., T]) -> Callable[..., T]:
    """A store method whose database errors (other than a unique key the caller handles) are a
    one-line :class:`StoreError` naming the store: a read-only file, a full disk, a lost connection."""

    @functools.wraps(method)
    def wrapper(self: Store, *args: Any, **kwargs: Any) -> T:
        try:
            return method(self, *args, **kwargs)
        except IntegrityError:
            raise
        except DBAPIError as exc:  # the database refused (not a value bench failed to encode)
            raise StoreError(f"result store '{redact(self.url)}': {_detail(exc)}") from None

    return wrapper


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
        self._clocks: dict[int, float] = {}  # run id -> when this process last accounted its wall time
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
                raise StoreError(f"cannot open result store '{redact(url)}': directory {path.parent} does not exist")
            if path.is_dir():
                raise StoreError(f"cannot open result store '{redact(url)}': {path} is a directory")
        try:
            engine = create_engine(url, json_serializer=strict_dumps)
        except NoSuchModuleError as exc:
            raise StoreError(f"cannot open result store '{redact(url)}': unsupported database URL ({exc})") from None
        except ModuleNotFoundError as exc:
            hint = " (install bench[postgres] for PostgreSQL)" if "postgres" in url else ""
            raise StoreError(f"cannot open result store '{redact(url)}': missing driver {exc.name}{hint}") from None
        except (ArgumentError, ValueError) as exc:
            raise StoreError(f"cannot open result store '{redact(url)}': invalid database URL ({exc})") from None
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _sqlite_pragmas)
        try:
            if not create:
                Store._require_bench_tables(engine, url)
            _retrying(lambda: Store._create_schema(engine, url))
        except (DBAPIError, SQLAlchemyError) as exc:
            engine.dispose()
            raise StoreError(f"cannot open result store '{redact(url)}': {_detail(exc)}") from None
        return engine

    @staticmethod
    def _create_schema(engine: Engine, url: str) -> None:
        """Create missing tables, migrate, record the schema version: under a PostgreSQL advisory
        lock (concurrent first uses would collide in the catalog); on SQLite a lost race fails
        with "already exists" or "locked" and is retried by the caller (the retry finds the tables)."""
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK})
            Base.metadata.create_all(conn)
        Store._migrate(engine)
        Store._check_columns(engine, url)
        with Session(engine) as session:
            row = session.get(MetaRow, "schema_version")
            if row is None:
                session.add(MetaRow(key="schema_version", value=str(SCHEMA_VERSION)))
                session.commit()
            elif int(row.value) != SCHEMA_VERSION:
                raise StoreError(
                    f"result store '{redact(url)}' has schema version {row.value}; "
                    f"this bench expects {SCHEMA_VERSION}")

    @staticmethod
    def _require_bench_tables(engine: Engine, url: str) -> None:
        """Refuse a database without bench's tables (``create=False``), before anything is written."""
        from sqlalchemy import inspect

        if not inspect(engine).has_table(MetaRow.__tablename__):
            engine.dispose()
            raise NoStoreError(f"'{redact(url)}' is not a bench result store (it has no bench tables); "
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
                raise StoreError(f"result store '{redact(url)}' was made by another bench version: table {table.name} "
                                 f"lacks column(s) {', '.join(missing)}; use a new --db")

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    # -- models -------------------------------------------------------------------------
    @_guarded
    def upsert_model(self, key: str, **fields: Any) -> int:
        """Return the id of the model row ``key``, creating or updating it with ``fields``; safe
        against a concurrent writer of the same key (the loser of the insert updates the row).

        A non-finite number in ``train_summary`` (a diverged loss) is stored as null, and the
        paths of the nulled values are listed under its ``non_finite`` key."""
        if fields.get("train_summary") is not None:
            fields["train_summary"] = _finite_summary(fields["train_summary"])
        return _retrying(lambda: self._upsert_model(key, fields))

    def _upsert_model(self, key: str, fields: dict[str, Any]) -> int:
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

    @_guarded
    def create_run(self, key: str, **fields: Any) -> int:
        """Insert run ``key`` (status running); a key already stored is an ``IntegrityError``."""
        with self.session() as s:
            row = RunRow(key=key, status=RunStatus.RUNNING, **fields)
            s.add(row)
            s.commit()
            return row.id

    @_guarded
    def get_or_create_run(self, key: str, **fields: Any) -> tuple[int, bool]:
        """The id of run ``key`` and whether this call created it. A run another writer stored
        first (an identical run started at the same time) is returned as it is: both then work
        on it, their rows being identical (:meth:`add_results` inserts each row once)."""

        def attempt() -> tuple[int, bool]:
            existing = self.find_run(key)
            if existing is not None:
                return existing.id, False
            return self.create_run(key, **fields), True

        return _retrying(attempt)

    @_guarded
    def update_run(self, run_id: int, **fields: Any) -> None:
        with self.session() as s:
            row = s.get(RunRow, run_id)
            assert row is not None, run_id
            for name, value in fields.items():
                setattr(row, name, value)
            s.commit()

    @_guarded
    def add_run_cost(self, run_id: int, wall_time_s: float, forward: int = 0, backward: int = 0) -> None:
        """Add to the run's cost totals, atomically (an SQL increment: concurrent writers all count)."""
        with self.session() as s:
            s.execute(update(RunRow).where(RunRow.id == run_id).values(
                wall_time_s=func.coalesce(RunRow.wall_time_s, 0.0) + wall_time_s,
                forward_passes=func.coalesce(RunRow.forward_passes, 0) + forward,
                backward_passes=func.coalesce(RunRow.backward_passes, 0) + backward))
            s.commit()

    def start_clock(self, run_id: int, started: float) -> None:
        """Account this process's wall time on ``run_id`` from ``started`` (``time.perf_counter()``)
        on: each committed batch of rows adds the time since the previous one (:meth:`add_results`),
        so a killed session keeps the cost of what it stored; :meth:`stop_clock` adds the rest."""
        self._clocks[run_id] = started

    def stop_clock(self, run_id: int) -> None:
        """Add the wall time since the last committed batch and stop accounting ``run_id``.
        Best effort: a store that no longer accepts writes loses only this remainder."""
        started = self._clocks.pop(run_id, None)
        if started is not None:
            try:
                self.add_run_cost(run_id, time.perf_counter() - started)
            except StoreError:
                pass

    def _lap(self, run_id: int) -> float:
        """Seconds since the run's clock last ticked (0 when this process keeps no clock for it)."""
        last = self._clocks.get(run_id)
        if last is None:
            return 0.0
        now = time.perf_counter()
        self._clocks[run_id] = now
        return now - last

    @_guarded
    def finish_run(self, run_id: int) -> None:
        """Mark the run finished; the caller guarantees every stage holds every row."""
        self.update_run(run_id, status=RunStatus.FINISHED, finished_at=utcnow(), error=None)

    def fail_run(self, run_id: int, error: str) -> None:
        """Mark the run failed, with ``error`` (passwords hidden) as the reason. Best effort: a store
        that no longer accepts writes (read-only, full, disconnected) keeps the run as it was."""
        try:  # a run another writer finished meanwhile stays finished
            with self.session() as s:
                s.execute(update(RunRow).where(RunRow.id == run_id, RunRow.status != RunStatus.FINISHED)
                          .values(status=RunStatus.FAILED, error=redact(error)[:2000]))
                s.commit()
        except (StoreError, SQLAlchemyError):
            pass

    def list_runs(self, dataset: str | None = None, status: RunStatus | None = None) -> list[RunRow]:
        with self.session() as s:
            query = select(RunRow).order_by(RunRow.id)
            if dataset is not None:
                query = query.where(RunRow.dataset == dataset)
            if status is not None:
                query = query.where(RunRow.status == status)
            return list(s.scalars(query))

    # -- evaluations and per-example rows -----------------------------------------------
    @_guarded
    def evaluation(self, run_id: int, position: int, kind: EvalKind, method: str, *, norm: str | None = None,
                   eps: float | None = None, sigma: float | None = None, params: dict[str, Any] | None = None) -> int:
        """Return the id of evaluation ``position`` of the run, creating it if needed (a concurrent
        writer creating the same stage first is joined, not an error).

        An existing row must describe the same stage; otherwise the stored run is inconsistent
        with the protocol and resuming it would mix results.
        """
        return _retrying(lambda: self._evaluation(run_id, position, kind, method, norm, eps, sigma, params))

    def _evaluation(self, run_id: int, position: int, kind: EvalKind, method: str, norm: str | None,
                    eps: float | None, sigma: float | None, params: dict[str, Any] | None) -> int:
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

    @_guarded
    def add_stage(self, run_id: int, kind: EvalKind, method: str, *, norm: str | None = None,
                  eps: float | None = None, params: dict[str, Any] | None = None,
                  record: Callable[[dict[str, Any], int], dict[str, Any]] | None = None) -> tuple[int, bool]:
        """The position of a stage added to a stored run (``bench attack``), and whether it is finished.

        An identical stage already stored (finished, or being computed by another writer) is
        returned; otherwise the stage is inserted at the next free position and, in the same
        transaction, ``record(config, position)`` gives the run's new ``config`` (its
        ``extra_attacks``): the stage and its record appear together or not at all, so neither a
        concurrent ``bench attack`` nor a kill can lose one. Positions are unique per run; a
        writer that lost the race for a position retries with the next one."""
        return _retrying(lambda: self._add_stage(run_id, kind, method, norm, eps, params or {}, record))

    def _add_stage(self, run_id: int, kind: EvalKind, method: str, norm: str | None, eps: float | None,
                   params: dict[str, Any], record: Callable[[dict[str, Any], int], dict[str, Any]] | None
                   ) -> tuple[int, bool]:
        with self.session() as s:
            run = s.scalar(select(RunRow).where(RunRow.id == run_id).with_for_update())  # PostgreSQL: row lock
            assert run is not None, run_id
            stages = list(s.scalars(select(EvaluationRow).where(EvaluationRow.run_id == run_id)))
            for ev in stages:
                if (ev.kind, ev.method, ev.norm, ev.eps, ev.params or {}) == (kind, method, norm, eps, params):
                    if record is not None and not ev.finished:  # e.g. a stage stored before its record was
                        run.config = record(dict(run.config or {}), ev.position)
                        s.commit()
                    return ev.position, ev.finished
            position = max((ev.position for ev in stages), default=0) + 1
            s.add(EvaluationRow(run_id=run_id, position=position, kind=kind, method=method, norm=norm, eps=eps,
                                params=params))
            if record is not None:
                run.config = record(dict(run.config or {}), position)
            s.commit()
            return position, False

    def done_indices(self, evaluation_id: int) -> set[int]:
        with self.session() as s:
            rows = s.scalars(select(ExampleResultRow.example_index)
                             .where(ExampleResultRow.evaluation_id == evaluation_id))
            return set(rows)

    @_guarded
    def add_results(self, evaluation_id: int, rows: Iterable[dict[str, Any]], forward: int = 0,
                    backward: int = 0) -> None:
        """Insert one batch of per-example rows and the batch's cost, in one transaction.

        A row whose (evaluation, example index) is already stored is left as it is (rows are
        deterministic, so another writer stored the same row); the batch's forward and backward
        passes count, on the evaluation and on the run, only when it stored a new row, so the
        totals are those of one sequential run. The run's wall time gains the time since its last
        committed batch (:meth:`start_clock`), so a killed session keeps the cost of what it
        stored. A non-finite multilabel score (a model whose output is NaN) is stored as null."""
        values = [_row_values(evaluation_id, row) for row in rows]
        with self.session() as s:
            inserted = self._insert_new(s.connection(), values) if values else 0
            ev = s.get(EvaluationRow, evaluation_id)
            assert ev is not None
            if inserted:
                ev.forward_passes += forward
                ev.backward_passes += backward
            else:
                forward = backward = 0
            s.execute(update(RunRow).where(RunRow.id == ev.run_id).values(
                wall_time_s=func.coalesce(RunRow.wall_time_s, 0.0) + self._lap(ev.run_id),
                forward_passes=func.coalesce(RunRow.forward_passes, 0) + forward,
                backward_passes=func.coalesce(RunRow.backward_passes, 0) + backward))
            s.commit()

    @staticmethod
    def _insert_new(conn: Connection, values: list[dict[str, Any]]) -> int:
        """Insert the rows not stored yet (insert-or-ignore on the unique key); how many were new."""
        table = cast(Table, ExampleResultRow.__table__)  # typed FromClause; a mapped class's __table__ is a Table
        name = conn.dialect.name
        if name in ("sqlite", "postgresql"):
            if name == "sqlite":
                from sqlalchemy.dialects.sqlite import insert
            else:
                # the same on_conflict_do_nothing API as sqlite's insert, with its own Insert class
                from sqlalchemy.dialects.postgresql import insert  # type: ignore[assignment]
            stmt = (insert(table).values(values)
                    .on_conflict_do_nothing(index_elements=["evaluation_id", "example_index"])
                    .returning(table.c.example_index))  # the new rows (psycopg reports no rowcount here)
            return len(conn.execute(stmt).all())
        stored = set(conn.scalars(select(ExampleResultRow.example_index).where(
            ExampleResultRow.evaluation_id == values[0]["evaluation_id"],
            ExampleResultRow.example_index.in_([v["example_index"] for v in values]))))
        new = [v for v in values if v["example_index"] not in stored]
        if new:
            conn.execute(table.insert(), new)
        return len(new)

    @_guarded
    def skip_evaluation(self, evaluation_id: int, reason: str) -> None:
        """Mark a stage that cannot run on this model: finished, no rows, with the reason."""
        with self.session() as s:
            ev = s.get(EvaluationRow, evaluation_id)
            assert ev is not None
            ev.skipped, ev.finished = reason[:1000], True
            s.commit()

    @_guarded
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

    def correct_indices(self, evaluation_id: int, any_draw: bool = False) -> set[int]:
        """Indices of the examples this evaluation stored as correct (on every one of their R draws);
        with ``any_draw``, those correct on at least one draw (``correct_draws > 0``; a row without
        a draw count counts by ``correct``)."""
        row = ExampleResultRow
        hit = (or_(row.correct_draws > 0, and_(row.correct_draws.is_(None), row.correct.is_(True))) if any_draw
               else row.correct.is_(True))
        with self.session() as s:
            return set(s.scalars(select(row.example_index).where(row.evaluation_id == evaluation_id, hit)))

    def count_results(self, evaluation_id: int) -> int:
        with self.session() as s:
            return int(s.scalar(select(func.count()).select_from(ExampleResultRow)
                                .where(ExampleResultRow.evaluation_id == evaluation_id)) or 0)

    # -- checks and references ----------------------------------------------------------
    @_guarded
    def set_check(self, run_id: int, name: str, triggered: bool, detail: str) -> None:
        """Record a check's outcome (insert or update; a concurrent writer of the same check is retried)."""
        _retrying(lambda: self._set_check(run_id, name, triggered, detail))

    def _set_check(self, run_id: int, name: str, triggered: bool, detail: str) -> None:
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


def _row_values(evaluation_id: int, row: dict[str, Any]) -> dict[str, Any]:
    """Every column of an ``example_results`` row (a multi-row INSERT needs the same keys in each):
    the given values, else the column's default."""
    row = _finite_multilabel(row)
    out: dict[str, Any] = {"evaluation_id": evaluation_id}
    for column in ExampleResultRow.__table__.columns:
        if column.name in ("id", "evaluation_id"):
            continue
        default = column.default.arg if column.default is not None and column.default.is_scalar else None
        out[column.name] = row.get(column.name, default)
    return out


def _finite_multilabel(row: dict[str, Any]) -> dict[str, Any]:
    if row.get("multilabel") is None:
        return row
    return {**row, "multilabel": null_non_finite(row["multilabel"])[0]}


def iso(ts: datetime | None) -> str | None:
    return ts.isoformat() if ts is not None else None
