"""The real process while an operator's ``sqlite3`` shell holds a write lock (SPEC 7, issue 9 item 3).

The lock is held past the daemon's busy timeout (:data:`daemon.store.sqlite.BUSY_TIMEOUT`, which tests do
not change), so the daemon's own writes really fail with ``database_busy``; nothing may kill it. This test
takes about BUSY_TIMEOUT seconds, or two of them when the daemon's first blocked write was not the
request this test made.
"""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from daemon.simnet import expected_records
from daemon.store.sqlite import BUSY_TIMEOUT
from tests.daemonproc import TOKEN, DaemonProcess
from tests.simnetproc import simnet_process

COLL = "com.example.record"
# Every wait is for a condition, with room for a machine whose cores are all busy.
LONG = 4 * BUSY_TIMEOUT + 60


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Call(threading.Thread):
    """One admin request in the background, with a timeout long enough for any busy wait."""

    def __init__(self, method: str, url: str, **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self.method, self.url, self.kwargs = method, url, kwargs
        self.response: httpx.Response | None = None
        self.start()

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        self.response = httpx.request(self.method, self.url, headers=headers, timeout=LONG, **self.kwargs)


class NotifyListener(threading.Thread):
    """Collects what the daemon sends to ``$NOTIFY_SOCKET``."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self.stopped = False
        self.start()

    def run(self) -> None:
        while not self.stopped:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue

    def close(self) -> None:
        self.stopped = True
        self.join(5)
        self.sock.close()


def test_an_operator_write_lock_never_kills_the_daemon(tmp_path: Path) -> None:
    with simnet_process(tmp_path, accounts=6, records=250, hosts=2, collections=[COLL], latency=0.02) as (
        net,
        spec,
    ):
        dids = [a.did for a in spec.accounts]
        notify = NotifyListener(tmp_path / "notify.sock")
        daemon = DaemonProcess(
            tmp_path / "daemon",
            {
                "daemon": {"workers": 4, "shutdown_grace": 5.0},
                "atproto": {
                    "relay": net["relay_url"],
                    "plc_directory": net["plc_url"],
                    "collections": [COLL],
                },
                "retry": {"backoff_base": 0.05, "backoff_cap": 0.5},
                "network": {"per_host_rate": 0.0},
            },
        )
        try:
            daemon.start(env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"})
            first = daemon.call("POST", "/_admin/backfill", json={"dids": dids[:3]})
            assert first.status_code == 202

            # An operator's shell takes the write lock, as docs/operations.md invites.
            shell = sqlite3.connect(tmp_path / "daemon" / "data" / "db.sqlite3", isolation_level=None)
            shell.execute("BEGIN IMMEDIATE")
            locked_at = len(notify.messages)
            # A write that must wait for the lock (whatever the first run is doing by now).
            second = Call("POST", daemon.base + "/_admin/backfill", json={"dids": dids[3:]})

            # /healthz answers (each request with its own timeout) and says 503 while writes wait.
            def unhealthy() -> bool:
                response = daemon.call("GET", "/healthz", token=None)
                assert response.status_code in (200, 503)
                return response.status_code == 503 and response.json() == {"ok": False}

            wait_for(unhealthy, BUSY_TIMEOUT + 30, "/healthz to answer 503")
            reads = [
                Call("GET", daemon.base + path)
                for path in ("/_admin/status", "/_admin/runs", f"/_admin/runs/{first.json()['run_id']}")
            ]

            # Hold the lock until the daemon has met "database is locked" and the watchdog says so.
            def failing_seen() -> bool:
                events = daemon.log_events()
                busy = any(e.get("error_code") == "database_busy" for e in events)
                status = any("STATUS=database failing" in m for m in notify.messages[locked_at:])
                return busy and status

            wait_for(failing_seen, LONG, "the daemon to meet the lock and say so")
            assert daemon.proc is not None and daemon.proc.poll() is None
            watchdog_during_lock = sum("WATCHDOG=1" in m for m in notify.messages[locked_at:])
            shell.execute("ROLLBACK")
            shell.close()

            wait_for(
                lambda: daemon.call("GET", "/healthz", token=None).status_code == 200, LONG, "/healthz 200"
            )
            for call in [second, *reads]:
                call.join(LONG)
                assert call.response is not None, f"{call.url} got no answer"
                assert call.response.status_code in (200, 202, 503), call.response.text
                if call.response.status_code == 503:
                    assert call.response.json()["error"] == "DatabaseUnavailable"
            assert second.response is not None
            if second.response.status_code == 503:  # it met the lock; the operator asks again
                second = Call("POST", daemon.base + "/_admin/backfill", json={"dids": dids[3:]})
                second.join(LONG)
                assert second.response is not None and second.response.status_code == 202
            runs = [first.json()["run_id"], second.response.json()["run_id"]]
            finished = [daemon.wait_run_finished(run_id, timeout=LONG) for run_id in runs]
            records = daemon.all_records()
            assert daemon.proc.poll() is None
            daemon.signal(signal.SIGTERM)
            assert daemon.wait(30) == 0
        finally:
            daemon.stop()
            notify.close()
    assert watchdog_during_lock >= 2  # the watchdog kept pinging while the database was locked
    assert all(run["state"] == "finished" and run["jobs"]["done"] == 3 for run in finished)
    got = [(r["did"], r["collection"], r["rkey"], r["cid"]) for r in records]
    assert len(got) == len(set(got)) and set(got) == expected_records(spec)
    events = [json.loads(line) for line in daemon.logs().splitlines()]
    assert not [
        e for e in events if e["level"] in ("critical",) or e["event"].startswith("admin request crashed")
    ]
