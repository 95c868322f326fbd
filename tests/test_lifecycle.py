"""The real process: readiness, graceful stop on signals, the instance lock, systemd notify."""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.daemonproc import DaemonProcess


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


def test_admin_port_in_use_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = DaemonProcess(tmp_path, {"admin": {"listen": f"127.0.0.1:{port}"}})
        proc.start(wait=False)
        assert proc.wait(30) == 1
    assert f"backfilld: cannot listen on 127.0.0.1:{port}" in proc.logs()
    assert "Traceback" not in proc.logs()
