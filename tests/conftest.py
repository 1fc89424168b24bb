"""Shared fixtures: every test runs in its own working directory (so the default
``sqlite:///bench.db`` is per test) with one session-wide model cache (BENCH_HOME), so a model
trained by one test is reused by the next instead of being retrained."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _bench_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("bench_home")
    old = {k: os.environ.get(k) for k in ("BENCH_HOME", "BENCH_DB", "BENCH_DATA")}
    os.environ["BENCH_HOME"] = str(home)
    os.environ.pop("BENCH_DB", None)
    os.environ.pop("BENCH_DATA", None)
    yield home
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'results.db'}"


@pytest.fixture(scope="session")
def data():
    """The synthetic dataset's (train, test) splits: tiny, generated, the same for every test."""
    from bench.data.base import get_dataset

    ds = get_dataset("synthetic")
    return ds.load("train"), ds.load("test")


@pytest.fixture
def one_thread():
    """Tiny models: intra-op threads only add overhead (and spin when the machine is busy)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def postgres_url() -> str:
    """A fresh, empty PostgreSQL database for one test (dropped after it), on the server whose
    URL is in ``$BENCH_TEST_POSTGRES`` (``.ci/run`` starts one); the test is skipped without it."""
    import uuid

    server = os.environ.get("BENCH_TEST_POSTGRES")
    if not server:
        pytest.skip("BENCH_TEST_POSTGRES is not set (.ci/run starts a PostgreSQL server and sets it)")
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield make_url(server).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def new_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a new, not yet created result store: an SQLite file, and (marked ``postgres``)
    an empty PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    return request.getfixturevalue("postgres_url")
