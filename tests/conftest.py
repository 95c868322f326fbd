"""Shared fixtures: a fresh store per test on every backend, and the vendored interop vectors' location."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.store.postgres import PostgresStore
from daemon.store.sqlite import SqliteStore
from daemon.store.store import Store

pytest_plugins = ["tests.pgfixture"]

ROOT = Path(__file__).resolve().parents[1]
INTEROP = Path(__file__).resolve().parent / "interop"

# Every backend the conformance suites run against.
BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A fresh, migrated store of each backend (PostgreSQL: a new database on the session's server)."""
    opened: SqliteStore | PostgresStore
    if request.param == "postgres":
        opened = PostgresStore.open(request.getfixturevalue("pg_url"))
    else:
        opened = SqliteStore.open(tmp_path / "db.sqlite3")
    yield opened
    opened.close()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SqliteStore]:
    """A fresh SQLite store (for tests of SQLite itself)."""
    opened = SqliteStore.open(tmp_path / "db.sqlite3")
    yield opened
    opened.close()
