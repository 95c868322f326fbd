"""The single-instance lock of a SQLite database (SPEC 3).

The lock is an ``flock`` on the database file itself, so it holds whatever path reaches the file: through a
symlink, a bind mount or a relative path, two daemons on one database always meet on the same inode. (SQLite's
own locks are POSIX record locks, which ``flock`` locks do not interact with on local file systems; the
descriptor stays open until the connection is closed, because closing any descriptor of the file would
drop SQLite's POSIX locks.) The holder's pid goes to ``<database>.lock`` beside the real file, only so the
refusal can name it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from daemon.errors import Code, StartupError


class InstanceLock:
    """An exclusive ``flock`` on a database file, taken with :meth:`take`, dropped with :meth:`release`."""

    def __init__(self, fd: int, pid_file: Path) -> None:
        self._fd: int | None = fd
        self._pid_file = pid_file

    @classmethod
    def take(cls, path: Path) -> InstanceLock:
        """Lock the database at ``path`` (creating the empty file if needed), or raise StartupError."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StartupError(
                f"cannot open the database {path}: {exc.strerror or exc}", code=Code.DATABASE_UNUSABLE
            ) from None
        real = Path(os.path.realpath(path))
        pid_file = real.with_name(real.name + ".lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StartupError(
                f"another backfilld is already running on {path} (pid {_holder(pid_file)}); "
                "stop it first or point this one at a different database",
                code=Code.DATABASE_LOCKED,
            ) from None
        with contextlib.suppress(OSError):
            pid_file.write_text(f"{os.getpid()}\n")
        return cls(fd, pid_file)

    def release(self) -> None:
        """Drop the lock (after the database connection is closed)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self._pid_file.unlink()
        os.close(self._fd)
        self._fd = None


def _holder(pid_file: Path) -> str:
    try:
        return pid_file.read_text().strip() or "unknown"
    except OSError:
        return "unknown"
