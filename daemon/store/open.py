"""Opening the configured database: a SQLite path (the embedded default) or a ``postgresql://`` URL."""

from __future__ import annotations

from pathlib import Path

from daemon.store.database import Database, SerialDatabase
from daemon.store.pooled import PooledDatabase
from daemon.store.postgres import PostgresStore, redact
from daemon.store.sqlite import SqliteStore


def open_database(database: Path | str) -> Database:
    """The database hop for ``daemon.database``; raises StartupError when it cannot be used.

    A path is a SQLite database (one serialised connection, group commit, the instance lock); a
    ``postgresql://`` URL (the config keeps it as a string) is a PostgreSQL database shared by any number
    of daemons (a connection pool, one worker thread per call).
    """
    if isinstance(database, str):
        return PooledDatabase(PostgresStore.open(database))
    return SerialDatabase(SqliteStore.open(database))


def check_database(database: Path | str) -> str | None:
    """For ``backfilld check-config``: reach a PostgreSQL database and read its schema version, changing
    nothing; a description of what was found, or None for a SQLite path (opening it would take the
    instance lock of a running daemon). Raises StartupError as :func:`open_database` would."""
    if isinstance(database, str):
        version = PostgresStore.check(database)
        return f"reached {redact(database)} (schema version {version}{', not yet created' if not version else ''})"
    return None
