"""The single-instance lock of a SQLite database (SPEC 3): an ``flock`` on ``<database>.lock``."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from daemon.errors import StartupError


def take_lock(path: Path) -> int:
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        os.close(fd)
        raise StartupError(
            f"another backfilld is already running on {path} (pid {holder or 'unknown'}, lock {lock_path}); "
            "stop it first or point this one at a different database"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
