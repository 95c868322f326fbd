"""PostgreSQL specifics: migrations, several daemons on one database, leases taken over, start-up errors,
timeouts, calls cancelled from trio, and the records queue's ordering under out-of-order commits.

Every test here runs against the session's throwaway server (tests/pgserver.py); with ``CI=true`` a
missing server fails instead of skipping.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import structlog
import structlog.testing
import trio

from daemon.errors import Code, JobLost, StartupError, StoreError
from daemon.store.models import Job, Lease, ListedRecord, PageResult
from daemon.store.open import open_database
from daemon.store.pg_schema import DEPTH_SHARDS, SCHEMA_VERSION
from daemon.store.pooled import PooledDatabase
from daemon.store.postgres import PostgresStore, placeholders, redact, translate
from tests.pgserver import PgServer, free_port
from tests.test_store_conformance import page

NOW = 1_700_000_000.0
COLL = "com.example.record"


def did(n: int) -> str:
    return f"did:plc:{n:024d}"


def listed(prefix: str, n: int) -> list[ListedRecord]:
    return [
        ListedRecord(f"{prefix}{i:04d}", f"c{prefix}{i}", json.dumps({"$type": COLL, "i": i}))
        for i in range(n)
    ]


def claim(store: PostgresStore, limit: int, **kw: Any) -> list[Job]:
    return store.claim_jobs(
        now=NOW, limit=limit, owner=kw.pop("owner", "test"), max_records_queue=10**9, **kw
    )


def ids_of(text: str) -> list[int]:
    return [entry["id"] for entry in json.loads(text)]


@pytest.fixture
def open_store(pg_url: str) -> Iterator[Callable[..., PostgresStore]]:
    """Open any number of stores ("daemons") on this test's database; all closed afterwards."""
    opened: list[PostgresStore] = []

    def make(**options: Any) -> PostgresStore:
        opened.append(PostgresStore.open(pg_url, **options))
        return opened[-1]

    yield make
    for store in opened:
        store.close()


def sql(url: str, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on a connection of its own (the view of an outside observer)."""
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(statement, params or None)
        return cur.fetchall() if cur.description else []


# -- schema ---------------------------------------------------------------------------------------------


def test_migrations_on_a_fresh_database_and_an_idempotent_reopen(pg_url: str) -> None:
    store = PostgresStore.open(pg_url)
    assert store.schema_version() == SCHEMA_VERSION
    tables = {name for (name,) in sql(pg_url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert tables == {
        "schema_version",
        "runs",
        "run_discovery",
        "run_dids",
        "jobs",
        "records",
        "queue_stats",
        "did_cache",
        "pairs",
        "delivered",
        "run_commits",
    }
    indexes = {
        name for (name,) in sql(pg_url, "SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")
    }
    assert {"jobs_one_active_pair", "jobs_ordered", "jobs_due", "jobs_by_run", "delivered_pkey"} <= indexes
    assert sql(pg_url, "SELECT count(*), sum(depth) FROM queue_stats") == [(DEPTH_SHARDS, 0)]
    store.put_publisher(did=did(1), pds="https://pds.example", signing_key=None, signing_key_id=None, now=NOW)
    store.close()
    again = PostgresStore.open(pg_url)
    try:
        assert again.schema_version() == SCHEMA_VERSION
        assert sql(pg_url, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]
        assert again.get_publisher(did(1)) is not None
    finally:
        again.close()


def test_daemons_starting_at_once_migrate_once(pg_url: str) -> None:
    barrier = threading.Barrier(6)
    outcomes: list[object] = []

    def start() -> None:
        barrier.wait()
        try:
            store = PostgresStore.open(pg_url)
        except Exception as exc:
            outcomes.append(exc)
            return
        outcomes.append(store.schema_version())
        store.close()

    threads = [threading.Thread(target=start) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes == [SCHEMA_VERSION] * 6
    assert sql(pg_url, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]


def test_a_newer_schema_refuses_to_start(pg_url: str) -> None:
    PostgresStore.open(pg_url).close()
    sql(pg_url, "UPDATE schema_version SET version = 99")
    with pytest.raises(StartupError) as caught:
        PostgresStore.open(pg_url)
    assert caught.value.code == Code.SCHEMA_TOO_NEW
    assert "99" in caught.value.message and "upgrade backfilld" in caught.value.message


# -- start-up errors --------------------------------------------------------------------------------------


def _startup_error(url: str) -> StartupError:
    with pytest.raises(StartupError) as caught:
        PostgresStore.open(url, connect_timeout=5)
    error = caught.value
    assert error.code == Code.DATABASE_UNUSABLE
    assert "\n" not in str(error) and "hunter2" not in str(error)
    return error


def test_an_unreachable_server_is_one_clear_line_without_the_password() -> None:
    error = _startup_error(f"postgresql://backfilld:hunter2@127.0.0.1:{free_port()}/backfilld")
    assert error.message.startswith("cannot use the database postgresql://backfilld:***@127.0.0.1:")
    assert "Connection refused" in error.message


def test_a_wrong_database_name_or_role_is_one_clear_line(pg_server: PgServer) -> None:
    base = f"postgresql://postgres:hunter2@{pg_server.host}:{pg_server.port}"
    error = _startup_error(f"{base}/no_such_database")
    assert 'database "no_such_database" does not exist' in error.message
    error = _startup_error(f"postgresql://nobody_here:hunter2@{pg_server.host}:{pg_server.port}/postgres")
    assert 'role "nobody_here" does not exist' in error.message
    error = _startup_error(f"{pg_server.url('no_such_database')}?password=hunter2&sslmode=disable")
    assert "password=***&sslmode=disable" in error.message
    error = _startup_error(f"postgresql://postgres:hunter2@{pg_server.host}/db?no_such_option=1")
    assert 'invalid URI query parameter: "no_such_option"' in error.message


def test_redaction_and_placeholders() -> None:
    assert redact("postgresql://u:p%40ss@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact("postgres://u:a@b@h/db?password=x&application_name=y") == (
        "postgres://u:***@h/db?password=***&application_name=y"
    )
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"
    assert placeholders("SELECT ? || '?' || \"a?\", 5 % 2 WHERE x = ?") == (
        "SELECT %s || '?' || \"a?\", 5 %% 2 WHERE x = %s"
    )


# -- two daemons on one database ------------------------------------------------------------------------


def test_two_daemons_claiming_at_once_never_get_the_same_job(
    open_store: Callable[..., PostgresStore],
) -> None:
    first, second = open_store(pool_size=4), open_store(pool_size=4)
    jobs = 600
    first.create_run(mode="explicit", collections=[COLL], dids=[did(n) for n in range(jobs)], now=NOW)
    claimed: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker(store: PostgresStore, owner: str) -> None:
        barrier.wait()
        while True:
            got = claim(store, random.randint(1, 9), owner=owner)
            if not got:
                return
            with lock:
                claimed.extend(job.id for job in got)
            for job in got:
                store.finish_job(job.lease, state="done", now=NOW)

    threads = [
        threading.Thread(target=worker, args=(store, f"daemon-{i % 2}"))
        for i, store in enumerate([first, second] * 4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(claimed) == jobs and len(set(claimed)) == jobs
    assert first.job_counts()["done"] == jobs


def test_a_stale_lease_writes_nothing_once_another_daemon_took_it_over(
    open_store: Callable[..., PostgresStore], pg_url: str
) -> None:
    dead, alive = open_store(), open_store()
    run_id, _ = dead.create_run(mode="explicit", collections=[COLL], dids=[did(1)], now=NOW)
    [held] = claim(dead, 1, owner="dead", lease_until=NOW + 10)
    assert page(dead, held, listed("a", 2), cursor="p2") == PageResult(created=2)
    assert alive.recover_jobs(NOW + 5, expired_only=True) == (0, 0)  # not expired yet
    assert alive.recover_jobs(NOW + 20, expired_only=True) == (1, 0)
    [taken] = claim(alive, 1, owner="alive", lease_until=NOW + 50)
    assert taken.id == held.id and taken.lease_token == held.lease_token + 1
    assert taken.cursor == "p2"  # the new holder resumes after the last saved page
    with pytest.raises(JobLost):
        page(dead, held, listed("b", 3), cursor="p3")
    with pytest.raises(JobLost):
        dead.begin_walk(held.lease, commit_cid="bafy", now=NOW)
    with pytest.raises(JobLost):
        dead.reschedule_job(held.lease, not_before=NOW, now=NOW, refund_attempt=True)
    with pytest.raises(JobLost):
        dead.finish_job(held.lease, state="done", now=NOW)
    assert dead.renew_leases([held.lease], owner="dead", until=NOW + 100) == set()
    assert alive.renew_leases([taken.lease], owner="alive", until=NOW + 100) == {taken.id}
    last = page(alive, taken, listed("a", 2))
    assert last == PageResult() and last.finished is not None and last.finished.state == "done"
    text, _ = alive.list_records_json(after=0, limit=100)
    assert [e["rkey"] for e in json.loads(text)] == ["a0000", "a0001"]
    run = alive.get_run(run_id)
    assert run is not None and run.state == "finished"
    # the refused writes rolled back and left no connection inside a transaction
    assert sql(pg_url, "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'") == [
        (0,)
    ]


def test_the_sharded_queue_depth_sums_concurrent_pages(open_store: Callable[..., PostgresStore]) -> None:
    stores = [open_store(pool_size=2) for _ in range(3)]
    stores[0].create_run(mode="explicit", collections=[COLL], dids=[did(n) for n in range(30)], now=NOW)
    jobs = claim(stores[0], 30)

    def write(index: int) -> None:
        for job in jobs[index::3]:
            page(stores[index], job, listed("k", 4))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert stores[1].queue_depth() == 120
    text, last = stores[2].list_records_json(after=0, limit=1000)
    assert len(ids_of(text)) == 120 and last is not None
    assert stores[2].ack_records(last) == 120 and stores[0].queue_depth() == 0


# -- timeouts, errors and the thread hop ----------------------------------------------------------------


def test_a_statement_timeout_is_a_store_error(open_store: Callable[..., PostgresStore]) -> None:
    store = open_store(statement_timeout=0.2, pool_size=1)
    with pytest.raises(psycopg.errors.QueryCanceled) as caught, store._tx() as conn:
        conn.execute("SELECT pg_sleep(5)")
    error = translate(caught.value)
    assert isinstance(error, StoreError) and error.code == Code.DATABASE_BUSY
    assert "statement timeout" in error.message and "\n" not in error.message
    assert store.ping()  # the pool's one connection is usable again


async def test_the_pooled_database_maps_errors_and_tracks_failing(pg_url: str) -> None:
    db = open_database(pg_url)
    assert isinstance(db, PooledDatabase)
    store = db.store
    slow = PostgresStore.open(pg_url, statement_timeout=0.2)

    def sleep_in_sql() -> None:
        with slow._read() as conn:
            conn.execute("SELECT pg_sleep(5)")

    try:
        with pytest.raises(StoreError) as caught:
            await db.run(sleep_in_sql)
        assert caught.value.code == Code.DATABASE_BUSY and db.failing is caught.value
        assert isinstance(caught.value.__cause__, psycopg.errors.QueryCanceled)
    finally:
        slow.close()
    assert await db.run(store.ping) is True
    assert db.failing is None
    with pytest.raises(JobLost):  # the store's own signals pass through unchanged
        await db.run(store.finish_job, Lease(1, 1), state="done", now=NOW)
    assert db.failing is None
    await db.aclose()


async def test_a_cancelled_call_still_completes_its_transaction(pg_url: str) -> None:
    db = open_database(pg_url)
    assert isinstance(db, PooledDatabase)
    store = db.store
    started, release = threading.Event(), threading.Event()

    def slow_write() -> str:
        with store._tx() as conn:
            conn.execute(
                "INSERT INTO did_cache (did, pds, resolved_at, first_seen_at, last_seen_at) VALUES (?, ?, ?, ?, ?)",
                (did(7), "https://pds.example", NOW, NOW, NOW),
            )
            started.set()
            assert release.wait(30)
            conn.execute("UPDATE did_cache SET last_seen_at = ? WHERE did = ?", (NOW + 1, did(7)))
        return "committed"

    scope = trio.CancelScope()
    result: str | None = None
    returned = False

    async def caller() -> None:
        nonlocal result, returned
        with scope:
            result = await db.run(slow_write)
            await trio.lowlevel.checkpoint()  # the cancellation lands here, once the call is over
            pytest.fail("not cancelled")
        returned = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller)
        await trio.to_thread.run_sync(started.wait)  # the call is inside its transaction
        scope.cancel()
        await trio.sleep(0.1)
        assert not returned  # the cancelled caller still waits for its transaction
        release.set()
    assert returned and scope.cancelled_caught and result == "committed"
    publisher = store.get_publisher(did(7))
    assert publisher is not None and publisher.last_seen_at == NOW + 1  # all of it committed
    assert sql(pg_url, "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'") == [
        (0,)
    ]
    await db.aclose()


async def test_a_call_waiting_for_a_connection_can_be_cancelled(pg_url: str) -> None:
    db = PooledDatabase(PostgresStore.open(pg_url, pool_size=1))
    holding, release, ran = threading.Event(), threading.Event(), threading.Event()

    def hold() -> None:
        with db.store._read() as conn:
            conn.execute("SELECT 1")
            holding.set()
            assert release.wait(30)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(db.run, hold)
        await trio.to_thread.run_sync(holding.wait)
        with trio.CancelScope() as scope:
            scope.deadline = trio.current_time() + 0.05
            await db.run(ran.set)  # waits for the one connection's thread slot
        assert scope.cancelled_caught and not release.is_set()  # cancelled while the holder still holds
        release.set()
    assert not ran.is_set()  # it never started
    assert await db.run(db.store.ping) is True
    await db.aclose()


# -- the records queue's order (SPEC 5) -------------------------------------------------------------------


def _hold_after_insert(store: PostgresStore, entered: threading.Event, release: threading.Event) -> None:
    """Make ``store``'s next page transaction stop after its records insert, before it commits."""
    original = PostgresStore._add_depth

    def hooked(conn: Any, delta: int) -> None:
        entered.set()
        assert release.wait(30)
        original(store, conn, delta)

    store._add_depth = hooked  # type: ignore[method-assign]


def test_a_lower_id_committed_later_is_never_skipped(
    open_store: Callable[..., PostgresStore], pg_url: str
) -> None:
    a, b, reader = open_store(), open_store(), open_store()
    a.create_run(mode="explicit", collections=[COLL], dids=[did(1), did(2)], now=NOW)
    [job_a] = claim(a, 1, owner="a")
    [job_b] = claim(b, 1, owner="b")
    entered, release = threading.Event(), threading.Event()
    _hold_after_insert(a, entered, release)
    writer = threading.Thread(target=page, args=(a, job_a, listed("a", 3)))
    writer.start()
    try:
        assert entered.wait(30)  # A has taken the lower ids and has not committed
        assert page(b, job_b, listed("b", 2)) == PageResult(created=2)  # B takes higher ids and commits
        committed = [i for (i,) in sql(pg_url, "SELECT id FROM records ORDER BY id")]
        assert len(committed) == 2  # B's rows are visible, A's lower ones are not: the out-of-order case
        low_a = committed[0] - 3
        assert reader.list_records_json(after=0, limit=100) == ("[]", None)
        assert reader.queue_horizon() == low_a - 1
        assert reader.queue_depth() == 2
    finally:
        release.set()
        writer.join()
    text, last = reader.list_records_json(after=0, limit=100)
    assert ids_of(text) == [*range(low_a, low_a + 3), *committed] and last == committed[-1]
    assert [e["rkey"][0] for e in json.loads(text)] == ["a", "a", "a", "b", "b"]


def test_a_rolled_back_insert_releases_the_horizon(open_store: Callable[..., PostgresStore]) -> None:
    a, reader = open_store(), open_store()
    a.create_run(mode="explicit", collections=[COLL], dids=[did(1), did(2)], now=NOW)
    first, second = claim(a, 2)

    def fail(conn: Any, delta: int) -> None:
        raise RuntimeError("the page transaction fails after its insert")

    a._add_depth = fail  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        page(a, first, listed("x", 3))
    del a._add_depth
    page(a, second, listed("y", 2))
    text, _ = reader.list_records_json(after=0, limit=100)
    assert [e["rkey"] for e in json.loads(text)] == ["y0000", "y0001"]  # the gap is final, not waited for


def test_a_consumer_sees_every_id_once_while_daemons_commit_out_of_order(
    open_store: Callable[..., PostgresStore],
) -> None:
    daemons = [open_store(pool_size=3) for _ in range(3)]
    reader = open_store(pool_size=1)
    pairs, pages, per_page = 48, 5, 7
    daemons[0].create_run(mode="explicit", collections=[COLL], dids=[did(n) for n in range(pairs)], now=NOW)
    jobs = [job for store in daemons for job in claim(store, pairs // len(daemons), owner=str(id(store)))]
    assert len(jobs) == pairs
    owner = {job.id: daemons[i // (pairs // len(daemons))] for i, job in enumerate(jobs)}
    lock = threading.Lock()
    written = 0
    commit_order: list[int] = []
    local = threading.local()

    def jitter(store: PostgresStore) -> None:
        original = PostgresStore._add_depth

        def hooked(conn: Any, delta: int) -> None:
            (local.last_id,) = conn.execute("SELECT currval('records_id_seq')").fetchone()
            time.sleep(random.random() * 0.004)  # widen the window between allocation and commit
            original(store, conn, delta)

        store._add_depth = hooked  # type: ignore[method-assign]

    for store in daemons:
        jitter(store)

    def write(mine: list[Job]) -> None:
        nonlocal written
        for n in range(pages):
            for job in mine:
                time.sleep(random.random() * 0.002)
                last = n == pages - 1
                result = page(
                    owner[job.id], job, listed(f"p{n}-", per_page), cursor=None if last else f"c{n}"
                )
                with lock:
                    written += result.written
                    commit_order.append(local.last_id)

    writers = [threading.Thread(target=write, args=(jobs[i::6],)) for i in range(6)]
    for thread in writers:
        thread.start()
    seen: list[int] = []
    cursor = 0
    acks = 0
    while True:
        done = not any(thread.is_alive() for thread in writers)
        text, last = reader.list_records_json(after=cursor, limit=random.randint(1, 40))
        got = ids_of(text)
        assert all(i > cursor for i in got) and got == sorted(got)
        seen.extend(got)
        if last is not None:
            cursor = last
            if random.random() < 0.3:
                acks += reader.ack_records(cursor)
        elif done:
            break
    acks += reader.ack_records(cursor)
    assert written == pairs * pages * per_page
    assert len(seen) == written and len(set(seen)) == written  # every id, exactly once
    assert seen == list(range(seen[0], seen[0] + written))  # none skipped (no transaction rolled back)
    assert acks == written and reader.queue_depth() == 0
    assert commit_order != sorted(commit_order)  # the daemons really did commit out of id order


async def test_a_posted_call_on_postgresql_is_done_when_post_returns_and_its_failure_logged(
    pg_url: str,
) -> None:
    db = PooledDatabase(PostgresStore.open(pg_url))
    try:
        did_a = "did:plc:" + "p" * 24
        await db.post(
            db.store.put_publisher,
            did=did_a,
            pds="https://pds.example",
            signing_key=None,
            signing_key_id=None,
            now=NOW,
        )
        cached = await db.run(db.store.get_publisher, did_a)
        assert cached is not None and cached.pds == "https://pds.example"

        def broken() -> None:
            with db.store._tx() as conn:
                conn.execute("SELECT * FROM no_such_table")

        with structlog.testing.capture_logs() as logs:
            await db.post(broken)
        assert [e["call"] for e in logs if e["event"] == "a store write failed"] == ["broken"]
    finally:
        await db.aclose()
