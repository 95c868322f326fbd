"""The real process: readiness, graceful stop on signals, the instance lock, systemd notify."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import structlog
import trio
import trio.testing

from daemon.process import daemon as daemon_module
from daemon.process.daemon import close_within
from daemon.simnet import build_spec, open_network
from daemon.store.schema import SCHEMA_VERSION
from daemon.store.sqlite import SqliteStore
from tests.daemonproc import DaemonProcess
from tests.inprocess import COLL, running_daemon


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_gracefully_with_exit_0(tmp_path: Path, signum: int) -> None:
    proc = DaemonProcess(tmp_path).start()
    assert proc.call("GET", "/healthz", token=None).status_code == 200
    proc.signal(signum)
    assert proc.wait(10) == 0
    events = [e.get("event") for e in proc.log_events()]
    assert "backfilld ready" in events and "backfilld stopped" in events


def test_second_instance_on_the_same_database_is_refused(tmp_path: Path) -> None:
    first = DaemonProcess(tmp_path / "a", {"daemon": {"database": str(tmp_path / "shared.sqlite3")}}).start()
    try:
        second = DaemonProcess(tmp_path / "b", {"daemon": {"database": str(tmp_path / "shared.sqlite3")}})
        second.start(wait=False)
        assert second.wait(30) == 1
        assert "another backfilld is already running" in second.logs()
        assert first.call("GET", "/healthz", token=None).status_code == 200
    finally:
        first.stop()


def test_invalid_config_fails_to_start_naming_the_key(tmp_path: Path) -> None:
    proc = DaemonProcess(tmp_path, {"daemon": {"workers": 0}, "limits": {"bogus": 1}})
    proc.start(wait=False)
    assert proc.wait(30) == 1
    assert "daemon.workers" in proc.logs() and "limits.bogus: unknown key" in proc.logs()


def test_sd_notify_ready_and_stopping(tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(30)
        proc = DaemonProcess(tmp_path).start(env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "200000"})
        messages = []
        deadline = time.monotonic() + 30
        while not any("WATCHDOG=1" in m for m in messages) and time.monotonic() < deadline:
            messages.append(sock.recv(4096).decode())
        assert any("READY=1" in m for m in messages)
        proc.signal(signal.SIGTERM)
        while not any("STOPPING=1" in m for m in messages) and time.monotonic() < deadline:
            messages.append(sock.recv(4096).decode())
        assert proc.wait(10) == 0
    assert any(m.startswith("READY=1") and "STATUS=" in m for m in messages)


def test_logs_are_json_lines_when_asked(tmp_path: Path) -> None:
    proc = DaemonProcess(tmp_path).start()
    proc.stop()
    lines = [line for line in proc.logs().splitlines() if line.startswith("{")]
    assert lines and all("event" in json.loads(line) for line in lines)


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def start_failure(result: subprocess.CompletedProcess[str]) -> str:
    """The one JSON line a daemon that cannot start writes (stderr), as its ``error`` text."""
    assert result.returncode == 1, result
    assert result.stdout == "" and "Traceback" not in result.stderr, result
    event = json.loads(one_line(result.stderr))
    assert event["event"] == "cannot start" and event["level"] == "error", event
    assert event["error_code"], event
    return str(event["error"])


def test_admin_port_in_use_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = DaemonProcess(tmp_path, {"admin": {"listen": f"127.0.0.1:{port}"}}).run_to_exit()
    assert start_failure(result).startswith(f"cannot listen on 127.0.0.1:{port}: ")


def test_second_instance_is_one_clear_line(tmp_path: Path) -> None:
    database = {"daemon": {"database": str(tmp_path / "shared.sqlite3")}}
    first = DaemonProcess(tmp_path / "a", database).start()
    try:
        result = DaemonProcess(tmp_path / "b", database).run_to_exit()
    finally:
        first.stop()
    assert "another backfilld is already running on" in start_failure(result)


def test_not_a_database_is_one_clear_line(tmp_path: Path) -> None:
    proc = DaemonProcess(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "db.sqlite3").write_bytes(b"these are not the bytes of a database\n" * 100)
    error = start_failure(proc.run_to_exit())
    assert "cannot use the database" in error and "file is not a database" in error


def test_not_a_database_on_the_console_is_one_plain_line(tmp_path: Path) -> None:
    proc = DaemonProcess(tmp_path, {"daemon": {"log_format": "console"}})
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "db.sqlite3").write_bytes(b"garbage" * 1000)
    result = proc.run_to_exit()
    assert result.returncode == 1 and result.stdout == ""
    line = one_line(result.stderr)
    assert line.startswith("backfilld: cannot use the database ") and line.endswith("file is not a database")


def test_a_newer_schema_is_one_clear_line(tmp_path: Path) -> None:
    proc = DaemonProcess(tmp_path)
    (tmp_path / "data").mkdir()
    with contextlib.closing(sqlite3.connect(tmp_path / "data" / "db.sqlite3")) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    error = start_failure(proc.run_to_exit())
    assert f"database schema version {SCHEMA_VERSION + 1} is newer" in error and "upgrade backfilld" in error


def test_a_database_folder_that_is_a_file_is_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("a file where the database's folder should be\n")
    error = start_failure(DaemonProcess(tmp_path).run_to_exit())
    assert str(tmp_path / "data") in error


def _unprivileged() -> tuple[str, ...] | None:
    """A command prefix that runs the daemon as a user file permissions apply to, or None."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    prefix = (setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups")
    probe = subprocess.run([*prefix, sys.executable, "-c", "import daemon"], capture_output=True, check=False)
    return prefix if probe.returncode == 0 else None


def test_permission_denied_is_one_clear_line() -> None:
    prefix = _unprivileged()
    if prefix is None:
        pytest.skip("running as root without a working `setpriv --reuid=nobody`: permissions do not apply")
    # pytest's tmp_path is private to its user; this folder must be readable by the unprivileged one.
    with tempfile.TemporaryDirectory(prefix="backfilld-perm-") as folder:
        workdir = Path(folder)
        workdir.chmod(0o755)
        proc = DaemonProcess(workdir)
        (workdir / "data").mkdir(mode=0o755)
        database = workdir / "data" / "db.sqlite3"
        with contextlib.closing(sqlite3.connect(database)) as conn:
            conn.execute("CREATE TABLE operator_only (x)")
        database.chmod(0o600 if prefix else 0o000)  # owned by root (setpriv), or unreadable to us
        error = start_failure(proc.run_to_exit(prefix=prefix))
    assert str(database) in error and "Permission denied" in error


def test_an_unreachable_postgresql_url_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql://backfilld:s3cret-pw@127.0.0.1:{port}/backfilld?connect_timeout=5"
    error = start_failure(DaemonProcess(tmp_path, {"daemon": {"database": url}}).run_to_exit())
    assert error.startswith(f"cannot use the database postgresql://backfilld:***@127.0.0.1:{port}/")
    assert "s3cret-pw" not in error


# -- shutdown's shielded close has a deadline --------------------------------------------------------


async def test_a_close_that_hangs_is_given_up_after_its_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    closed: list[str] = []

    async def hangs() -> None:
        await trio.sleep_forever()

    async def closes() -> None:
        await trio.sleep(1.0)
        closed.append("database")

    with structlog.testing.capture_logs() as logs:
        with trio.CancelScope() as outer:
            outer.cancel()  # a cancelled shutdown (a second signal): the close is shielded from it
            start = trio.current_time()
            clean = await close_within(("fetcher", hangs, 5.0), ("database", closes, 10.0))
    assert not clean and closed == ["database"]  # the hang did not keep the database from closing
    assert trio.current_time() - start == pytest.approx(6.0)
    assert {
        "event": "shutdown: closing timed out; giving up",
        "resource": "fetcher",
        "timeout": 5.0,
        "log_level": "error",
    } in logs


async def test_a_close_that_fails_is_logged_and_the_next_one_runs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    closed: list[str] = []

    async def fails() -> None:
        raise OSError("the disk went away")

    async def closes() -> None:
        closed.append("database")

    with structlog.testing.capture_logs() as logs:
        assert not await close_within(("fetcher", fails, 5.0), ("database", closes, 10.0))
    assert closed == ["database"]
    assert any(e["event"] == "shutdown: closing failed" and e["resource"] == "fetcher" for e in logs)
    assert await close_within(("database", closes, 10.0))


async def test_the_daemon_stops_even_when_a_close_hangs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(daemon_module, "FETCHER_CLOSE_TIMEOUT", 0.2)
    async with open_network(build_spec(1, 1, collections=[COLL])) as network:
        async with running_daemon(tmp_path, network) as daemon:

            async def hangs() -> None:
                await trio.sleep_forever()

            daemon.fetcher.aclose = hangs  # type: ignore[method-assign]
        # running_daemon's block ended: Daemon.run returned; the database was closed all the same,
        # so its instance lock is free again.
    reopened = SqliteStore.open(tmp_path / "db.sqlite3")
    reopened.close()
