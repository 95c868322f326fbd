"""The throwaway PostgreSQL server (tests/pgserver.py) and its fixtures (tests/pgfixture.py) work."""

from __future__ import annotations

import os
import pwd
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.pgserver import PG_BIN_ENV, PgServer, PgServerError, find_pg_bin

# Harmless once tests/conftest.py registers the plugin too: pytest loads a plugin only once.


def scalar(conn: psycopg.Connection[Any], query: str) -> Any:
    row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def test_create_insert_select(pg_url: str, pg_server: PgServer) -> None:
    assert pg_url.startswith(f"postgresql://postgres@127.0.0.1:{pg_server.port}/")
    with psycopg.connect(pg_url) as conn:
        conn.execute("CREATE TABLE items (id bigserial PRIMARY KEY, name text NOT NULL)")
        conn.execute("INSERT INTO items (name) VALUES (%s), (%s)", ("a", "b"))
        conn.commit()
        assert conn.execute("SELECT id, name FROM items ORDER BY id").fetchall() == [(1, "a"), (2, "b")]


def test_each_url_is_its_own_database(pg_url: str, pg_url_factory: Callable[[], str]) -> None:
    urls = [pg_url, pg_url_factory(), pg_url_factory()]
    assert len(set(urls)) == 3
    with psycopg.connect(urls[0], autocommit=True) as conn:
        conn.execute("CREATE TABLE only_here (x int)")
    names = set()
    for url in urls:
        with psycopg.connect(url) as conn:
            names.add(scalar(conn, "SELECT current_database()"))
            assert url.endswith(f"/{scalar(conn, 'SELECT current_database()')}")
            exists = scalar(conn, "SELECT to_regclass('only_here') IS NOT NULL")
            assert exists is (url == pg_url)
    assert len(names) == 3


def test_server_runs_unprivileged(pg_url: str, pg_server: PgServer) -> None:
    with psycopg.connect(pg_url) as conn:
        data_dir = Path(str(scalar(conn, "SELECT current_setting('data_directory')")))
        backend_pid = scalar(conn, "SELECT pg_backend_pid()")
        # the backend serving this connection, looked at while the connection (and so the backend) lives
        backend_uid = Path(f"/proc/{backend_pid}").stat().st_uid
    assert data_dir == pg_server.data_dir
    data_owner = data_dir.stat().st_uid
    if os.geteuid() == 0:
        assert data_owner != 0
        assert backend_uid != 0
        assert pwd.getpwuid(backend_uid).pw_name == pg_server.os_user
    else:
        assert data_owner == backend_uid == os.geteuid()


CLAIM_ONE = "SELECT id FROM jobs WHERE claimed_by IS NULL ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED"


def make_jobs(url: str, count: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE jobs (id int PRIMARY KEY, claimed_by text)")
        conn.execute("INSERT INTO jobs SELECT g, NULL FROM generate_series(1, %s) AS g", (count,))


def test_skip_locked_two_connections(pg_url: str) -> None:
    make_jobs(pg_url, 3)
    with psycopg.connect(pg_url) as a, psycopg.connect(pg_url) as b:
        assert a.execute(CLAIM_ONE).fetchone() == (1,)
        assert b.execute(CLAIM_ONE).fetchone() == (2,)  # skipped a's locked row instead of waiting for it
        with psycopg.connect(pg_url) as c:
            assert c.execute(CLAIM_ONE).fetchone() == (3,)
            with psycopg.connect(pg_url) as d:
                assert d.execute(CLAIM_ONE).fetchone() is None  # everything left is locked by someone else
        with pytest.raises(psycopg.errors.LockNotAvailable):
            b.execute("SELECT id FROM jobs WHERE id = 1 FOR UPDATE NOWAIT")  # a really holds row 1
        b.rollback()
        a.rollback()  # a gives its rows back: they are claimable again
        assert b.execute(CLAIM_ONE).fetchone() == (1,)


def test_skip_locked_concurrent_claimers_never_share_a_row(pg_url: str) -> None:
    jobs, claimers = 300, 4
    make_jobs(pg_url, jobs)
    claimed: dict[str, list[int]] = {f"w{i}": [] for i in range(claimers)}
    errors: list[BaseException] = []
    barrier = threading.Barrier(claimers)

    def claimer(name: str) -> None:
        try:
            with psycopg.connect(pg_url, autocommit=True) as conn:
                barrier.wait(timeout=30)
                while True:
                    row = conn.execute(
                        f"UPDATE jobs SET claimed_by = %s WHERE id = ({CLAIM_ONE}) RETURNING id", (name,)
                    ).fetchone()
                    if row is None:
                        return
                    claimed[name].append(row[0])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=claimer, args=(name,)) for name in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    every = [job for ids in claimed.values() for job in ids]
    assert len(every) == len(set(every)) == jobs  # nobody got a row twice, and every row was claimed
    with psycopg.connect(pg_url) as conn:
        by_db: dict[int, str] = dict(conn.execute("SELECT id, claimed_by FROM jobs").fetchall())
    assert by_db == {job: name for name, ids in claimed.items() for job in ids}


def test_bin_override(monkeypatch: pytest.MonkeyPatch, pg_server: PgServer) -> None:
    monkeypatch.setenv(PG_BIN_ENV, str(pg_server.bin_dir))
    assert find_pg_bin() == pg_server.bin_dir
    monkeypatch.setenv(PG_BIN_ENV, "/nonexistent/postgresql/bin")
    with pytest.raises(PgServerError, match=PG_BIN_ENV):
        find_pg_bin()
