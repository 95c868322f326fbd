"""A throwaway PostgreSQL server for the test suite: found, initialised, started and removed again.

``PgServer`` runs ``initdb`` into a fresh directory under the system temp dir, starts the server with
``pg_ctl`` on 127.0.0.1 and a free TCP port (plus a unix socket inside that directory), and hands out
one new, empty database per request::

    with PgServer(find_pg_bin()) as server:        # start() ... stop()
        url = server.create_database()              # postgresql://postgres@127.0.0.1:<port>/<name>
        ...
        server.drop_database(url)                   # optional; stop() removes everything

The server is tuned for tests, not durability: ``fsync``, ``synchronous_commit`` and ``full_page_writes``
are off, authentication is ``trust`` (only 127.0.0.1 and the private socket listen), and
``max_connections`` is 200 (room for a few daemons with their pools, plus the tests themselves).

``initdb`` and ``postgres`` refuse to run as root. When the tests run as root (as in CI), every server
command runs as an unprivileged user instead: ``$BACKFILLD_TEST_PG_USER`` if set, else ``postgres`` if
that user exists, else ``nobody``, via ``setpriv`` (or ``runuser``, or Python's own setuid as a last
resort). The server's directory is created directly under the temp dir (not under pytest's 0700
``tmp_path``), so that user can reach it, and is chowned to that user.

Binaries: ``$BACKFILLD_TEST_PG_BIN`` (a directory holding initdb, pg_ctl and postgres) if set, else the
directory of ``initdb`` on PATH, else the newest ``/usr/lib/postgresql/<version>/bin`` (and the usual
RHEL and source-install places).

Every server has its own directory (``mkdtemp``) and its own port (picked free, and picked again if
another process takes it first), so several pytest processes can run at once. ``stop()`` runs from the
fixture's teardown, from ``__exit__`` and, as a backstop, at interpreter exit; a directory left behind
by a killed process (its owner pid gone) is cleaned up, and its server stopped, by the next start.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import itertools
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import psycopg
from psycopg import sql

PG_BIN_ENV = "BACKFILLD_TEST_PG_BIN"
PG_USER_ENV = "BACKFILLD_TEST_PG_USER"
DIR_PREFIX = "backfilld-pg-"
SUPERUSER = "postgres"
HOST = "127.0.0.1"
REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")
SEARCH_GLOBS = ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin", "/usr/local/pgsql/bin")
START_TIMEOUT = 120  # seconds; generous, because CI may have every core busy
PORT_ATTEMPTS = 5

SETTINGS: dict[str, str] = {
    "listen_addresses": f"'{HOST}'",
    "max_connections": "200",
    "shared_buffers": "32MB",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "max_wal_size": "1GB",
    "checkpoint_timeout": "30min",
    "max_parallel_workers_per_gather": "0",  # no parallel query workers: less CPU, no /dev/shm surprises
    "jit": "off",
    "timezone": "'UTC'",
    "log_timezone": "'UTC'",
    "log_line_prefix": "'%m [%p] %d '",
    "log_min_messages": "warning",
}


class PgServerError(RuntimeError):
    """The server could not be found, set up, started or used; the message says why (and quotes its log)."""


def _has_binaries(directory: Path) -> bool:
    return all(
        (directory / name).is_file() and os.access(directory / name, os.X_OK) for name in REQUIRED_BINARIES
    )


def _version_key(bin_dir: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/15/bin -> (15,), /usr/pgsql-9.6/bin -> (9, 6), /usr/local/pgsql/bin -> ()
    match = re.search(r"\d+(?:\.\d+)*", bin_dir.parent.name)
    return tuple(int(part) for part in match.group().split(".")) if match else ()


def find_pg_bin() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres, or None if there is none.

    A ``$BACKFILLD_TEST_PG_BIN`` that does not hold them is an error, not "absent".
    """
    override = os.environ.get(PG_BIN_ENV, "").strip()
    if override:
        directory = Path(override).expanduser()
        if not _has_binaries(directory):
            raise PgServerError(f"${PG_BIN_ENV}={override!r} does not contain {', '.join(REQUIRED_BINARIES)}")
        return directory
    on_path = shutil.which("initdb")
    if on_path and _has_binaries(Path(on_path).parent):
        return Path(on_path).parent
    candidates = [Path(p) for pattern in SEARCH_GLOBS for p in glob.glob(pattern)]
    for directory in sorted(candidates, key=_version_key, reverse=True):
        if _has_binaries(directory):
            return directory
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _unprivileged_user() -> pwd.struct_passwd:
    wanted = os.environ.get(PG_USER_ENV, "").strip()
    for name in [wanted] if wanted else ["postgres", "nobody"]:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        if entry.pw_uid != 0:
            return entry
    raise PgServerError(
        f"running as root, and no unprivileged user to run PostgreSQL as ({wanted or 'postgres, nobody'})"
    )


def _traversable_by_others(path: Path) -> bool:
    return all(os.stat(p).st_mode & 0o001 for p in [path, *path.parents])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _postmaster_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def _is_postmaster_of(pid: int, data_dir: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(data_dir).encode() in cmdline


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def reap_stale_servers(parent: Path) -> None:
    """Stop and remove servers whose owning process died without cleaning up (SIGKILL, power cut...).

    Conservative: a directory is touched only if its owner pid is gone and its postmaster, if it has a
    pid file, is visibly a postgres process running on that very data directory.
    """
    for base in parent.glob(DIR_PREFIX + "*"):
        with contextlib.suppress(OSError, ValueError):
            if _pid_alive(int((base / "owner.pid").read_text())):
                continue
            data_dir = base / "data"
            pid = _postmaster_pid(data_dir)
            if pid is not None:
                if not _is_postmaster_of(pid, data_dir):
                    continue
                os.kill(pid, signal.SIGQUIT)  # the postmaster's "immediate shutdown"
                _wait_gone(pid, 5.0)
            shutil.rmtree(base, ignore_errors=True)


class PgServer:
    """One throwaway PostgreSQL server; see the module docstring."""

    def __init__(self, bin_dir: Path, *, settings: dict[str, str] | None = None) -> None:
        self.bin_dir = bin_dir
        self.settings = {**SETTINGS, **(settings or {})}
        self.host = HOST
        self.user = SUPERUSER  # the database role in every URL
        self.port = 0
        self.base_dir: Path | None = None
        self.startup_seconds = 0.0
        self.server_version = 0  # e.g. 150008
        self._as_root = os.geteuid() == 0
        self._runas = _unprivileged_user() if self._as_root else pwd.getpwuid(os.geteuid())
        self.os_user = self._runas.pw_name  # the operating-system user the server runs as
        self._owner_pid = 0
        self._admin: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()
        self._names = itertools.count(1)
        self._started = False

    # -- paths ---------------------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self._base / "data"

    @property
    def socket_dir(self) -> Path:
        return self._base / "sock"

    @property
    def log_path(self) -> Path:
        return self._base / "server.log"

    @property
    def _base(self) -> Path:
        if self.base_dir is None:
            raise PgServerError("the server has not been started")
        return self.base_dir

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    # -- running commands as the server's user -------------------------------------------------------

    def _run(self, args: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C", HOME=str(self._base))
        prefix: list[str] = []
        extra: dict[str, Any] = {}
        if self._as_root:
            uid, gid, name = self._runas.pw_uid, self._runas.pw_gid, self._runas.pw_name
            if shutil.which("setpriv"):
                prefix = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups"]
            elif shutil.which("runuser"):
                prefix = ["runuser", "-u", name, "--"]
            else:
                extra = {"user": uid, "group": gid, "extra_groups": os.getgrouplist(name, gid)}
        try:
            return subprocess.run(
                [*prefix, *args],
                cwd=self._base,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                **extra,
            )
        except subprocess.TimeoutExpired as e:
            raise PgServerError(
                f"{Path(args[0]).name} did not finish within {timeout:.0f}s{self._log_tail()}"
            ) from e

    def _log_tail(self, since: int = 0, lines: int = 30) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                text = f.read().decode(errors="replace")
        except (OSError, PgServerError):
            return ""
        tail = text.splitlines()[-lines:]
        return f"\n--- last lines of {self.log_path} ---\n" + "\n".join(tail) if tail else ""

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> Self:
        """Initialise and start the server; on any failure, clean up and raise PgServerError."""
        if self._started:
            return self
        began = time.monotonic()
        self._started = True
        self._owner_pid = os.getpid()
        atexit.register(self._stop_at_exit)
        try:
            self._prepare_dirs()
            self._initdb()
            self._start_postmaster()
            self._admin = self._connect_admin()
            self.server_version = self._admin.info.server_version
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _prepare_dirs(self) -> None:
        parent = Path(tempfile.gettempdir())
        if self._as_root and not _traversable_by_others(parent):
            parent = Path("/tmp")
        reap_stale_servers(parent)
        self.base_dir = Path(tempfile.mkdtemp(prefix=DIR_PREFIX, dir=parent))
        (self.base_dir / "owner.pid").write_text(str(self._owner_pid))
        self.socket_dir.mkdir()
        for path in (self.base_dir, self.socket_dir):
            path.chmod(0o755)
            if self._as_root:
                os.chown(path, self._runas.pw_uid, self._runas.pw_gid)

    def _initdb(self) -> None:
        args = [str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", self.user, "-A", "trust"]
        args += ["-E", "UTF8", "--locale=C", "--no-sync"]
        done = self._run(args, timeout=START_TIMEOUT)
        if done.returncode != 0:
            raise PgServerError(
                f"initdb failed (exit {done.returncode}) as {self.os_user}:\n{done.stdout}{done.stderr}"
            )
        conf = {**self.settings, "unix_socket_directories": f"'{self.socket_dir}'"}
        with open(self.data_dir / "postgresql.conf", "a") as f:  # still owned by the server's user
            f.write("\n# tests/pgserver.py\n" + "".join(f"{k} = {v}\n" for k, v in conf.items()))

    def _start_postmaster(self) -> None:
        for _ in range(PORT_ATTEMPTS):
            self.port = free_port()
            log_size = self.log_path.stat().st_size if self.log_path.exists() else 0
            args = [
                str(self.bin_dir / "pg_ctl"),
                "start",
                "-w",
                "-t",
                str(START_TIMEOUT),
                "-D",
                str(self.data_dir),
            ]
            args += ["-l", str(self.log_path), "-o", f"-p {self.port}"]
            done = self._run(args, timeout=START_TIMEOUT + 30)
            if done.returncode == 0:
                return
            new_log = self._log_tail(since=log_size, lines=1000)
            if "could not bind" not in new_log and "already in use" not in new_log:
                raise PgServerError(
                    f"pg_ctl start failed (exit {done.returncode}) as {self.os_user} on port {self.port}:\n"
                    f"{done.stdout}{done.stderr}{self._log_tail(since=log_size)}"
                )
            # Another process took the port between free_port() and the bind: pick another one.
        raise PgServerError(f"no free port after {PORT_ATTEMPTS} attempts{self._log_tail()}")

    def _connect_admin(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(self.url(), autocommit=True, connect_timeout=30)
        except psycopg.Error as e:
            raise PgServerError(
                f"the server started but does not accept connections: {e}{self._log_tail()}"
            ) from e

    def stop(self) -> None:
        """Stop the server (immediate shutdown) and delete its directory. Idempotent; never raises."""
        atexit.unregister(self._stop_at_exit)
        if self._admin is not None:
            with contextlib.suppress(Exception):
                self._admin.close()
            self._admin = None
        if self.base_dir is None:
            return
        pid = _postmaster_pid(self.data_dir)
        if pid is not None:
            with contextlib.suppress(Exception):
                self._run(
                    [str(self.bin_dir / "pg_ctl"), "stop", "-D", str(self.data_dir), "-m", "immediate", "-w"],
                    60,
                )
            if _pid_alive(pid) and _is_postmaster_of(pid, self.data_dir):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGQUIT)
                _wait_gone(pid, 10.0)
        shutil.rmtree(self.base_dir, ignore_errors=True)
        self.base_dir = None
        self._started = False

    def _stop_at_exit(self) -> None:
        if os.getpid() == self._owner_pid:  # not in a forked child that inherited the handler
            self.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- databases -----------------------------------------------------------------------------------

    def _execute(self, statement: sql.Composed) -> None:
        with self._lock:
            try:
                if self._admin is None or self._admin.closed:
                    self._admin = self._connect_admin()
                self._admin.execute(statement)
            except psycopg.OperationalError as e:
                self._admin = None
                raise PgServerError(f"{statement.as_string(None)} failed: {e}{self._log_tail()}") from e

    def create_database(self, name: str | None = None) -> str:
        """Create a new, empty database (a copy of template0) and return its URL."""
        name = name or f"test_{next(self._names)}_{secrets.token_hex(3)}"
        # FILE_COPY (PostgreSQL 15+) copies the template's files instead of WAL-logging every block:
        # about 9 ms instead of 25 ms per database here, and durability is off anyway.
        strategy = sql.SQL(" STRATEGY FILE_COPY") if self.server_version >= 150000 else sql.SQL("")
        self._execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE template0{}").format(sql.Identifier(name), strategy)
        )
        return self.url(name)

    def drop_database(self, url_or_name: str) -> None:
        """Drop a database by URL or name, disconnecting anyone still connected to it."""
        name = url_or_name.rsplit("/", 1)[-1]
        force = sql.SQL(" WITH (FORCE)") if self.server_version >= 130000 else sql.SQL("")
        self._execute(sql.SQL("DROP DATABASE IF EXISTS {}{}").format(sql.Identifier(name), force))

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A fresh database's URL for the duration of a ``with`` block."""
        url = self.create_database()
        try:
            yield url
        finally:
            self.drop_database(url)
