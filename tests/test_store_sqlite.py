"""What only the SQLite backend has: the file, its pragmas, migrations, start-up errors, the instance lock."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from daemon.errors import StartupError
from daemon.store.schema import MIGRATIONS, SCHEMA_VERSION
from daemon.store.sqlite import SqliteStore

NOW = 1_700_000_000.0
DID_A = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"
COLL = "com.example.record"


def test_a_new_database_is_at_the_current_schema_in_wal_with_full_sync(sqlite_store: SqliteStore) -> None:
    assert sqlite_store.schema_version() == SCHEMA_VERSION
    with sqlite_store._read() as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def _v2_database(path: Path) -> None:
    """A database as the previous release left it: a finished run with queued, unacknowledged records."""
    conn = sqlite3.connect(path, isolation_level=None)
    for script in MIGRATIONS[:2]:
        conn.executescript(script)
    conn.execute("PRAGMA user_version = 2")
    conn.execute(
        "INSERT INTO did_cache (did, pds, signing_key, resolved_at, first_seen_at, last_seen_at) "
        "VALUES (?, 'https://pds.example', 'zKey', 1, 1, 1)",
        (DID_A,),
    )
    conn.execute(
        "INSERT INTO runs (mode, collections, created_at, finished_at) VALUES ('explicit', ?, 1, 2)",
        (json.dumps([COLL]),),
    )
    conn.execute(
        "INSERT INTO jobs (run_id, kind, did, collection, state, not_before, created_at, updated_at, pages, "
        "records_enqueued) VALUES (1, 'backfill', ?, ?, 'done', 1, 1, 2, 1, 2)",
        (DID_A, COLL),
    )
    for rkey in ("3kaaaaaaaaaa2", "3kaaaaaaaaaa3"):
        conn.execute(
            "INSERT INTO records (did, collection, rkey, operation, cid, source, run_id) "
            "VALUES (?, ?, ?, 'create', 'bafyold', 'backfill', 1)",
            (DID_A, COLL, rkey),
        )
    conn.execute("UPDATE queue_stats SET depth = 2")
    conn.close()


def test_the_previous_schema_migrates_keeping_the_queue_readable(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    _v2_database(path)
    store = SqliteStore.open(path)
    try:
        assert store.schema_version() == SCHEMA_VERSION
        entries = json.loads(store.list_records_json(after=0, limit=10)[0])
        assert [(e["rkey"], e["operation"], e["record"], e["rev"], e["verified"]) for e in entries] == [
            ("3kaaaaaaaaaa2", "create", None, None, False),
            ("3kaaaaaaaaaa3", "create", None, None, False),
        ]
        run = store.get_run(1)
        assert run is not None and run.operations == {"create": 2, "update": 0, "delete": 0}
        publisher = store.get_publisher(DID_A)
        assert publisher is not None and publisher.pds == "https://pds.example"
        # pairs backfilled before the upgrade start with an empty delivered set: their next backfill
        # writes creates (docs/operations.md, upgrading)
        with store._read() as conn:
            assert conn.execute("SELECT count(*) FROM delivered").fetchone()[0] == 0
        store.create_run(mode="explicit", collections=[COLL], dids=[DID_A], now=NOW)
        [job] = store.claim_jobs(now=NOW, limit=5, owner="t", max_records_queue=10)
        assert job.host == "https://pds.example"
    finally:
        store.close()


def test_a_schema_newer_than_it_knows_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite3"
    SqliteStore.open(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StartupError, match="newer") as caught:
        SqliteStore.open(path)
    assert caught.value.code == "schema_too_new"


def test_a_file_that_is_not_a_database_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.sqlite3"
    path.write_bytes(b"this is not an SQLite database, just text " * 100)
    with pytest.raises(StartupError, match="cannot use the database") as caught:
        SqliteStore.open(path)
    assert caught.value.code == "database_unusable"
    SqliteStore.open(tmp_path / "other.sqlite3").close()  # the failed open left no lock behind
    with pytest.raises(StartupError):
        SqliteStore.open(path)


def test_a_database_path_that_is_a_folder_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "adir").mkdir()
    with pytest.raises(StartupError, match="cannot open the database") as caught:
        SqliteStore.open(tmp_path / "adir")
    assert caught.value.code == "database_unusable"


def test_a_database_folder_that_cannot_be_created_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StartupError, match="cannot create the database folder"):
        SqliteStore.open(tmp_path / "file" / "db.sqlite3")


def test_a_second_instance_is_refused_while_the_first_holds_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    first = SqliteStore.open(path)
    try:
        with pytest.raises(StartupError, match=f"pid {os.getpid()}") as caught:
            SqliteStore.open(path)
        assert caught.value.code == "database_locked"
    finally:
        first.close()
    SqliteStore.open(path).close()  # released on close


def test_the_lock_holds_through_a_symlink_and_a_hard_link(tmp_path: Path) -> None:
    real = tmp_path / "real" / "db.sqlite3"
    first = SqliteStore.open(real)
    try:
        (tmp_path / "linked").symlink_to(tmp_path / "real")
        with pytest.raises(StartupError, match="another backfilld"):
            SqliteStore.open(tmp_path / "linked" / "db.sqlite3")
        (tmp_path / "file-link.sqlite3").symlink_to(real)
        with pytest.raises(StartupError, match="another backfilld"):
            SqliteStore.open(tmp_path / "file-link.sqlite3")
        os.link(real, tmp_path / "hard.sqlite3")
        with pytest.raises(StartupError, match="another backfilld"):
            SqliteStore.open(tmp_path / "hard.sqlite3")
    finally:
        first.close()


def test_an_operator_shell_can_read_while_the_daemon_runs(sqlite_store: SqliteStore, tmp_path: Path) -> None:
    sqlite_store.create_run(mode="explicit", collections=[COLL], dids=[DID_A], now=NOW)
    shell = sqlite3.connect(tmp_path / "db.sqlite3")
    try:
        assert shell.execute("SELECT count(*) FROM jobs").fetchone()[0] == 1
    finally:
        shell.close()
