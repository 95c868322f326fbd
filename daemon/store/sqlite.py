"""All of backfilld's SQL, synchronous, on one SQLite connection.

Every method runs in one transaction. The daemon calls them through :class:`daemon.store.database.Database`,
which hops to a worker thread one call at a time, so the connection is never used concurrently and the
trio loop never blocks on disk. Read-then-write transactions start with ``BEGIN IMMEDIATE`` so that a
claim or an enqueue cannot interleave with another writer (the admin CLI's ``sqlite3`` shell, a backup).

Durability: WAL with ``synchronous=NORMAL``. A killed daemon loses nothing that was committed; a power
loss can roll back the last transactions, which is safe because every page's records and the job's
cursor checkpoint commit together, so a rolled-back page is simply fetched again.

Schema versions live in ``PRAGMA user_version``; :data:`daemon.store.schema.MIGRATIONS` upgrades older
databases in place.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from daemon.errors import Code, StartupError
from daemon.store.lock import take_lock
from daemon.store.models import (
    JOB_COLUMNS,
    JOB_STATES,
    DiscoveryPageResult,
    DiscoveryProgress,
    EnqueueResult,
    Job,
    Publisher,
    RecordEntry,
    Run,
)
from daemon.store.schema import MIGRATIONS, SCHEMA_VERSION, statements


class Store:
    """The database. Not thread-safe by itself: :class:`daemon.store.database.Database` serialises calls."""

    def __init__(self, conn: sqlite3.Connection, lock_fd: int | None) -> None:
        self._conn = conn
        self._lock_fd = lock_fd

    @classmethod
    def open(cls, path: Path, *, lock: bool = True) -> Store:
        """Open (creating and migrating) the database at ``path``; with ``lock``, take the instance lock."""
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = take_lock(path) if lock else None
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            store = cls(conn, lock_fd)
            store.migrate()
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        return store

    def close(self) -> None:
        """Checkpoint the WAL and close; releases the instance lock."""
        try:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self._conn.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    @contextmanager
    def group(self) -> Iterator[None]:
        """One transaction around several calls (a group commit; see :class:`daemon.store.database.Database`).

        Inside it, each method's own transaction is a savepoint: a call that fails rolls back alone, and
        nothing is durable before the group commits.
        """
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn
        if conn.in_transaction:
            # Inside a group commit: this call is a savepoint of the group's transaction.
            conn.execute("SAVEPOINT call")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK TO call")
                conn.execute("RELEASE call")
                raise
            conn.execute("RELEASE call")
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # -- schema -------------------------------------------------------------------------------------

    def schema_version(self) -> int:
        row = self._conn.execute("PRAGMA user_version").fetchone()
        return int(row[0])

    def migrate(self, target: int = SCHEMA_VERSION) -> None:
        """Apply the migrations between the stored ``user_version`` and ``target``, one transaction each."""
        current = self.schema_version()
        if current > SCHEMA_VERSION:
            raise StartupError(
                f"database schema version {current} is newer than this backfilld understands "
                f"({SCHEMA_VERSION}); upgrade backfilld",
                code=Code.SCHEMA_TOO_NEW,
            )
        for version in range(current, target):
            with self._tx() as conn:
                for statement in statements(MIGRATIONS[version]):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {version + 1}")

    def ping(self) -> bool:
        return bool(self._conn.execute("SELECT 1").fetchone() == (1,))

    # -- runs ---------------------------------------------------------------------------------------

    def create_run(
        self, *, mode: str, collections: Sequence[str], dids: Sequence[str], now: float
    ) -> tuple[int, EnqueueResult]:
        """Create a run; discover mode queues one ``discover`` job per collection, explicit mode the pairs."""
        with self._tx() as conn:
            cur = conn.execute(
                "INSERT INTO runs (mode, collections, created_at) VALUES (?, ?, ?)",
                (mode, json.dumps(list(collections)), now),
            )
            run_id = int(cur.lastrowid or 0)
            if mode == "discover":
                conn.executemany(
                    "INSERT INTO run_discovery (run_id, collection) VALUES (?, ?)",
                    [(run_id, c) for c in collections],
                )
                conn.executemany(
                    "INSERT INTO jobs (run_id, kind, collection, state, not_before, created_at, updated_at) "
                    "VALUES (?, 'discover', ?, 'pending', ?, ?, ?)",
                    [(run_id, c, now, now, now) for c in collections],
                )
                return run_id, EnqueueResult(len(collections), 0)
            conn.executemany(
                "INSERT OR IGNORE INTO run_dids (run_id, did) VALUES (?, ?)", [(run_id, d) for d in dids]
            )
            result = self._enqueue_pairs(conn, run_id, dids, collections, now)
            self._mark_finished_if_idle(conn, run_id, now)
            return run_id, result

    def _enqueue_pairs(
        self,
        conn: sqlite3.Connection,
        run_id: int,
        dids: Iterable[str],
        collections: Sequence[str],
        now: float,
    ) -> EnqueueResult:
        rows = [(run_id, did, c, now, now, now, did) for did in dids for c in collections]
        before = conn.total_changes
        conn.executemany(
            "INSERT OR IGNORE INTO jobs (run_id, kind, did, collection, state, not_before, created_at, "
            "updated_at, host) VALUES (?, 'backfill', ?, ?, 'pending', ?, ?, ?, "
            "(SELECT pds FROM did_cache WHERE did = ?))",
            rows,
        )
        enqueued = conn.total_changes - before
        return EnqueueResult(enqueued, len(rows) - enqueued)

    def _mark_finished_if_idle(self, conn: sqlite3.Connection, run_id: int | None, now: float) -> None:
        if run_id is None:
            return
        conn.execute(
            "UPDATE runs SET finished_at = ? WHERE id = ? AND finished_at IS NULL "
            "AND NOT EXISTS (SELECT 1 FROM jobs WHERE run_id = ? AND state IN ('pending', 'running'))",
            (now, run_id, run_id),
        )

    def record_discovery_page(
        self,
        *,
        job_id: int,
        run_id: int,
        collection: str,
        dids: Sequence[str],
        cursor: str | None,
        max_dids: int,
        now: float,
    ) -> DiscoveryPageResult:
        """One relay page: admit DIDs up to the run's cap, queue their pairs, save the relay cursor."""
        with self._tx() as conn:
            (count,) = conn.execute("SELECT count(*) FROM run_dids WHERE run_id = ?", (run_id,)).fetchone()
            collections = json.loads(
                conn.execute("SELECT collections FROM runs WHERE id = ?", (run_id,)).fetchone()[0]
            )
            admitted: list[str] = []
            listed = dict.fromkeys(dids)
            for did in listed:
                if count >= max_dids:
                    break
                cur = conn.execute(
                    "INSERT OR IGNORE INTO run_dids (run_id, did) VALUES (?, ?)", (run_id, did)
                )
                if cur.rowcount:
                    admitted.append(did)
                    count += 1
            result = self._enqueue_pairs(conn, run_id, admitted, collections, now)
            conn.execute(
                "UPDATE run_discovery SET pages = pages + 1, dids = dids + ? WHERE run_id = ? AND collection = ?",
                (len(listed), run_id, collection),
            )
            conn.execute(
                "UPDATE jobs SET cursor = ?, pages = pages + 1, updated_at = ? WHERE id = ?",
                (cursor, now, job_id),
            )
            return DiscoveryPageResult(len(admitted), result.enqueued, count >= max_dids)

    def run_did_count(self, run_id: int) -> int:
        (count,) = self._conn.execute("SELECT count(*) FROM run_dids WHERE run_id = ?", (run_id,)).fetchone()
        return int(count)

    def set_discovery_error(self, run_id: int, collection: str, error: str | None) -> None:
        with self._tx() as conn:
            conn.execute(
                "UPDATE run_discovery SET error = ? WHERE run_id = ? AND collection = ?",
                (error, run_id, collection),
            )

    def get_run(self, run_id: int) -> Run | None:
        row = self._conn.execute(
            "SELECT id, mode, collections, created_at, finished_at, cancelled_at FROM runs WHERE id = ?",
            (run_id,),
        ).fetchone()
        if row is None:
            return None
        jobs = {s: 0 for s in JOB_STATES}
        for state, n in self._conn.execute(
            "SELECT state, count(*) FROM jobs WHERE run_id = ? AND kind = 'backfill' GROUP BY state",
            (run_id,),
        ):
            jobs[state] = n
        (discovering,) = self._conn.execute(
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE run_id = ? AND kind = 'discover' "
            "AND state IN ('pending', 'running'))",
            (run_id,),
        ).fetchone()
        (records,) = self._conn.execute(
            "SELECT coalesce(sum(records_enqueued), 0) FROM jobs WHERE run_id = ?", (run_id,)
        ).fetchone()
        discovery = {
            c: DiscoveryProgress(p, d, e)
            for c, p, d, e in self._conn.execute(
                "SELECT collection, pages, dids, error FROM run_discovery WHERE run_id = ? ORDER BY rowid",
                (run_id,),
            )
        }
        return Run(
            id=row[0],
            mode=row[1],
            collections=tuple(json.loads(row[2])),
            created_at=row[3],
            finished_at=row[4],
            cancelled_at=row[5],
            dids=self.run_did_count(run_id),
            discovery=discovery,
            jobs=jobs,
            discovering=bool(discovering),
            records_enqueued=int(records),
        )

    def list_runs(self, *, after: int, limit: int) -> list[Run]:
        ids = [
            r[0]
            for r in self._conn.execute(
                "SELECT id FROM runs WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
            ).fetchall()
        ]
        return [run for run_id in ids if (run := self.get_run(run_id)) is not None]

    def cancel_run(self, run_id: int, now: float) -> bool | None:
        """Cancel a run's pending jobs; running ones are cancelled by the engine.

        Returns None when there is no such run, False when it had already finished or been cancelled (a
        finished run stays ``finished``), True when it was cancelled now.
        """
        with self._tx() as conn:
            row = conn.execute(
                "SELECT cancelled_at, finished_at FROM runs WHERE id = ?", (run_id,)
            ).fetchone()
            if row is None:
                return None
            if row[0] is not None or row[1] is not None:
                return False
            conn.execute("UPDATE runs SET cancelled_at = ? WHERE id = ?", (now, run_id))
            conn.execute(
                "UPDATE jobs SET state = 'cancelled', updated_at = ? WHERE run_id = ? AND state = 'pending'",
                (now, run_id),
            )
            self._mark_finished_if_idle(conn, run_id, now)
            return True

    def run_cancelled(self, run_id: int) -> bool:
        row = self._conn.execute("SELECT cancelled_at FROM runs WHERE id = ?", (run_id,)).fetchone()
        return row is not None and row[0] is not None

    # -- jobs ---------------------------------------------------------------------------------------

    def recover_interrupted(self, now: float) -> int:
        """Jobs left ``running`` by a process that died are pending again (their attempt is refunded)."""
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE jobs SET state = 'pending', attempts = max(attempts - 1, 0), lease_owner = NULL, "
                "not_before = min(not_before, ?), updated_at = ? WHERE state = 'running'",
                (now, now),
            )
            return cur.rowcount

    def claim_jobs(
        self,
        *,
        now: float,
        limit: int,
        owner: str,
        max_records_queue: int,
        excluded_hosts: Sequence[str] = (),
    ) -> list[Job]:
        """Claim up to ``limit`` due jobs in one ``UPDATE … RETURNING``.

        While the records queue is deeper than ``max_records_queue`` only ``discover`` jobs are claimed
        (backpressure); jobs whose PDS host is in ``excluded_hosts`` (paused or saturated) are left alone.
        """
        if limit <= 0:
            return []
        with self._tx() as conn:
            (depth,) = conn.execute("SELECT depth FROM queue_stats WHERE id = 1").fetchone()
            conditions = ["state = 'pending'", "not_before <= ?"]
            params: list[Any] = [now]
            if depth > max_records_queue:
                conditions.append("kind = 'discover'")
            if excluded_hosts:
                conditions.append(f"(host IS NULL OR host NOT IN ({','.join('?' * len(excluded_hosts))}))")
                params.extend(excluded_hosts)
            rows = conn.execute(
                f"UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_owner = ?, leased_at = ?, "
                f"updated_at = ? WHERE id IN (SELECT id FROM jobs WHERE {' AND '.join(conditions)} "
                f"ORDER BY not_before, id LIMIT ?) RETURNING {JOB_COLUMNS}",
                [owner, now, now, *params, limit],
            ).fetchall()
        return sorted((Job(*r) for r in rows), key=lambda j: (j.not_before, j.id))

    def next_due(self, *, max_records_queue: int, excluded_hosts: Sequence[str] = ()) -> float | None:
        """The earliest ``not_before`` among claimable pending jobs, or None when nothing could be claimed."""
        (depth,) = self._conn.execute("SELECT depth FROM queue_stats WHERE id = 1").fetchone()
        conditions = ["state = 'pending'"]
        params: list[Any] = []
        if depth > max_records_queue:
            conditions.append("kind = 'discover'")
        if excluded_hosts:
            conditions.append(f"(host IS NULL OR host NOT IN ({','.join('?' * len(excluded_hosts))}))")
            params.extend(excluded_hosts)
        (due,) = self._conn.execute(
            f"SELECT min(not_before) FROM jobs WHERE {' AND '.join(conditions)}", params
        ).fetchone()
        return None if due is None else float(due)

    def get_job(self, job_id: int) -> Job | None:
        row = self._conn.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else Job(*row)

    def finish_job(
        self,
        job_id: int,
        *,
        state: str,
        now: float,
        error_code: str | None = None,
        last_error: str | None = None,
    ) -> Job | None:
        """Move a running job to a final state (done, failed, cancelled); returns the job as updated."""
        with self._tx() as conn:
            row = conn.execute(
                "UPDATE jobs SET state = ?, error_code = ?, last_error = ?, lease_owner = NULL, updated_at = ? "
                f"WHERE id = ? RETURNING {JOB_COLUMNS}",
                (state, error_code, last_error, now, job_id),
            ).fetchone()
            if row is None:
                return None
            job = Job(*row)
            self._mark_finished_if_idle(conn, job.run_id, now)
            return job

    def reschedule_job(
        self,
        job_id: int,
        *,
        not_before: float,
        now: float,
        refund_attempt: bool,
        error_code: str | None = None,
        last_error: str | None = None,
        rate_limit_wait: bool = False,
        host: str | None = None,
    ) -> None:
        """Put a running job back to ``pending`` until ``not_before``.

        ``refund_attempt`` undoes the claim's attempt (rate-limit waits, busy hosts, shutdown); errors are
        kept so that operators see why a job is waiting.
        """
        with self._tx() as conn:
            conn.execute(
                "UPDATE jobs SET state = 'pending', not_before = ?, updated_at = ?, lease_owner = NULL, "
                "attempts = attempts - ?, rate_limit_waits = rate_limit_waits + ?, "
                "error_code = coalesce(?, error_code), last_error = coalesce(?, last_error), "
                "host = coalesce(?, host) WHERE id = ?",
                (
                    not_before,
                    now,
                    1 if refund_attempt else 0,
                    1 if rate_limit_wait else 0,
                    error_code,
                    last_error,
                    host,
                    job_id,
                ),
            )

    def record_page(
        self,
        *,
        job_id: int,
        run_id: int | None,
        did: str,
        collection: str,
        records: Sequence[tuple[str, str]],
        cursor: str | None,
        skipped: int,
        now: float,
    ) -> int:
        """One listRecords page: its records jobs and the job's cursor checkpoint, in one transaction.

        ``records`` are (rkey, cid). A record already on the queue (same did, collection, rkey, cid) is not
        added again. Returns how many were added.
        """
        with self._tx() as conn:
            before = conn.total_changes
            for start in range(0, len(records), _INSERT_ROWS):
                chunk = records[start : start + _INSERT_ROWS]
                conn.execute(
                    _insert_records_sql(len(chunk)),
                    [value for rkey, cid in chunk for value in (did, collection, rkey, cid, run_id)],
                )
            added = conn.total_changes - before
            if added:
                conn.execute("UPDATE queue_stats SET depth = depth + ? WHERE id = 1", (added,))
            conn.execute(
                "UPDATE jobs SET cursor = ?, pages = pages + 1, records_enqueued = records_enqueued + ?, "
                "records_skipped = records_skipped + ?, updated_at = ? WHERE id = ?",
                (cursor, added, skipped, now, job_id),
            )
            return added

    def list_jobs(
        self, *, state: str | None = None, run_id: int | None = None, after: int = 0, limit: int = 100
    ) -> list[Job]:
        conditions = ["id > ?"]
        params: list[Any] = [after]
        if state is not None:
            conditions.append("state = ?")
            params.append(state)
        if run_id is not None:
            conditions.append("run_id = ?")
            params.append(run_id)
        rows = self._conn.execute(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE {' AND '.join(conditions)} ORDER BY id LIMIT ?",
            [*params, limit],
        ).fetchall()
        return [Job(*r) for r in rows]

    def job_counts(self) -> dict[str, int]:
        counts = {s: 0 for s in JOB_STATES}
        for state, n in self._conn.execute("SELECT state, count(*) FROM jobs GROUP BY state"):
            counts[state] = n
        return counts

    def job_counts_by_kind(self) -> dict[tuple[str, str], int]:
        return {
            (kind, state): n
            for kind, state, n in self._conn.execute("SELECT kind, state, count(*) FROM jobs GROUP BY 1, 2")
        }

    def retry_jobs(
        self,
        *,
        now: float,
        ids: Sequence[int] | None = None,
        state: str | None = None,
        run_id: int | None = None,
    ) -> int:
        """Failed (or cancelled) jobs back to pending with attempts reset; returns how many.

        A pair that meanwhile has another pending or running job is left as it is (the unique pair index).
        """
        with self._tx() as conn:
            if ids is not None:
                targets = [
                    r[0]
                    for r in conn.execute(
                        f"SELECT id FROM jobs WHERE id IN ({','.join('?' * len(ids))}) "
                        "AND state IN ('failed', 'cancelled')",
                        list(ids),
                    )
                ]
            else:
                conditions = ["state = ?"]
                params: list[Any] = [state or "failed"]
                if run_id is not None:
                    conditions.append("run_id = ?")
                    params.append(run_id)
                targets = [
                    r[0]
                    for r in conn.execute(f"SELECT id FROM jobs WHERE {' AND '.join(conditions)}", params)
                ]
            requeued = 0
            runs: set[int] = set()
            for job_id in targets:
                try:
                    row = conn.execute(
                        "UPDATE jobs SET state = 'pending', attempts = 0, rate_limit_waits = 0, not_before = ?, "
                        "error_code = NULL, last_error = NULL, updated_at = ? WHERE id = ? RETURNING run_id",
                        (now, now, job_id),
                    ).fetchone()
                except sqlite3.IntegrityError:
                    continue
                requeued += 1
                if row[0] is not None:
                    runs.add(row[0])
            for rid in runs:
                conn.execute("UPDATE runs SET finished_at = NULL, cancelled_at = NULL WHERE id = ?", (rid,))
            return requeued

    def queue_depth(self) -> int:
        (depth,) = self._conn.execute("SELECT depth FROM queue_stats WHERE id = 1").fetchone()
        return int(depth)

    def list_records(self, *, after: int, limit: int) -> list[RecordEntry]:
        rows = self._conn.execute(
            "SELECT id, did, collection, rkey, operation, cid, source, run_id FROM records "
            "WHERE id > ? ORDER BY id LIMIT ?",
            (after, limit),
        ).fetchall()
        return [RecordEntry(*r) for r in rows]

    def list_records_json(self, *, after: int, limit: int) -> tuple[str, int | None]:
        """What :meth:`list_records` finds, as the JSON array of the entries' public form, and the last id.

        SQLite renders each entry (``json_object``), so serving a page of the queue builds no Python object
        per record.
        """
        rows = self._conn.execute(
            "SELECT id, json_object('id', id, 'did', did, 'collection', collection, 'rkey', rkey, "
            "'operation', operation, 'cid', cid, 'source', source, 'run_id', run_id) FROM records "
            "WHERE id > ? ORDER BY id LIMIT ?",
            (after, limit),
        ).fetchall()
        return "[" + ",".join(row[1] for row in rows) + "]", (rows[-1][0] if rows else None)

    def ack_records(self, through: int) -> int:
        """Delete records with id <= ``through``; returns how many."""
        with self._tx() as conn:
            cur = conn.execute("DELETE FROM records WHERE id <= ?", (through,))
            if cur.rowcount:
                conn.execute("UPDATE queue_stats SET depth = max(depth - ?, 0) WHERE id = 1", (cur.rowcount,))
            return cur.rowcount

    # -- DID cache ----------------------------------------------------------------------------------

    def get_publisher(self, did: str) -> Publisher | None:
        row = self._conn.execute(
            "SELECT did, pds, signing_key, signing_key_id, resolved_at, first_seen_at, last_seen_at "
            "FROM did_cache WHERE did = ?",
            (did,),
        ).fetchone()
        return None if row is None else Publisher(*row)

    def touch_publisher(self, did: str, now: float) -> None:
        with self._tx() as conn:
            conn.execute("UPDATE did_cache SET last_seen_at = ? WHERE did = ?", (now, did))

    def put_publisher(
        self, *, did: str, pds: str, signing_key: str | None, signing_key_id: str | None, now: float
    ) -> None:
        """Store a fresh resolution; ``first_seen_at`` survives refreshes."""
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO did_cache (did, pds, signing_key, signing_key_id, resolved_at, first_seen_at, "
                "last_seen_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(did) DO UPDATE SET pds = excluded.pds, "
                "signing_key = excluded.signing_key, signing_key_id = excluded.signing_key_id, "
                "resolved_at = excluded.resolved_at, last_seen_at = excluded.last_seen_at",
                (did, pds, signing_key, signing_key_id, now, now, now),
            )

    def list_publishers(self, *, after: str, limit: int) -> list[Publisher]:
        rows = self._conn.execute(
            "SELECT did, pds, signing_key, signing_key_id, resolved_at, first_seen_at, last_seen_at "
            "FROM did_cache WHERE did > ? ORDER BY did LIMIT ?",
            (after, limit),
        ).fetchall()
        return [Publisher(*r) for r in rows]


# Rows per INSERT statement: 5 parameters each, well under SQLite's 32,766 variables per statement.
_INSERT_ROWS = 1000


@functools.lru_cache(maxsize=16)
def _insert_records_sql(rows: int) -> str:
    # One multi-row statement rather than executemany: one sqlite3_step, so one release and re-acquisition
    # of the GIL, per page instead of per record (each re-acquisition waits for the busy trio thread).
    return (
        "INSERT OR IGNORE INTO records (did, collection, rkey, operation, cid, source, run_id) VALUES "
        + ",".join(["(?, ?, ?, 'create', ?, 'backfill', ?)"] * rows)
    )
