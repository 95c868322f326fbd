"""The SQLite backend (the embedded default): one connection, WAL, group commit, the instance lock.

Transactions: a call outside a group is its own ``BEGIN IMMEDIATE`` ... ``COMMIT`` (IMMEDIATE so that a
claim or an enqueue cannot interleave with another writer: an operator's ``sqlite3`` shell, a backup).
Inside a group commit (:meth:`SqliteStore.begin_group`, driven by :class:`daemon.store.database.SerialDatabase`)
each call is a savepoint of the group's transaction.

Whether a transaction is open is known here and only here (``_group``), never inferred elsewhere: SQLite
may end a transaction by itself when a statement fails with SQLITE_FULL, SQLITE_IOERR, SQLITE_BUSY or
SQLITE_NOMEM, and a failed COMMIT leaves it open. So any SQLite error inside a group (other than a
constraint violation, which a savepoint rolls back cleanly) aborts the whole group with
:class:`GroupAborted`; the database then rolls back and runs the group's calls again one by one, each in
its own transaction, so that no call reports success for work that was never committed, and none runs
outside a transaction. A failed COMMIT is always followed by a ROLLBACK.

Durability: WAL with ``synchronous=FULL``: with group commit it costs one fsync of the WAL per group, and
after a power loss no committed transaction is lost, so a consumer's ``after`` cursor never sees ids reused.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from daemon.errors import BackfillError, Code, StartupError, StoreError
from daemon.store.lock import InstanceLock
from daemon.store.schema import MIGRATIONS, SCHEMA_VERSION, statements
from daemon.store.store import Connection, Store

BUSY_TIMEOUT = 30.0

_ERROR_CODES = {
    "SQLITE_BUSY": Code.DATABASE_BUSY,
    "SQLITE_LOCKED": Code.DATABASE_BUSY,
    "SQLITE_FULL": Code.DATABASE_FULL,
    "SQLITE_IOERR": Code.DATABASE_IO,
}


class GroupAborted(Exception):
    """An error inside a group commit that may have ended the group's transaction (``__cause__`` says which)."""


def translate(exc: BaseException) -> BaseException:
    """A SQLite error as the :class:`StoreError` it means; anything else unchanged (the edge's one mapping)."""
    if isinstance(exc, GroupAborted) and exc.__cause__ is not None:
        exc = exc.__cause__
    if not isinstance(exc, sqlite3.Error):
        return exc
    name = getattr(exc, "sqlite_errorname", "") or ""
    code = next((c for prefix, c in _ERROR_CODES.items() if name.startswith(prefix)), Code.DATABASE_ERROR)
    if code is Code.DATABASE_ERROR and "locked" in str(exc):
        code = Code.DATABASE_BUSY
    error = StoreError(f"database error ({name or type(exc).__name__}): {exc}", code=code)
    error.__cause__ = exc
    return error


class SqliteStore(Store):
    """The store on one SQLite connection. Not thread-safe by itself: its Database serialises calls."""

    def __init__(
        self, conn: sqlite3.Connection, lock: InstanceLock | None, busy_timeout: float = BUSY_TIMEOUT
    ) -> None:
        self._conn = conn
        self._lock = lock
        self._busy_timeout = busy_timeout
        self._group = False

    @classmethod
    def open(cls, path: Path, *, lock: bool = True, busy_timeout: float = BUSY_TIMEOUT) -> SqliteStore:
        """Open (creating and migrating) the database at ``path``; with ``lock``, take the instance lock.

        ``busy_timeout`` is how long a statement waits for another writer (an operator's shell) before it
        fails with ``database_busy``. Every failure is a :class:`StartupError` saying what is wrong in one line.
        """
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            reason = (
                "a file is in the way" if isinstance(exc, FileExistsError) else (exc.strerror or str(exc))
            )
            raise StartupError(
                f"cannot create the database folder {path.parent}: {reason}", code=Code.DATABASE_UNUSABLE
            ) from None
        instance = InstanceLock.take(path) if lock else None
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA foreign_keys=ON")
                store = cls(conn, instance, busy_timeout)
                store.migrate()
            except BaseException:
                conn.close()
                raise
        except BaseException as exc:
            if instance is not None:
                instance.release()
            if isinstance(exc, sqlite3.Error):
                raise StartupError(
                    f"cannot use the database {path}: {exc}", code=Code.DATABASE_UNUSABLE
                ) from None
            raise
        return store

    def close(self) -> None:
        """Checkpoint the WAL and close; releases the instance lock."""
        try:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self._conn.close()
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    # -- transactions -------------------------------------------------------------------------------

    def begin_group(self) -> None:
        """Open a group commit's transaction; the calls until :meth:`commit_group` are savepoints of it."""
        self._conn.execute("BEGIN IMMEDIATE")
        self._group = True

    def commit_group(self) -> None:
        """Commit the group; on failure the group stays open for :meth:`abort_group`."""
        self._conn.execute("COMMIT")
        self._group = False

    def abort_group(self) -> None:
        """Roll the group back, whatever state SQLite left it in."""
        self._group = False
        self._rollback()

    def _rollback(self) -> None:
        # A failed COMMIT leaves the transaction open; an error inside one may already have ended it.
        if self._conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        conn = self._conn
        if self._group:
            with self._savepoint():
                yield conn
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            self._rollback()
            raise
        try:
            conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    @contextmanager
    def _savepoint(self) -> Iterator[None]:
        conn = self._conn
        try:
            conn.execute("SAVEPOINT call")
        except sqlite3.Error as exc:
            raise GroupAborted() from exc
        try:
            yield
        except (sqlite3.IntegrityError, BackfillError):
            # The call's own failure: undo just the call and let the group go on.
            try:
                conn.execute("ROLLBACK TO call")
                conn.execute("RELEASE call")
            except sqlite3.Error as exc:
                raise GroupAborted() from exc
            raise
        except sqlite3.Error as exc:
            raise GroupAborted() from exc
        try:
            conn.execute("RELEASE call")
        except sqlite3.Error as exc:
            raise GroupAborted() from exc

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        yield self._conn

    def ping(self) -> bool:
        """True when the daemon could write now: the write lock is free (probed without waiting for it).

        A plain ``SELECT`` succeeds while an operator's shell holds the write lock, and every write then
        waits the busy timeout and fails; ``/healthz`` must say so. Inside a group commit the group's
        transaction holds the lock already.
        """
        if self._group:
            return True
        conn = self._conn
        conn.execute("PRAGMA busy_timeout = 0")
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
        finally:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
        return True

    # -- schema -------------------------------------------------------------------------------------

    def schema_version(self) -> int:
        """``PRAGMA user_version``: how many migrations this database has had."""
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

    # -- SQLite's own statements --------------------------------------------------------------------

    def list_records_json(
        self, *, after: int, limit: int, max_value_bytes: int = 8 << 20
    ) -> tuple[str, int | None]:
        """See :meth:`Store.list_records_json`; SQLite renders the entries with ``json_object``."""
        rows = self._conn.execute(
            "SELECT id, length(CAST(record AS BLOB)), json_object('id', id, 'did', did, 'collection', collection, "
            "'rkey', rkey, 'operation', operation, 'cid', cid, 'record', json(record), 'rev', rev, "
            "'verified', json(CASE WHEN verified THEN 'true' ELSE 'false' END), 'source', source, "
            "'run_id', run_id) FROM records WHERE id > ? ORDER BY id LIMIT ?",
            (after, limit),
        ).fetchall()
        page: list[str] = []
        size = 0
        last: int | None = None
        for record_id, value_size, rendered in rows:
            if page and size + (value_size or 0) > max_value_bytes:
                break
            size += value_size or 0
            page.append(rendered)
            last = record_id
        return "[" + ",".join(page) + "]", last
