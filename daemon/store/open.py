"""Opening the configured database: a SQLite path (the embedded default) or a ``postgresql://`` URL."""

from __future__ import annotations

from pathlib import Path

from daemon.errors import Code, StartupError
from daemon.store.database import Database, SerialDatabase
from daemon.store.sqlite import SqliteStore


def open_database(database: Path | str) -> Database:
    """The database hop for ``daemon.database``; raises StartupError when it cannot be used."""
    if isinstance(database, str):
        raise StartupError(
            "PostgreSQL databases are not supported by this build", code=Code.DATABASE_UNUSABLE
        )
    return SerialDatabase(SqliteStore.open(database))
