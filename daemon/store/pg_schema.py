"""The PostgreSQL schema: :data:`MIGRATIONS` upgrade a database in place, one ``schema_version`` step each.

The end state matches the SQLite schema (:mod:`daemon.store.schema`) at its current version, table for table
and column for column, so that :class:`daemon.store.store.Store`'s SQL runs unchanged on both: ids are
``BIGINT`` identities, timestamps ``double precision`` (unix seconds), flags and small counters
``INTEGER``, record counters and the delivered-set stamp (``job id << 20 | pass``) ``BIGINT``.

Differences, each for a reason:

- ``queue_stats`` has :data:`DEPTH_SHARDS` rows instead of one. Every page transaction of every daemon
  adds to the queue depth; on a single row each such transaction would hold that row's lock from its
  update to its commit, serialising all page writes of the cluster. A transaction adds to one shard it
  picks at random, and the depth is the sum of the shards (:meth:`PostgresStore._depth`).
- ``records.id`` comes from a sequence with ``CACHE 1`` (the default, spelled out because the records
  queue's ordering method depends on it: see :mod:`daemon.store.postgres`).

Migrations run in one transaction each, under a transaction-level advisory lock
(:data:`MIGRATION_LOCK`), so several daemons starting at once on an empty database apply each step once.
"""

from __future__ import annotations

# The advisory lock taken (per transaction) while migrating: the two-int4 form, so that it never looks
# like the records queue's bigint-keyed "ticket" locks.
MIGRATION_LOCK = (0x62666C64, 1)  # ("bfld", 1)

# Rows of queue_stats (ids 1..DEPTH_SHARDS); their sum is the records queue's depth.
DEPTH_SHARDS = 16

VERSION_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"

MIGRATIONS: tuple[str, ...] = (
    # 1: the schema of SQLite migration 3 (runs, jobs with leases, the records queue with values,
    # the delivered sets, the DID cache, verified commits), with a sharded queue depth.
    f"""
    CREATE TABLE runs (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        mode TEXT NOT NULL,
        collections TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        finished_at DOUBLE PRECISION,
        cancelled_at DOUBLE PRECISION,
        full_rewrite INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE run_discovery (
        run_id BIGINT NOT NULL REFERENCES runs(id),
        collection TEXT NOT NULL,
        pages INTEGER NOT NULL DEFAULT 0,
        dids INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        PRIMARY KEY (run_id, collection)
    );
    CREATE TABLE run_dids (
        run_id BIGINT NOT NULL,
        did TEXT NOT NULL,
        PRIMARY KEY (run_id, did)
    );
    CREATE TABLE jobs (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        run_id BIGINT REFERENCES runs(id),
        kind TEXT NOT NULL,
        did TEXT,
        collection TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        not_before DOUBLE PRECISION NOT NULL,
        lease_owner TEXT,
        leased_at DOUBLE PRECISION,
        error_code TEXT,
        last_error TEXT,
        cursor TEXT,
        pages INTEGER NOT NULL DEFAULT 0,
        records_enqueued BIGINT NOT NULL DEFAULT 0,
        records_skipped BIGINT NOT NULL DEFAULT 0,
        rate_limit_waits INTEGER NOT NULL DEFAULT 0,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        host TEXT,
        lease_token BIGINT NOT NULL DEFAULT 0,
        lease_expires_at DOUBLE PRECISION,
        crashes INTEGER NOT NULL DEFAULT 0,
        collection_rank INTEGER NOT NULL DEFAULT 0,
        listing_pass INTEGER NOT NULL DEFAULT 0,
        walk_commit TEXT,
        full_rewrite INTEGER NOT NULL DEFAULT 0,
        ops_create BIGINT NOT NULL DEFAULT 0,
        ops_update BIGINT NOT NULL DEFAULT 0,
        ops_delete BIGINT NOT NULL DEFAULT 0
    );
    CREATE UNIQUE INDEX jobs_one_active_pair ON jobs(did, collection)
        WHERE kind = 'backfill' AND state IN ('pending', 'running');
    CREATE INDEX jobs_due ON jobs(state, not_before);
    CREATE INDEX jobs_by_run ON jobs(run_id, state);
    CREATE INDEX jobs_ordered ON jobs(run_id, did, collection_rank) WHERE kind = 'backfill';
    CREATE TABLE records (
        id BIGINT GENERATED ALWAYS AS IDENTITY (SEQUENCE NAME records_id_seq CACHE 1) PRIMARY KEY,
        did TEXT NOT NULL,
        collection TEXT NOT NULL,
        rkey TEXT NOT NULL,
        operation TEXT NOT NULL,
        cid TEXT NOT NULL,
        source TEXT NOT NULL,
        run_id BIGINT,
        record TEXT,
        rev TEXT,
        verified INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE queue_stats (
        id INTEGER PRIMARY KEY CHECK (id BETWEEN 1 AND {DEPTH_SHARDS}),
        depth BIGINT NOT NULL
    );
    INSERT INTO queue_stats (id, depth) SELECT shard, 0 FROM generate_series(1, {DEPTH_SHARDS}) AS shard;
    CREATE TABLE did_cache (
        did TEXT PRIMARY KEY,
        pds TEXT NOT NULL,
        signing_key TEXT,
        resolved_at DOUBLE PRECISION NOT NULL,
        first_seen_at DOUBLE PRECISION NOT NULL,
        last_seen_at DOUBLE PRECISION NOT NULL,
        signing_key_id TEXT
    );
    CREATE TABLE pairs (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        did TEXT NOT NULL,
        collection TEXT NOT NULL,
        UNIQUE (did, collection)
    );
    CREATE TABLE delivered (
        pair_id BIGINT NOT NULL,
        rkey TEXT NOT NULL,
        cid TEXT NOT NULL,
        gen BIGINT NOT NULL,
        PRIMARY KEY (pair_id, rkey)
    );
    CREATE TABLE run_commits (
        run_id BIGINT NOT NULL,
        did TEXT NOT NULL,
        commit_cid TEXT NOT NULL,
        data_cid TEXT NOT NULL,
        rev TEXT NOT NULL,
        PRIMARY KEY (run_id, did)
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


def statements(script: str) -> list[str]:
    """The statements of a migration script (no statement holds a semicolon of its own)."""
    return [s.strip() for s in script.split(";") if s.strip()]
