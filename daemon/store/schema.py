"""The SQLite schema: :data:`MIGRATIONS` upgrade a database in place, one ``PRAGMA user_version`` step each.

Tables (the records queue is documented for direct SQLite readers in ``docs/operations.md``): ``runs``,
``run_discovery``, ``run_dids``, ``jobs``, ``records`` (the records queue), ``did_cache`` (known
publishers), ``queue_stats``.
"""

from __future__ import annotations

MIGRATIONS: tuple[str, ...] = (
    # 1: the first schema.
    """
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        mode TEXT NOT NULL,
        collections TEXT NOT NULL,
        created_at REAL NOT NULL,
        finished_at REAL,
        cancelled_at REAL
    );
    CREATE TABLE run_discovery (
        run_id INTEGER NOT NULL REFERENCES runs(id),
        collection TEXT NOT NULL,
        pages INTEGER NOT NULL DEFAULT 0,
        dids INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        PRIMARY KEY (run_id, collection)
    );
    CREATE TABLE run_dids (
        run_id INTEGER NOT NULL,
        did TEXT NOT NULL,
        PRIMARY KEY (run_id, did)
    ) WITHOUT ROWID;
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id INTEGER REFERENCES runs(id),
        kind TEXT NOT NULL,
        did TEXT,
        collection TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        not_before REAL NOT NULL,
        lease_owner TEXT,
        leased_at REAL,
        error_code TEXT,
        last_error TEXT,
        cursor TEXT,
        pages INTEGER NOT NULL DEFAULT 0,
        records_enqueued INTEGER NOT NULL DEFAULT 0,
        records_skipped INTEGER NOT NULL DEFAULT 0,
        rate_limit_waits INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE UNIQUE INDEX jobs_one_active_pair ON jobs(did, collection)
        WHERE kind = 'backfill' AND state IN ('pending', 'running');
    CREATE INDEX jobs_due ON jobs(state, not_before);
    CREATE INDEX jobs_by_run ON jobs(run_id, state);
    CREATE TABLE records (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        did TEXT NOT NULL,
        collection TEXT NOT NULL,
        rkey TEXT NOT NULL,
        operation TEXT NOT NULL,
        cid TEXT NOT NULL,
        source TEXT NOT NULL,
        run_id INTEGER
    );
    CREATE UNIQUE INDEX records_once ON records(did, collection, rkey, cid);
    CREATE TABLE queue_stats (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        depth INTEGER NOT NULL
    );
    INSERT INTO queue_stats (id, depth) VALUES (1, 0);
    CREATE TABLE did_cache (
        did TEXT PRIMARY KEY,
        pds TEXT NOT NULL,
        signing_key TEXT,
        resolved_at REAL NOT NULL,
        first_seen_at REAL NOT NULL,
        last_seen_at REAL NOT NULL
    );
    """,
    # 2: the signing key's id (record verification needs it) and the PDS host a job talks to, so the
    # dispatcher can skip jobs for paused or saturated hosts without resolving them again.
    """
    ALTER TABLE did_cache ADD COLUMN signing_key_id TEXT;
    ALTER TABLE jobs ADD COLUMN host TEXT;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


def statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
