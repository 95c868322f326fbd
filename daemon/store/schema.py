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
    # 3: verified records, reconcile, leases.
    # - records carry the value (atproto JSON text), the commit's rev and whether it was proven; the same
    #   (did, collection, rkey, cid) may now legitimately appear twice (created, deleted, created again).
    # - the delivered set per pair (SPEC 6.4), keyed by a small pair id; ``gen`` stamps the listing pass
    #   that last saw the record (job id << 20 | listing pass), so deletes are what a complete pass missed.
    # - jobs: a fencing token per claim and a lease expiry (PostgreSQL), consecutive crash recoveries, the
    #   collection's rank for ordered_collections, the listing pass and the commit a walk belongs to, and
    #   the run's "full" flag; operation counters per job make the run's "operations".
    # - one verified commit per account per run (verified mode).
    """
    ALTER TABLE runs ADD COLUMN full_rewrite INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN lease_token INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN lease_expires_at REAL;
    ALTER TABLE jobs ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN collection_rank INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN listing_pass INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN walk_commit TEXT;
    ALTER TABLE jobs ADD COLUMN full_rewrite INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN ops_create INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN ops_update INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN ops_delete INTEGER NOT NULL DEFAULT 0;
    UPDATE jobs SET ops_create = records_enqueued;
    CREATE INDEX jobs_ordered ON jobs(run_id, did, collection_rank) WHERE kind = 'backfill';
    ALTER TABLE records ADD COLUMN record TEXT;
    ALTER TABLE records ADD COLUMN rev TEXT;
    ALTER TABLE records ADD COLUMN verified INTEGER NOT NULL DEFAULT 0;
    DROP INDEX records_once;
    CREATE TABLE pairs (
        id INTEGER PRIMARY KEY,
        did TEXT NOT NULL,
        collection TEXT NOT NULL,
        UNIQUE (did, collection)
    );
    CREATE TABLE delivered (
        pair_id INTEGER NOT NULL,
        rkey TEXT NOT NULL,
        cid TEXT NOT NULL,
        gen INTEGER NOT NULL,
        PRIMARY KEY (pair_id, rkey)
    ) WITHOUT ROWID;
    CREATE TABLE run_commits (
        run_id INTEGER NOT NULL,
        did TEXT NOT NULL,
        commit_cid TEXT NOT NULL,
        data_cid TEXT NOT NULL,
        rev TEXT NOT NULL,
        PRIMARY KEY (run_id, did)
    ) WITHOUT ROWID;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


def statements(script: str) -> list[str]:
    """The statements of a migration script (no statement holds a semicolon of its own)."""
    return [s.strip() for s in script.split(";") if s.strip()]
