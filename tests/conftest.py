"""Shared fixtures: a fresh store per test, and the vendored interop vectors' location."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.store.sqlite import SqliteStore as Store

pytest_plugins = ["tests.pgfixture"]

ROOT = Path(__file__).resolve().parents[1]
INTEROP = Path(__file__).resolve().parent / "interop"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path / "db.sqlite3")
    yield s
    s.close()
