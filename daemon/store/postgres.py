"""The PostgreSQL backend (SPEC 10): several daemons share one database.

Connections and transactions: sync psycopg 3 (there is no maintained trio-native driver), called from
worker threads by :class:`daemon.store.pooled.PooledDatabase`. A small pool of autocommit connections;
each write call is one ``BEGIN ISOLATION LEVEL READ COMMITTED`` ... ``COMMIT`` on one connection (rolled
back on any error, never left open: a connection that is not idle afterwards is closed, not pooled), and
each read call runs its statements in autocommit, each with a fresh snapshot. Every connection has a
``statement_timeout``, a ``lock_timeout`` and an ``idle_in_transaction_session_timeout``. The store's SQL
uses ``?`` placeholders; they become ``%s`` (and any ``%`` becomes ``%%``) once per distinct statement.
Claims add ``FOR UPDATE SKIP LOCKED``, so daemons claiming at once never wait for, or take, each
other's jobs. psycopg errors are mapped to :class:`~daemon.errors.StoreError` once, at the edge
(:func:`translate`, applied by the database hop).

The records queue's order (SPEC 5: a consumer reading ``after=<last id>`` never skips an entry). Ids come
from a sequence, and sequence values commit out of order: transaction A takes id 10, B takes id 11, B
commits, a consumer reads 11 and moves its cursor past 10, then A commits 10, which that consumer never
sees. So a read returns only ids up to a *horizon* below which no transaction still running can commit
an id. Every transaction that inserts records first takes a "ticket": a shared, transaction-scoped
advisory lock whose bigint key is ``TICKET_BASE + L``, where ``L`` is the sequence's last allocated value
when it takes the ticket; all its ids are then > ``L``, and it holds the ticket until it commits or
rolls back. A reader runs three statements, in order, each with its own snapshot: (1) ``S`` := the
sequence's last allocated value; (2) ``M`` := the smallest ``L`` among the tickets in ``pg_locks``;
(3) the page, restricted to ``id <= min(S, M)``. Why no id ``i <= min(S, M)`` can still appear after (3):
let transaction X commit ``i`` later. Had X allocated ``i`` after (1), then ``i > S`` (the sequence only
grows; ``CACHE 1``, so ``last_value`` is exactly the last value handed out). So X allocated ``i`` before (1),
and took its ticket ``L_X < i`` before that. X had not ended by (2): it would then have committed before
(3)'s snapshot and ``i`` would be in the page (PostgreSQL releases a transaction's locks only after its
commit is visible). So X's ticket was in ``pg_locks`` at (2): ``M <= L_X < i``, a contradiction. Hence
every id at or below the horizon is final (committed, or never to exist), and ``after=<last id>`` misses
nothing. Cost: writers take one uncontended shared lock per page (nothing ever takes these locks
exclusively, so no one waits); a reader scans ``pg_locks`` once per page; a consumer sees a transaction's
records, and those of every later one, once it ends (bounded by the statement and idle timeouts).
Both the ticket and the reads are in this module; the only insert into ``records`` is
:meth:`Store._write_records`, which :meth:`PostgresStore._write_records` wraps.
"""

from __future__ import annotations

import contextlib
import functools
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict

from daemon.errors import Code, StartupError, StoreError
from daemon.store.pg_schema import (
    DEPTH_SHARDS,
    MIGRATION_LOCK,
    MIGRATIONS,
    SCHEMA_VERSION,
    VERSION_TABLE,
    statements,
)
from daemon.store.store import Connection, Cursor, Store

POOL_SIZE = 8
STATEMENT_TIMEOUT = 30.0
LOCK_TIMEOUT = 10.0
# A call's transaction is never idle between its statements for more than a few milliseconds of Python;
# a daemon frozen mid-transaction (SIGSTOP, a VM paused, a swap storm) would hold its row locks, and with
# them every other daemon's takeover of its jobs, until the server ends the session: 5 s, not a minute.
IDLE_IN_TRANSACTION_TIMEOUT = 5.0
CONNECT_TIMEOUT = 10.0
# How long a call waits for a free connection (only direct, unlimited callers ever wait: the database
# hop never runs more calls at once than the pool has connections).
POOL_WAIT = 30.0
# A connection idle for longer is checked (one empty round trip) before it is used again.
CHECK_IDLE_AFTER = 10.0

# Records-queue tickets: bigint advisory lock keys TICKET_BASE + L (see the module docstring).
TICKET_BASE = 1 << 62
_LAST_ALLOCATED = "CASE WHEN is_called THEN last_value ELSE last_value - 1 END"
_TAKE_TICKET = f"SELECT pg_advisory_xact_lock_shared({TICKET_BASE} + {_LAST_ALLOCATED}) FROM records_id_seq"
_ALLOCATED = f"SELECT {_LAST_ALLOCATED} FROM records_id_seq"
_OLDEST_TICKET = (
    f"SELECT min(((classid::bigint << 32) | objid::bigint) - {TICKET_BASE}) FROM pg_locks "
    "WHERE locktype = 'advisory' AND objsubid = 1 AND classid::bigint >= "
    f"{TICKET_BASE >> 32} AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)
# One page of the queue, rendered by the database: the ids first (cheap), cut where the values pass the
# budget (the first record always stays), then the entries of the kept ids as one JSON array.
_RECORDS_PAGE = (
    "WITH page AS (SELECT id, coalesce(octet_length(record), 0) AS size FROM records "
    "WHERE id > ? AND id <= ? ORDER BY id LIMIT ?), "
    "kept AS (SELECT id, row_number() OVER w AS n, sum(size) OVER w AS total FROM page WINDOW w AS (ORDER BY id)) "
    "SELECT '[' || string_agg(json_build_object('id', r.id, 'did', r.did, 'collection', r.collection, "
    "'rkey', r.rkey, 'operation', r.operation, 'cid', r.cid, 'record', r.record::json, 'rev', r.rev, "
    "'verified', r.verified <> 0, 'source', r.source, 'run_id', r.run_id)::text, ',' ORDER BY r.id) || ']', "
    "max(r.id) FROM kept JOIN records r ON r.id = kept.id WHERE kept.n = 1 OR kept.total <= ?"
)

# SQLSTATEs by what they mean to the daemon (anything else is database_error).
_BUSY_STATES = {"57014", "55P03", "55006", "53300", "57P03", "25P03"}  # timeouts, locks, no connection slot
_IO_PREFIXES = ("08", "57P", "58", "XX")  # connection failures, shutdowns, system and internal errors


def _one_line(exc: BaseException) -> str:
    """A psycopg error's message on one line (libpq's messages span several)."""
    text = " ".join(str(exc).split())
    return text.removeprefix("connection failed: ") or type(exc).__name__


def redact(url: str) -> str:
    """``url`` with its password (in the user info or a ``password=`` parameter) replaced by ``***``."""
    url = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/@?#]*):[^/]*@", r"\1:***@", url)
    return re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", url)


def translate(exc: BaseException) -> BaseException:
    """A psycopg error as the :class:`StoreError` it means; anything else unchanged (the edge's one mapping)."""
    if not isinstance(exc, psycopg.Error):
        return exc
    state = exc.sqlstate or ""
    if state in _BUSY_STATES or state.startswith("40"):  # 40001 serialization, 40P01 deadlock
        code = Code.DATABASE_BUSY
    elif state == "53100":
        code = Code.DATABASE_FULL
    elif state.startswith("53"):  # out of memory and other resource limits: wait and retry
        code = Code.DATABASE_BUSY
    elif state.startswith(_IO_PREFIXES) or (
        not state and isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
    ):
        code = Code.DATABASE_IO  # the connection failed or the server is going away
    else:
        code = Code.DATABASE_ERROR
    error = StoreError(f"database error ({state or type(exc).__name__}): {_one_line(exc)}", code=code)
    error.__cause__ = exc
    return error


@functools.lru_cache(maxsize=4096)
def placeholders(sql: str) -> str:
    """``?`` placeholders (outside quoted literals and identifiers) as psycopg's ``%s``; ``%`` as ``%%``."""
    out: list[str] = []
    quote = ""
    for char in sql:
        if char == "%":
            out.append("%%")
            continue
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "?":
            out.append("%s")
            continue
        out.append(char)
    return "".join(out)


class _Conn:
    """The :class:`~daemon.store.store.Connection` the store's SQL runs on: translates placeholders."""

    __slots__ = ("_conn",)

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        if not params:
            return self._conn.execute(sql)
        return self._conn.execute(placeholders(sql), list(params))


class _Pool:
    """At most ``size`` connections, made on demand and reused; thread-safe."""

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]], size: int, wait: float) -> None:
        self._connect = connect
        self.size = size
        self._wait = wait
        self._idle: list[tuple[psycopg.Connection[Any], float]] = []
        self._count = 0
        self._closed = False
        self._cond = threading.Condition()

    def get(self) -> psycopg.Connection[Any]:
        deadline = time.monotonic() + self._wait
        while True:
            conn: psycopg.Connection[Any] | None = None
            since = 0.0
            with self._cond:
                while True:
                    if self._closed:
                        raise StoreError("the database is closed", code=Code.DATABASE_ERROR)
                    if self._idle:
                        conn, since = self._idle.pop()
                        break
                    if self._count < self.size:
                        self._count += 1
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise StoreError(
                            f"no database connection free within {self._wait:g}s", code=Code.DATABASE_BUSY
                        )
                    self._cond.wait(left)
            if conn is None:
                try:
                    return self._connect()
                except BaseException:
                    self._forget()
                    raise
            if time.monotonic() - since < CHECK_IDLE_AFTER:
                return conn
            try:
                conn.execute("")  # long idle: the server may have closed it meanwhile
                return conn
            except psycopg.Error:
                self._discard(conn)

    def put(self, conn: psycopg.Connection[Any]) -> None:
        """Return a connection; one that is closed, broken or not idle (a transaction left open) is closed."""
        healthy = (
            not conn.closed and not conn.broken and conn.info.transaction_status == pq.TransactionStatus.IDLE
        )
        with self._cond:
            if healthy and not self._closed:
                self._idle.append((conn, time.monotonic()))
                self._cond.notify()
                return
        self._discard(conn)

    def _discard(self, conn: psycopg.Connection[Any]) -> None:
        with contextlib.suppress(Exception):
            conn.close()
        self._forget()

    def _forget(self) -> None:
        with self._cond:
            self._count -= 1
            self._cond.notify()

    def close(self) -> None:
        """Close the idle connections; the busy ones are closed when they come back."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        for conn, _ in idle:
            self._discard(conn)


class PostgresStore(Store):
    """The store on a pool of PostgreSQL connections; thread-safe (one connection per call)."""

    claim_lock = " FOR UPDATE SKIP LOCKED"

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = POOL_SIZE,
        statement_timeout: float = STATEMENT_TIMEOUT,
        lock_timeout: float = LOCK_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.url = url
        self.pool_size = pool_size
        self.statement_timeout = statement_timeout
        self._lock_timeout = lock_timeout
        params = conninfo_to_dict(url)
        self._connect_kwargs: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in params:
            self._connect_kwargs["connect_timeout"] = max(1, round(connect_timeout))
        if "application_name" not in params:
            self._connect_kwargs["application_name"] = "backfilld"
        self._password = str(params.get("password") or "")
        self._pool = _Pool(self._connect, pool_size, POOL_WAIT)

    @classmethod
    def open(cls, url: str, **options: Any) -> PostgresStore:
        """Connect to ``url`` and migrate its schema; ``options`` as for the constructor.

        Every failure is a :class:`StartupError` saying what is wrong in one line, the URL's password
        redacted: ``schema_too_new`` for a database a newer backfilld migrated, else ``database_unusable``
        (the server cannot be reached, refuses the login, has no such database, the URL is malformed).
        """
        try:
            store = cls(url, **options)
        except psycopg.Error as exc:  # a malformed URL
            raise StartupError(
                f"cannot use the database {redact(url)}: {_one_line(exc)}", code=Code.DATABASE_UNUSABLE
            ) from None
        try:
            store.migrate()
        except BaseException as exc:
            store.close()
            if isinstance(exc, psycopg.Error | StoreError):
                message = _one_line(exc)
                if store._password:
                    message = message.replace(store._password, "***")
                raise StartupError(
                    f"cannot use the database {redact(url)}: {message}", code=Code.DATABASE_UNUSABLE
                ) from None
            raise
        return store

    @classmethod
    def check(cls, url: str) -> int:
        """Connect to ``url`` and read its schema version, changing nothing (``backfilld check-config``).

        Raises StartupError as :meth:`open` does: unreachable, refused, or a schema newer than this one.
        """
        try:
            store = cls(url, pool_size=1)
            try:
                version = store.schema_version()
            finally:
                store.close()
        except (psycopg.Error, StoreError) as exc:
            raise StartupError(
                f"cannot use the database {redact(url)}: {_one_line(exc)}", code=Code.DATABASE_UNUSABLE
            ) from None
        if version > SCHEMA_VERSION:
            raise StartupError(
                f"database schema version {version} is newer than this backfilld understands "
                f"({SCHEMA_VERSION}); upgrade backfilld",
                code=Code.SCHEMA_TOO_NEW,
            )
        return version

    def close(self) -> None:
        """Close the pool's connections."""
        self._pool.close()

    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self.url, **self._connect_kwargs)
        try:
            conn.execute(
                "SELECT set_config('statement_timeout', %s, false), set_config('lock_timeout', %s, false), "
                "set_config('idle_in_transaction_session_timeout', %s, false)",
                [_ms(self.statement_timeout), _ms(self._lock_timeout), _ms(IDLE_IN_TRANSACTION_TIMEOUT)],
            )
        except BaseException:
            conn.close()
            raise
        return conn

    # -- transactions -------------------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        conn = self._pool.get()
        try:
            conn.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
            try:
                yield _Conn(conn)
                conn.execute("COMMIT")
            except BaseException:
                # A failed COMMIT has already ended the transaction; an error inside it has not.
                if conn.info.transaction_status in (
                    pq.TransactionStatus.INTRANS,
                    pq.TransactionStatus.INERROR,
                ):
                    with contextlib.suppress(psycopg.Error):
                        conn.execute("ROLLBACK")
                raise
        finally:
            self._pool.put(conn)

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        conn = self._pool.get()
        try:
            yield _Conn(conn)
        finally:
            self._pool.put(conn)

    # -- schema -------------------------------------------------------------------------------------

    def schema_version(self) -> int:
        """How many migrations this database has had (0 before the first)."""
        with self._read() as conn:
            if conn.execute("SELECT to_regclass('schema_version')").fetchone()[0] is None:
                return 0
            row = conn.execute("SELECT version FROM schema_version").fetchone()
        return 0 if row is None else int(row[0])

    def migrate(self, target: int = SCHEMA_VERSION) -> None:
        """Apply the migrations up to ``target``, one transaction each, under the migration lock."""
        while True:
            with self._tx() as conn:
                conn.execute("SELECT pg_advisory_xact_lock(?, ?)", MIGRATION_LOCK)
                conn.execute("SET LOCAL statement_timeout = 0")  # a migration may rewrite a big table
                if conn.execute("SELECT to_regclass('schema_version')").fetchone()[0] is None:
                    conn.execute(VERSION_TABLE)
                row = conn.execute("SELECT version FROM schema_version").fetchone()
                if row is None:
                    conn.execute("INSERT INTO schema_version (version) VALUES (0)")
                current = 0 if row is None else int(row[0])
                if current > SCHEMA_VERSION:
                    raise StartupError(
                        f"database schema version {current} is newer than this backfilld understands "
                        f"({SCHEMA_VERSION}); upgrade backfilld",
                        code=Code.SCHEMA_TOO_NEW,
                    )
                if current >= target:
                    return
                for statement in statements(MIGRATIONS[current]):
                    conn.execute(statement)
                conn.execute("UPDATE schema_version SET version = ?", (current + 1,))

    # -- PostgreSQL's own statements ----------------------------------------------------------------

    def _depth(self, conn: Connection) -> int:
        (depth,) = conn.execute("SELECT coalesce(sum(depth), 0) FROM queue_stats").fetchone()
        return int(depth)

    def _add_depth(self, conn: Connection, delta: int) -> None:
        # One of DEPTH_SHARDS rows, so that concurrent page transactions rarely wait for each other.
        conn.execute(
            "UPDATE queue_stats SET depth = depth + ? WHERE id = ?", (delta, random.randint(1, DEPTH_SHARDS))
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
        if writes:
            conn.execute(_TAKE_TICKET)  # before the first id is allocated (module docstring)
        super()._write_records(conn, did, collection, run_id, rev, verified, writes)

    def queue_horizon(self) -> int:
        """The highest records id below which no transaction still running can commit one."""
        with self._read() as conn:
            return self._horizon(conn)

    def _horizon(self, conn: Connection) -> int:
        # Three statements, in this order, each with its own snapshot (module docstring).
        (allocated,) = conn.execute(_ALLOCATED).fetchone()
        (oldest,) = conn.execute(_OLDEST_TICKET).fetchone()
        return int(allocated) if oldest is None else min(int(allocated), int(oldest))

    def list_records_json(
        self, *, after: int, limit: int, max_value_bytes: int = 8 << 20
    ) -> tuple[str, int | None]:
        """See :meth:`Store.list_records_json`; only ids up to the queue's horizon, rendered by PostgreSQL."""
        with self._read() as conn:
            horizon = self._horizon(conn)
            if horizon <= after or limit <= 0:
                return "[]", None
            text, last = conn.execute(_RECORDS_PAGE, (after, horizon, limit, max_value_bytes)).fetchone()
        if text is None:
            return "[]", None
        return str(text), int(last)


def _ms(seconds: float) -> str:
    return f"{max(0, round(seconds * 1000))}ms"
