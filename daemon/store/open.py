"""Opening the configured database: a SQLite path (the embedded default) or a ``postgresql://`` URL."""

from __future__ import annotations

from pathlib import Path

from daemon.store.database import Database, SerialDatabase
from daemon.store.pooled import PooledDatabase
from daemon.store.postgres import PostgresStore
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
