"""The SQLite thread hop: ordering, group commit, and real SQLite failures inside and around a group.

The faults are real: ``PRAGMA max_page_count`` makes the disk "full" (SQLITE_FULL), a deferred foreign
key makes a COMMIT fail and leave the transaction open, a second connection holds the write lock
(SQLITE_BUSY after the busy timeout), and a unique index refuses a row.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog
import structlog.testing
import trio

from daemon.errors import StoreError
from daemon.store.database import SerialDatabase
from daemon.store.sqlite import SqliteStore

NOW = 1_700_000_000.0


@asynccontextmanager
async def database(path: Path, **kw: Any) -> AsyncIterator[SerialDatabase]:
    db = SerialDatabase(SqliteStore.open(path, **kw))
    try:
        yield db
    finally:
        await db.aclose()


def execute(store: SqliteStore, sql: str, params: tuple[Any, ...] = ()) -> int:
    """A store call that writes ``sql`` in its own transaction (a savepoint inside a group)."""
    with store._tx() as conn:
        return conn.execute(sql, params).rowcount


def count(path: Path, table: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        conn.close()


async def grouped(db: SerialDatabase, calls: list[Callable[[], Any]]) -> list[Any]:
    """Run ``calls`` while the thread is held, so they queue up and form one group; results or errors."""
    gate = threading.Event()
    results: list[Any] = [None] * len(calls)

    async def one(index: int, fn: Callable[[], Any]) -> None:
        try:
            results[index] = await db.run(fn)
        except Exception as exc:
            results[index] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(db.run, gate.wait)
        await trio.sleep(0.05)
        for index, fn in enumerate(calls):
            nursery.start_soon(one, index, fn)
            await trio.sleep(0.01)
        gate.set()
    return results


async def test_calls_return_their_results_and_errors(tmp_path: Path) -> None:
    async with database(tmp_path / "db.sqlite3") as db:
        assert await db.run(db.store.ping) is True

        def boom() -> None:
            raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            await db.run(boom)
        assert await db.run(db.store.queue_depth) == 0


async def test_queued_calls_form_one_group_and_a_failing_call_rolls_back_alone(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    async with database(path) as db:
        store = db.store
        execute(store, "CREATE TABLE t (k TEXT PRIMARY KEY)")
        results = await grouped(
            db,
            [
                lambda: execute(store, "INSERT INTO t VALUES ('a')"),
                lambda: execute(store, "INSERT INTO t VALUES ('a')"),  # unique violation
                lambda: execute(store, "INSERT INTO t VALUES ('b')"),
            ],
        )
        assert results[0] == 1 and results[2] == 1
        assert isinstance(results[1], StoreError) and "UNIQUE" in results[1].message
        assert (db.groups, db.grouped_calls) == (1, 3)  # one transaction for the three calls
        assert count(path, "t") == 2


async def test_a_full_disk_inside_a_group_reruns_the_other_calls_alone(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    async with database(path) as db:
        store = db.store
        execute(store, "CREATE TABLE t (k TEXT PRIMARY KEY, v TEXT)")
        execute(store, "INSERT INTO t VALUES ('a', 'x'), ('b', 'x')")
        with store._read() as conn:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {pages}")
        results = await grouped(
            db,
            [
                lambda: execute(store, "UPDATE t SET v = 'y' WHERE k = 'a'"),
                lambda: execute(store, "INSERT INTO t VALUES ('big', ?)", ("z" * 1_000_000,)),
                lambda: execute(store, "UPDATE t SET v = 'y' WHERE k = 'b'"),
            ],
        )
        assert results[0] == 1 and results[2] == 1
        assert isinstance(results[1], StoreError) and results[1].code == "database_full"
        assert db.groups == 0  # the group was abandoned and its calls ran one by one
        with store._read() as conn:
            assert not conn.in_transaction
        conn = sqlite3.connect(path)
        assert conn.execute("SELECT k, v FROM t ORDER BY k").fetchall() == [("a", "y"), ("b", "y")]
        conn.close()
        assert db.failing is None  # the last call succeeded: the database answers again


async def test_a_failed_commit_is_rolled_back_and_later_calls_commit(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    async with database(path) as db:
        store = db.store
        execute(store, "CREATE TABLE parent (id INTEGER PRIMARY KEY)")
        execute(
            store,
            "CREATE TABLE child (pid INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)",
        )
        execute(store, "CREATE TABLE t (k TEXT)")
        results = await grouped(
            db,
            [
                lambda: execute(store, "INSERT INTO t VALUES ('a')"),
                lambda: execute(store, "INSERT INTO child VALUES (999)"),  # only COMMIT notices
                lambda: execute(store, "INSERT INTO t VALUES ('b')"),
            ],
        )
        assert results[0] == 1 and results[2] == 1
        assert isinstance(results[1], StoreError) and "FOREIGN KEY" in results[1].message
        with store._read() as conn:
            assert not conn.in_transaction
        assert await db.run(execute, store, "INSERT INTO t VALUES ('c')") == 1
        assert count(path, "t") == 3 and count(path, "child") == 0


async def test_a_held_write_lock_fails_calls_cleanly_until_released(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    async with database(path, busy_timeout=0.2) as db:
        store = db.store
        execute(store, "CREATE TABLE t (k TEXT)")
        shell = sqlite3.connect(path, isolation_level=None)
        shell.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(StoreError) as caught:
                await db.run(execute, store, "INSERT INTO t VALUES ('a')")
            assert caught.value.code == "database_busy"
            assert db.failing is not None and db.failing.code == "database_busy"
            with pytest.raises(StoreError):  # a ping says the daemon cannot write now, at once
                await db.run(store.ping)
            results = await grouped(db, [lambda: execute(store, "INSERT INTO t VALUES ('b')")] * 2)
            assert all(isinstance(r, StoreError) and r.code == "database_busy" for r in results)
        finally:
            shell.execute("ROLLBACK")
            shell.close()
        assert await db.run(execute, store, "INSERT INTO t VALUES ('c')") == 1
        assert db.failing is None and await db.run(store.ping)
        assert count(path, "t") == 1


async def test_a_queued_call_can_be_cancelled_and_never_runs(tmp_path: Path) -> None:
    async with database(tmp_path / "db.sqlite3") as db:
        gate = threading.Event()
        ran: list[str] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(db.run, gate.wait)
            await trio.sleep(0.05)
            with trio.move_on_after(0.05) as scope:
                await db.run(ran.append, "late")
            assert scope.cancelled_caught
            gate.set()
        assert await db.run(db.store.ping)
        assert ran == []


async def test_a_posted_call_returns_at_once_and_runs_in_order(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    async with database(path) as db:
        store = db.store
        execute(store, "CREATE TABLE t (k TEXT PRIMARY KEY)")
        gate = threading.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(db.run, gate.wait)
            await trio.sleep(0.05)
            # the thread is held: a run() would wait; post() returns while its call is still queued
            await db.post(execute, store, "INSERT INTO t VALUES ('a')")
            assert count(path, "t") == 0
            gate.set()
        # a later call queues behind it, so it sees its write
        assert await db.run(execute, store, "SELECT 1 FROM t WHERE k = 'a'") == -1
        assert count(path, "t") == 1


async def test_a_posted_call_that_fails_is_logged_and_raises_nowhere(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    async with database(path) as db:
        store = db.store
        execute(store, "CREATE TABLE t (k TEXT PRIMARY KEY)")
        await db.run(execute, store, "INSERT INTO t VALUES ('a')")
        with structlog.testing.capture_logs() as logs:
            await db.post(execute, store, "INSERT INTO t VALUES ('a')")  # unique violation
            await db.post(execute, store, "INSERT INTO t VALUES ('b')")
            assert await db.run(store.ping)
        failed = [e for e in logs if e["event"] == "a store write failed"]
        assert len(failed) == 1 and failed[0]["call"] == "execute" and "UNIQUE" in failed[0]["error"]
        assert count(path, "t") == 2


async def test_a_call_posted_after_close_is_dropped_and_logged(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    async with database(path) as db:
        execute(db.store, "CREATE TABLE t (k TEXT)")
    with structlog.testing.capture_logs() as logs:
        await db.post(execute, db.store, "INSERT INTO t VALUES ('late')")
    assert [e["event"] for e in logs] == ["a store write after close was dropped"]
    assert count(path, "t") == 0
