"""All of backfilld's SQL that does not depend on the database: runs, jobs, the records queue, the DID cache.

Synchronous, one transaction per method. The SQL is the subset SQLite and PostgreSQL share (``?``
placeholders, ``ON CONFLICT``, ``RETURNING``, ``CASE``); a backend (:mod:`daemon.store.sqlite`,
:mod:`daemon.store.postgres`) supplies the connection and transactions (:meth:`Store._tx`,
:meth:`Store._read`) and the few statements that differ. Callers reach a store only through
:class:`daemon.store.database.Database`, which moves each call off the trio thread.

Every job state change is guarded in SQL by the state it leaves (procrastinate, litequeue): a claim takes
``pending`` jobs only; everything a running job writes (pages, checkpoints, the delivered set, its outcome)
names its :class:`~daemon.store.models.Lease` and matches only ``state = 'running'`` with the same fencing
token. A cancelled run's jobs are ``cancelled`` at once, running ones included, so a job that was claimed
but not yet started, or is between a page and its reschedule, can write nothing more: the write raises
:class:`~daemon.errors.JobLost` and the engine drops the job.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from daemon.errors import Code, JobLost
from daemon.store.models import (
    JOB_COLUMNS,
    JOB_STATES,
    DiscoveryPageResult,
    DiscoveryProgress,
    EnqueueResult,
    Job,
    Lease,
    ListedRecord,
    PageResult,
    Publisher,
    Run,
    RunCommit,
    job_from_row,
)

# A job that was running at this many consecutive process deaths (or lease expiries) fails as crash_loop
# instead of being recovered again: the same input would kill the daemon forever (SPEC 7).
MAX_CRASH_RECOVERIES = 3

# Rows per multi-row INSERT: 10 parameters each, well under SQLite's 32,766 variables per statement.
INSERT_ROWS = 500
# Records acknowledged per DELETE: a consumer acking a million records must not hold one huge transaction.
ACK_CHUNK = 10_000

_PUBLISHER_COLUMNS = "did, pds, signing_key, signing_key_id, resolved_at, first_seen_at, last_seen_at"


class Cursor(Protocol):
    """The part of a DB-API cursor the store uses."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """A connection that runs ``?``-placeholder SQL (the PostgreSQL backend translates placeholders)."""

    def execute(self, sql: str, params: Sequence[Any] = ...) -> Cursor: ...


def _gen(job_id: int, listing_pass: int) -> int:
    """The delivered-set stamp of one listing pass of one job."""
    return (job_id << 20) | (listing_pass & 0xFFFFF)


class Store:
    """The queries; subclasses provide :meth:`_tx` (a write transaction) and :meth:`_read`."""

    # Appended to the claim's inner SELECT (PostgreSQL: FOR UPDATE SKIP LOCKED).
    claim_lock = ""

    def _tx(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def _read(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def ping(self) -> bool:
        """True when the database answers."""
        with self._read() as conn:
            return bool(conn.execute("SELECT 1").fetchone()[0] == 1)

    # -- runs ---------------------------------------------------------------------------------------

    def create_run(
        self,
        *,
        mode: str,
        collections: Sequence[str],
        dids: Sequence[str],
        now: float,
        full: bool = False,
        ordered: bool = True,
    ) -> tuple[int, EnqueueResult]:
        """Create a run; discover mode queues one ``discover`` job per collection, explicit mode the pairs.

        ``collections`` are in the configured order; with ``ordered`` an account's later collections wait
        for its earlier ones (SPEC 6.4).
        """
        with self._tx() as conn:
            (run_id,) = conn.execute(
                "INSERT INTO runs (mode, collections, created_at, full_rewrite) VALUES (?, ?, ?, ?) RETURNING id",
                (mode, json.dumps(list(collections)), now, int(full)),
            ).fetchone()
            if mode == "discover":
                for collection in collections:
                    conn.execute(
                        "INSERT INTO run_discovery (run_id, collection) VALUES (?, ?)", (run_id, collection)
                    )
                    conn.execute(
                        "INSERT INTO jobs (run_id, kind, collection, state, not_before, created_at, updated_at, "
                        "full_rewrite) VALUES (?, 'discover', ?, 'pending', ?, ?, ?, ?)",
                        (run_id, collection, now, now, now, int(full)),
                    )
                return run_id, EnqueueResult(len(collections), 0)
            for did in dids:
                conn.execute(
                    "INSERT INTO run_dids (run_id, did) VALUES (?, ?) ON CONFLICT DO NOTHING", (run_id, did)
                )
            result = self._enqueue_pairs(conn, run_id, dids, collections, now, full=full, ordered=ordered)
            self._mark_finished_if_idle(conn, run_id, now)
            return int(run_id), result

    def _enqueue_pairs(
        self,
        conn: Connection,
        run_id: int,
        dids: Iterable[str],
        collections: Sequence[str],
        now: float,
        *,
        full: bool,
        ordered: bool,
    ) -> EnqueueResult:
        enqueued = offered = 0
        for did in dids:
            for rank, collection in enumerate(collections):
                offered += 1
                cur = conn.execute(
                    "INSERT INTO jobs (run_id, kind, did, collection, state, not_before, created_at, updated_at, "
                    "host, collection_rank, full_rewrite) VALUES (?, 'backfill', ?, ?, 'pending', ?, ?, ?, "
                    "(SELECT pds FROM did_cache WHERE did = ?), ?, ?) ON CONFLICT DO NOTHING",
                    (run_id, did, collection, now, now, now, did, rank if ordered else 0, int(full)),
                )
                enqueued += max(cur.rowcount, 0)
        return EnqueueResult(enqueued, offered - enqueued)

    def _mark_finished_if_idle(self, conn: Connection, run_id: int | None, now: float) -> None:
        if run_id is None:
            return
        conn.execute(
            "UPDATE runs SET finished_at = ? WHERE id = ? AND finished_at IS NULL "
            "AND NOT EXISTS (SELECT 1 FROM jobs WHERE run_id = ? AND state IN ('pending', 'running'))",
            (now, run_id, run_id),
        )

    def _hold(self, conn: Connection, lease: Lease, now: float) -> tuple[Any, ...]:
        """Check (and touch) the job's lease: its ``(run_id, full_rewrite, listing_pass)``, or JobLost."""
        row = conn.execute(
            "UPDATE jobs SET updated_at = ? WHERE id = ? AND state = 'running' AND lease_token = ? "
            "RETURNING run_id, full_rewrite, listing_pass",
            (now, lease.job_id, lease.token),
        ).fetchone()
        if row is None:
            raise JobLost(f"job {lease.job_id} is no longer running under lease {lease.token}")
        return tuple(row)

    def record_discovery_page(
        self,
        lease: Lease,
        *,
        run_id: int,
        collection: str,
        dids: Sequence[str],
        cursor: str | None,
        max_dids: int,
        now: float,
        ordered: bool = True,
    ) -> DiscoveryPageResult:
        """One relay page: admit DIDs up to the run's cap, queue their pairs, save the relay cursor."""
        with self._tx() as conn:
            _, full, _ = self._hold(conn, lease, now)
            (count,) = conn.execute("SELECT count(*) FROM run_dids WHERE run_id = ?", (run_id,)).fetchone()
            (collections_json,) = conn.execute(
                "SELECT collections FROM runs WHERE id = ?", (run_id,)
            ).fetchone()
            admitted: list[str] = []
            listed = dict.fromkeys(dids)
            for did in listed:
                if count >= max_dids:
                    break
                cur = conn.execute(
                    "INSERT INTO run_dids (run_id, did) VALUES (?, ?) ON CONFLICT DO NOTHING", (run_id, did)
                )
                if cur.rowcount > 0:
                    admitted.append(did)
                    count += 1
            result = self._enqueue_pairs(
                conn, run_id, admitted, json.loads(collections_json), now, full=bool(full), ordered=ordered
            )
            conn.execute(
                "UPDATE run_discovery SET pages = pages + 1, dids = dids + ? WHERE run_id = ? AND collection = ?",
                (len(listed), run_id, collection),
            )
            conn.execute("UPDATE jobs SET cursor = ?, pages = pages + 1 WHERE id = ?", (cursor, lease.job_id))
            return DiscoveryPageResult(len(admitted), result.enqueued, count >= max_dids)

    def run_did_count(self, run_id: int) -> int:
        """How many distinct DIDs the run has admitted so far."""
        with self._read() as conn:
            (count,) = conn.execute("SELECT count(*) FROM run_dids WHERE run_id = ?", (run_id,)).fetchone()
            return int(count)

    def set_discovery_error(self, lease: Lease, *, error: str | None, now: float) -> None:
        """Record (or clear) why the discover job's collection failed; JobLost once the lease is gone."""
        with self._tx() as conn:
            run_id, _, _ = self._hold(conn, lease, now)
            conn.execute(
                "UPDATE run_discovery SET error = ? WHERE run_id = ? AND collection = "
                "(SELECT collection FROM jobs WHERE id = ?)",
                (error, run_id, lease.job_id),
            )

    def get_run(self, run_id: int) -> Run | None:
        """One run with its progress, or None."""
        runs = self._runs("id = ?", (run_id,))
        return runs[0] if runs else None

    def list_runs(self, *, after: int, limit: int) -> list[Run]:
        """Runs with id > ``after``, in id order."""
        return self._runs("id > ? ORDER BY id LIMIT ?", (after, limit))

    def _runs(self, where: str, params: Sequence[Any]) -> list[Run]:
        # Four grouped queries for the whole page of runs, not four per run.
        with self._read() as conn:
            rows = conn.execute(
                "SELECT id, mode, collections, created_at, finished_at, cancelled_at, full_rewrite FROM runs "
                f"WHERE {where}",
                params,
            ).fetchall()
            if not rows:
                return []
            ids = [row[0] for row in rows]
            marks = ",".join("?" * len(ids))
            jobs: dict[int, dict[str, int]] = {i: dict.fromkeys(JOB_STATES, 0) for i in ids}
            discovering: set[int] = set()
            operations = {i: {"create": 0, "update": 0, "delete": 0} for i in ids}
            for run_id, kind, state, n, created, updated, deleted in conn.execute(
                "SELECT run_id, kind, state, count(*), sum(ops_create), sum(ops_update), sum(ops_delete) "
                f"FROM jobs WHERE run_id IN ({marks}) GROUP BY run_id, kind, state",
                ids,
            ).fetchall():
                if kind == "backfill":
                    jobs[run_id][state] = int(n)
                elif state in ("pending", "running"):
                    discovering.add(run_id)
                ops = operations[run_id]
                ops["create"] += int(created or 0)
                ops["update"] += int(updated or 0)
                ops["delete"] += int(deleted or 0)
            dids = {
                run_id: int(n)
                for run_id, n in conn.execute(
                    f"SELECT run_id, count(*) FROM run_dids WHERE run_id IN ({marks}) GROUP BY run_id", ids
                ).fetchall()
            }
            discovery: dict[int, dict[str, DiscoveryProgress]] = {i: {} for i in ids}
            for run_id, collection, pages, n, error in conn.execute(
                f"SELECT run_id, collection, pages, dids, error FROM run_discovery WHERE run_id IN ({marks})",
                ids,
            ).fetchall():
                discovery[run_id][collection] = DiscoveryProgress(pages, n, error)
        runs = []
        for run_id, mode, collections, created_at, finished_at, cancelled_at, full in rows:
            order = json.loads(collections)
            runs.append(
                Run(
                    id=run_id,
                    mode=mode,
                    collections=tuple(order),
                    created_at=created_at,
                    finished_at=finished_at,
                    cancelled_at=cancelled_at,
                    full=bool(full),
                    dids=dids.get(run_id, 0),
                    discovery={c: discovery[run_id][c] for c in order if c in discovery[run_id]},
                    jobs=jobs[run_id],
                    discovering=run_id in discovering,
                    operations=operations[run_id],
                )
            )
        return runs

    def cancel_run(self, run_id: int, now: float) -> bool | None:
        """Cancel a run and every job of it that is pending or running (SPEC 5).

        Returns None when there is no such run, False when it had already finished or been cancelled (a
        finished run stays ``finished``), True when it was cancelled now. A running job's later writes are
        refused (it no longer holds a running lease); the engine also interrupts it at once.
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
                "UPDATE jobs SET state = 'cancelled', lease_owner = NULL, lease_expires_at = NULL, "
                "updated_at = ? WHERE run_id = ? AND state IN ('pending', 'running')",
                (now, run_id),
            )
            self._mark_finished_if_idle(conn, run_id, now)
            return True

    # -- claiming -----------------------------------------------------------------------------------

    def recover_jobs(self, now: float, *, expired_only: bool) -> tuple[int, int]:
        """Jobs left ``running`` by a daemon that died are pending again (their attempt refunded), or
        ``failed`` with ``crash_loop`` once they were running at :data:`MAX_CRASH_RECOVERIES` consecutive
        deaths. With ``expired_only`` (PostgreSQL) only jobs whose lease expired; SQLite recovers every
        running job at start, since the instance lock says no other daemon runs them.

        Returns (recovered, failed).
        """
        condition = "state = 'running'" + (" AND lease_expires_at < ?" if expired_only else "")
        message = f"the job was running at {MAX_CRASH_RECOVERIES} consecutive daemon deaths; not retried"
        with self._tx() as conn:
            rows = conn.execute(
                "UPDATE jobs SET "
                "state = CASE WHEN crashes + 1 >= ? THEN 'failed' ELSE 'pending' END, "
                "error_code = CASE WHEN crashes + 1 >= ? THEN ? ELSE error_code END, "
                "last_error = CASE WHEN crashes + 1 >= ? THEN ? ELSE last_error END, "
                "crashes = crashes + 1, attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END, "
                "not_before = CASE WHEN not_before < ? THEN not_before ELSE ? END, "
                f"lease_owner = NULL, lease_expires_at = NULL, updated_at = ? WHERE {condition} "
                "RETURNING state, run_id",
                (
                    MAX_CRASH_RECOVERIES,
                    MAX_CRASH_RECOVERIES,
                    Code.CRASH_LOOP.value,
                    MAX_CRASH_RECOVERIES,
                    message,
                    now,
                    now,
                    now,
                    *((now,) if expired_only else ()),
                ),
            ).fetchall()
            failed_runs = {run_id for state, run_id in rows if state == "failed"}
            for run_id in failed_runs:
                self._mark_finished_if_idle(conn, run_id, now)
            failed = sum(1 for state, _ in rows if state == "failed")
            return len(rows) - failed, failed

    def _claimable(
        self, depth: int, max_records_queue: int, excluded_hosts: Sequence[str]
    ) -> tuple[list[str], list[Any]]:
        conditions = [
            "j.state = 'pending'",
            # ordered_collections: an account's later collections wait for its earlier ones of the run
            "(j.collection_rank = 0 OR NOT EXISTS (SELECT 1 FROM jobs e WHERE e.run_id = j.run_id "
            "AND e.did = j.did AND e.kind = 'backfill' AND e.collection_rank < j.collection_rank "
            "AND e.state IN ('pending', 'running')))",
        ]
        params: list[Any] = []
        if depth > max_records_queue:
            conditions.append("j.kind = 'discover'")
        if excluded_hosts:
            conditions.append(f"(j.host IS NULL OR j.host NOT IN ({','.join('?' * len(excluded_hosts))}))")
            params.extend(excluded_hosts)
        return conditions, params

    def claim_jobs(
        self,
        *,
        now: float,
        limit: int,
        owner: str,
        max_records_queue: int,
        excluded_hosts: Sequence[str] = (),
        lease_until: float | None = None,
    ) -> list[Job]:
        """Claim up to ``limit`` due jobs, each under a new lease (fencing token + 1).

        While the records queue is deeper than ``max_records_queue`` only ``discover`` jobs are claimed
        (backpressure); jobs whose PDS host is in ``excluded_hosts`` (paused or saturated here) are left
        for later or for another daemon.
        """
        if limit <= 0:
            return []
        with self._tx() as conn:
            conditions, params = self._claimable(self._depth(conn), max_records_queue, excluded_hosts)
            rows = conn.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_owner = ?, leased_at = ?, "
                "lease_token = lease_token + 1, lease_expires_at = ?, updated_at = ? WHERE id IN "
                f"(SELECT j.id FROM jobs j WHERE {' AND '.join(conditions)} AND j.not_before <= ? "
                f"ORDER BY j.not_before, j.id LIMIT ?{self.claim_lock}) RETURNING {JOB_COLUMNS}",
                [owner, now, lease_until, now, *params, now, limit],
            ).fetchall()
        return sorted((job_from_row(r) for r in rows), key=lambda j: (j.not_before, j.id))

    def next_due(self, *, max_records_queue: int, excluded_hosts: Sequence[str] = ()) -> float | None:
        """The earliest ``not_before`` among claimable pending jobs, or None when nothing could be claimed."""
        with self._read() as conn:
            conditions, params = self._claimable(self._depth(conn), max_records_queue, excluded_hosts)
            (due,) = conn.execute(
                f"SELECT min(j.not_before) FROM jobs j WHERE {' AND '.join(conditions)}", params
            ).fetchone()
        return None if due is None else float(due)

    def renew_leases(self, leases: Sequence[Lease], *, owner: str, until: float) -> set[int]:
        """Extend the given leases to ``until``; returns the ids of the jobs still held (the others are lost)."""
        held: set[int] = set()
        if not leases:
            return held
        with self._tx() as conn:
            for lease in leases:
                row = conn.execute(
                    "UPDATE jobs SET lease_expires_at = ? WHERE id = ? AND state = 'running' "
                    "AND lease_token = ? AND lease_owner = ? RETURNING id",
                    (until, lease.job_id, lease.token, owner),
                ).fetchone()
                if row is not None:
                    held.add(int(row[0]))
        return held

    # -- a running job's writes ---------------------------------------------------------------------

    def finish_job(
        self,
        lease: Lease,
        *,
        state: str,
        now: float,
        error_code: str | None = None,
        last_error: str | None = None,
    ) -> Job:
        """Move a running job to a final state (done, failed, cancelled); returns the job as updated."""
        with self._tx() as conn:
            row = conn.execute(
                "UPDATE jobs SET state = ?, error_code = ?, last_error = ?, lease_owner = NULL, "
                "lease_expires_at = NULL, crashes = 0, updated_at = ? "
                f"WHERE id = ? AND state = 'running' AND lease_token = ? RETURNING {JOB_COLUMNS}",
                (state, error_code, last_error, now, lease.job_id, lease.token),
            ).fetchone()
            if row is None:
                raise JobLost(f"job {lease.job_id} is no longer running under lease {lease.token}")
            job = job_from_row(row)
            self._mark_finished_if_idle(conn, job.run_id, now)
            return job

    def reschedule_job(
        self,
        lease: Lease,
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
            row = conn.execute(
                "UPDATE jobs SET state = 'pending', not_before = ?, updated_at = ?, lease_owner = NULL, "
                "lease_expires_at = NULL, crashes = 0, attempts = attempts - ?, "
                "rate_limit_waits = rate_limit_waits + ?, error_code = coalesce(?, error_code), "
                "last_error = coalesce(?, last_error), host = coalesce(?, host) "
                "WHERE id = ? AND state = 'running' AND lease_token = ? RETURNING id",
                (
                    not_before,
                    now,
                    1 if refund_attempt else 0,
                    1 if rate_limit_wait else 0,
                    error_code,
                    last_error,
                    host,
                    lease.job_id,
                    lease.token,
                ),
            ).fetchone()
            if row is None:
                raise JobLost(f"job {lease.job_id} is no longer running under lease {lease.token}")

    def begin_walk(self, lease: Lease, *, commit_cid: str, now: float) -> str | None:
        """Start (or resume) a verified walk at ``commit_cid``; returns the last written key to resume after.

        A checkpoint saved for another commit is dropped and a new listing pass begins, so the records the
        old pass saw are not taken for seen by the new one (reconcile's deletes stay exact).
        """
        with self._tx() as conn:
            row = conn.execute(
                "SELECT walk_commit, cursor FROM jobs WHERE id = ? AND state = 'running' AND lease_token = ?",
                (lease.job_id, lease.token),
            ).fetchone()
            if row is None:
                raise JobLost(f"job {lease.job_id} is no longer running under lease {lease.token}")
            walk_commit, cursor = row
            if walk_commit == commit_cid:
                return str(cursor) if cursor is not None else None
            conn.execute(
                "UPDATE jobs SET walk_commit = ?, cursor = NULL, listing_pass = listing_pass + ?, "
                "updated_at = ? WHERE id = ?",
                (commit_cid, 0 if walk_commit is None else 1, now, lease.job_id),
            )
            return None

    def apply_page(
        self,
        lease: Lease,
        *,
        did: str,
        collection: str,
        records: Sequence[ListedRecord],
        cursor: str | None,
        skipped: int,
        complete: bool,
        now: float,
        rev: str | None = None,
        verified: bool = False,
        present: Sequence[str] = (),
    ) -> PageResult:
        """One page of a pair's listing, reconciled against its delivered set (SPEC 6.4), in one transaction.

        ``present``: keys of records the listing found but skipped (they failed a check): still in the
        collection, so their set entries are stamped as seen and not deleted, and nothing is written.

        Records not in the set are written as ``create``, those with another CID as ``update`` (with the
        new value); unchanged ones write nothing (a ``create`` again when the run asked for ``full``). Every
        listed record is stamped with this listing pass, and the job's checkpoint (``cursor``: the listing
        cursor, or the last written key of a walk) moves on in the same transaction, so a retried page
        finds its records already stamped and writes nothing twice. With ``complete`` (the listing's last
        page) the set's records this pass did not see are written as ``delete`` and leave the set, and the
        job is ``done``, its lease released, in the same transaction (returned as ``finished``): a cancel
        that comes after finds nothing left to stop, so a job that wrote deletes never ends ``cancelled``
        (SPEC 6.4), and the job needs no :meth:`finish_job` call of its own.
        """
        with self._tx() as conn:
            run_id, full, listing_pass = self._hold(conn, lease, now)
            gen = _gen(lease.job_id, listing_pass)
            pair_id = self._pair_id(conn, did, collection)
            known = self._delivered(conn, pair_id, [r.rkey for r in records])
            writes: list[tuple[str, str, str, str | None]] = []
            stamps: list[tuple[str, str]] = []
            created = updated = 0
            seen: set[str] = set()
            for record in records:
                previous = known.get(record.rkey)
                if record.rkey in seen or (previous is not None and previous[1] == gen):
                    continue  # this pass already wrote it (a retried page), or the page repeats it
                seen.add(record.rkey)
                stamps.append((record.rkey, record.cid))
                # with ``full``, every record this job has not written yet is a create, changed or not
                if previous is None or (full and previous[1] >> 20 != lease.job_id):
                    writes.append((record.rkey, "create", record.cid, record.value))
                    created += 1
                elif previous[0] != record.cid:
                    writes.append((record.rkey, "update", record.cid, record.value))
                    updated += 1
            self._stamp(conn, pair_id, stamps, gen)
            self._keep(conn, pair_id, [rkey for rkey in present if rkey not in seen], gen)
            deleted = 0
            if complete:
                gone = conn.execute(
                    "SELECT rkey FROM delivered WHERE pair_id = ? AND gen NOT IN (?, ?) ORDER BY rkey",
                    (pair_id, gen, -gen),
                ).fetchall()
                writes.extend((rkey, "delete", "", None) for (rkey,) in gone)
                deleted = len(gone)
                if gone:
                    conn.execute(
                        "DELETE FROM delivered WHERE pair_id = ? AND gen NOT IN (?, ?)", (pair_id, gen, -gen)
                    )
            self._write_records(conn, did, collection, run_id, rev, verified, writes)
            if writes:
                self._add_depth(conn, len(writes))
            counts = (cursor, len(writes), skipped, created, updated, deleted)
            progress = (
                "UPDATE jobs SET cursor = ?, pages = pages + 1, records_enqueued = records_enqueued + ?, "
                "records_skipped = records_skipped + ?, ops_create = ops_create + ?, "
                "ops_update = ops_update + ?, ops_delete = ops_delete + ?, crashes = 0"
            )
            if not complete:
                conn.execute(progress + " WHERE id = ?", (*counts, lease.job_id))
                return PageResult(created, updated, deleted)
            row = conn.execute(
                progress + ", state = 'done', error_code = NULL, last_error = NULL, lease_owner = NULL, "
                f"lease_expires_at = NULL WHERE id = ? RETURNING {JOB_COLUMNS}",
                (*counts, lease.job_id),
            ).fetchone()
            self._mark_finished_if_idle(conn, run_id, now)
            return PageResult(created, updated, deleted, job_from_row(row))

    def _pair_id(self, conn: Connection, did: str, collection: str) -> int:
        row = conn.execute(
            "SELECT id FROM pairs WHERE did = ? AND collection = ?", (did, collection)
        ).fetchone()
        if row is None:
            row = conn.execute(
                "INSERT INTO pairs (did, collection) VALUES (?, ?) RETURNING id", (did, collection)
            ).fetchone()
        return int(row[0])

    def _delivered(self, conn: Connection, pair_id: int, rkeys: Sequence[str]) -> dict[str, tuple[str, int]]:
        known: dict[str, tuple[str, int]] = {}
        for start in range(0, len(rkeys), INSERT_ROWS):
            chunk = rkeys[start : start + INSERT_ROWS]
            for rkey, cid, gen in conn.execute(
                f"SELECT rkey, cid, gen FROM delivered WHERE pair_id = ? AND rkey IN ({','.join('?' * len(chunk))})",
                [pair_id, *chunk],
            ).fetchall():
                known[rkey] = (cid, gen)
        return known

    def _stamp(self, conn: Connection, pair_id: int, stamps: Sequence[tuple[str, str]], gen: int) -> None:
        for start in range(0, len(stamps), INSERT_ROWS):
            chunk = stamps[start : start + INSERT_ROWS]
            conn.execute(
                "INSERT INTO delivered (pair_id, rkey, cid, gen) VALUES "
                + ",".join(["(?, ?, ?, ?)"] * len(chunk))
                + " ON CONFLICT (pair_id, rkey) DO UPDATE SET cid = excluded.cid, gen = excluded.gen",
                [value for rkey, cid in chunk for value in (pair_id, rkey, cid, gen)],
            )

    def _keep(self, conn: Connection, pair_id: int, rkeys: Sequence[str], gen: int) -> None:
        """Mark the set's entries of ``rkeys`` (if any) as seen but not written by this pass: ``-gen``, so
        the complete listing does not delete them, while a later valid listing of the record in the same
        pass (or job, with ``full``) is still compared and written as if it had not been seen. An entry
        this pass already wrote keeps its stamp."""
        for start in range(0, len(rkeys), INSERT_ROWS):
            chunk = rkeys[start : start + INSERT_ROWS]
            conn.execute(
                f"UPDATE delivered SET gen = ? WHERE pair_id = ? AND gen <> ? "
                f"AND rkey IN ({','.join('?' * len(chunk))})",
                [-gen, pair_id, gen, *chunk],
            )

    def _write_records(
        self,
        conn: Connection,
        did: str,
        collection: str,
        run_id: int | None,
        rev: str | None,
        verified: bool,
        writes: Sequence[tuple[str, str, str, str | None]],
    ) -> None:
        flag = int(verified)
        for start in range(0, len(writes), INSERT_ROWS):
            chunk = writes[start : start + INSERT_ROWS]
            conn.execute(
                "INSERT INTO records (did, collection, rkey, operation, cid, record, rev, verified, source, "
                "run_id) VALUES " + ",".join(["(?, ?, ?, ?, ?, ?, ?, ?, 'backfill', ?)"] * len(chunk)),
                [
                    value
                    for rkey, operation, cid, value_json in chunk
                    for value in (did, collection, rkey, operation, cid, value_json, rev, flag, run_id)
                ],
            )

    # -- queries and operator actions ---------------------------------------------------------------

    def get_job(self, job_id: int) -> Job | None:
        """One job, or None."""
        with self._read() as conn:
            row = conn.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else job_from_row(row)

    def list_jobs(
        self, *, state: str | None = None, run_id: int | None = None, after: int = 0, limit: int = 100
    ) -> list[Job]:
        """Jobs with id > ``after`` in id order, optionally of one state and/or run."""
        conditions = ["id > ?"]
        params: list[Any] = [after]
        if state is not None:
            conditions.append("state = ?")
            params.append(state)
        if run_id is not None:
            conditions.append("run_id = ?")
            params.append(run_id)
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE {' AND '.join(conditions)} ORDER BY id LIMIT ?",
                [*params, limit],
            ).fetchall()
        return [job_from_row(r) for r in rows]

    def job_counts(self) -> dict[str, int]:
        """Jobs by state."""
        counts = dict.fromkeys(JOB_STATES, 0)
        with self._read() as conn:
            for state, n in conn.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall():
                counts[state] = int(n)
        return counts

    def daemons_holding_leases(self) -> list[tuple[str, int]]:
        """The daemons that hold running jobs' leases, with how many each: ``(owner, jobs)`` by owner."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT lease_owner, count(*) FROM jobs WHERE state = 'running' AND lease_owner IS NOT NULL "
                "GROUP BY lease_owner ORDER BY lease_owner"
            ).fetchall()
        return [(str(owner), int(n)) for owner, n in rows]

    def job_counts_by_kind(self) -> dict[tuple[str, str], int]:
        """Jobs by (kind, state)."""
        with self._read() as conn:
            rows = conn.execute("SELECT kind, state, count(*) FROM jobs GROUP BY kind, state").fetchall()
        return {(kind, state): int(n) for kind, state, n in rows}

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
                marks = ",".join("?" * len(ids))
                targets = conn.execute(
                    f"SELECT id, kind, did, collection FROM jobs WHERE id IN ({marks}) "
                    "AND state IN ('failed', 'cancelled') ORDER BY id",
                    list(ids),
                ).fetchall()
            else:
                conditions = ["state = ?"]
                params: list[Any] = [state or "failed"]
                if run_id is not None:
                    conditions.append("run_id = ?")
                    params.append(run_id)
                targets = conn.execute(
                    f"SELECT id, kind, did, collection FROM jobs WHERE {' AND '.join(conditions)} ORDER BY id",
                    params,
                ).fetchall()
            requeued = 0
            runs: set[int] = set()
            for job_id, kind, did, collection in targets:
                if (
                    kind == "backfill"
                    and conn.execute(
                        "SELECT 1 FROM jobs WHERE did = ? AND collection = ? AND kind = 'backfill' "
                        "AND state IN ('pending', 'running')",
                        (did, collection),
                    ).fetchone()
                ):
                    continue
                row = conn.execute(
                    "UPDATE jobs SET state = 'pending', attempts = 0, rate_limit_waits = 0, crashes = 0, "
                    "not_before = ?, error_code = NULL, last_error = NULL, updated_at = ? WHERE id = ? "
                    "AND state IN ('failed', 'cancelled') RETURNING run_id",
                    (now, now, job_id),
                ).fetchone()
                if row is None:
                    continue
                requeued += 1
                if row[0] is not None:
                    runs.add(row[0])
            for rid in runs:
                conn.execute("UPDATE runs SET finished_at = NULL, cancelled_at = NULL WHERE id = ?", (rid,))
            return requeued

    # -- the records queue --------------------------------------------------------------------------

    def _depth(self, conn: Connection) -> int:
        (depth,) = conn.execute("SELECT depth FROM queue_stats WHERE id = 1").fetchone()
        return int(depth)

    def _add_depth(self, conn: Connection, delta: int) -> None:
        conn.execute("UPDATE queue_stats SET depth = depth + ? WHERE id = 1", (delta,))

    def queue_depth(self) -> int:
        """Records jobs on the queue (written and not yet acknowledged)."""
        with self._read() as conn:
            return self._depth(conn)

    def list_records_json(
        self, *, after: int, limit: int, max_value_bytes: int = 8 << 20
    ) -> tuple[str, int | None]:
        """Records with id > ``after`` as the JSON array of their public form, and the last id.

        The page ends early once its record values pass ``max_value_bytes`` (at least one record is
        always returned). The database renders each entry, so serving the queue builds no object per record.
        """
        raise NotImplementedError

    def ack_records(self, through: int) -> int:
        """Delete records with id <= ``through`` (in bounded chunks, one transaction each); returns how many."""
        total = 0
        while True:
            with self._tx() as conn:
                ids = conn.execute(
                    "SELECT id FROM records WHERE id <= ? ORDER BY id LIMIT ?", (through, ACK_CHUNK)
                ).fetchall()
                if not ids:
                    return total
                cur = conn.execute("DELETE FROM records WHERE id <= ? AND id >= ?", (ids[-1][0], ids[0][0]))
                self._add_depth(conn, -cur.rowcount)
                total += cur.rowcount
                if len(ids) < ACK_CHUNK:
                    return total

    # -- DID cache and verified commits -------------------------------------------------------------

    def get_publisher(self, did: str) -> Publisher | None:
        """The cached resolution of ``did``, or None."""
        with self._read() as conn:
            row = conn.execute(f"SELECT {_PUBLISHER_COLUMNS} FROM did_cache WHERE did = ?", (did,)).fetchone()
        return None if row is None else Publisher(*row)

    def touch_publisher(self, did: str, now: float) -> None:
        """Note that ``did`` was used now (``last_seen_at``)."""
        with self._tx() as conn:
            conn.execute("UPDATE did_cache SET last_seen_at = ? WHERE did = ?", (now, did))

    def put_publisher(
        self, *, did: str, pds: str, signing_key: str | None, signing_key_id: str | None, now: float
    ) -> None:
        """Store a fresh resolution; ``first_seen_at`` survives refreshes."""
        with self._tx() as conn:
            conn.execute(
                f"INSERT INTO did_cache ({_PUBLISHER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (did) DO UPDATE SET pds = excluded.pds, signing_key = excluded.signing_key, "
                "signing_key_id = excluded.signing_key_id, resolved_at = excluded.resolved_at, "
                "last_seen_at = excluded.last_seen_at",
                (did, pds, signing_key, signing_key_id, now, now, now),
            )

    def list_publishers(self, *, after: str, limit: int) -> list[Publisher]:
        """Cached DIDs > ``after``, in DID order."""
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_PUBLISHER_COLUMNS} FROM did_cache WHERE did > ? ORDER BY did LIMIT ?",
                (after, limit),
            ).fetchall()
        return [Publisher(*r) for r in rows]

    def get_run_commit(self, run_id: int, did: str) -> RunCommit | None:
        """The commit verified for ``did`` in this run, if any."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT commit_cid, data_cid, rev FROM run_commits WHERE run_id = ? AND did = ?",
                (run_id, did),
            ).fetchone()
        return None if row is None else RunCommit(*row)

    def put_run_commit(self, lease: Lease, *, did: str, commit: RunCommit, now: float) -> None:
        """Remember the commit verified for ``did`` in the run of the job holding ``lease`` (a newer one
        replaces it); JobLost once the lease is gone."""
        with self._tx() as conn:
            run_id, _, _ = self._hold(conn, lease, now)
            conn.execute(
                "INSERT INTO run_commits (run_id, did, commit_cid, data_cid, rev) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (run_id, did) DO UPDATE SET commit_cid = excluded.commit_cid, "
                "data_cid = excluded.data_cid, rev = excluded.rev",
                (run_id, did, commit.commit_cid, commit.data_cid, commit.rev),
            )
