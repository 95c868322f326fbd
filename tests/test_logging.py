"""Logs (SPEC 8): with ``log_format = "json"`` every line the process writes is a JSON object, whether it
comes from structlog, a library's stdlib logger, ``warnings``, or a traceback (issue 9, item 8)."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from tests.daemonproc import DaemonProcess

# What a process that configured logging for `backfilld run` may run into; each case writes one record.
PROVOCATIONS = textwrap.dedent(
    """
    import logging, sys, threading, warnings
    import structlog
    from daemon.process.logsetup import configure_logging

    configure_logging(sys.argv[1], "info", process_errors=True)
    log = structlog.get_logger("backfilld.test")
    log.info("structlog event", answer=42)
    log.debug("below the level")
    logging.getLogger("hypercorn.error").info("a library's info: below its floor")
    logging.getLogger("hypercorn.error").error("Error in ASGI Framework %s", "(a library's error)")
    try:
        1 / 0
    except ZeroDivisionError:
        log.exception("structlog exception")
        logging.getLogger("backfilld.admin").exception("stdlib exception")
    warnings.warn("a warning, routed through logging")
    thread = threading.Thread(target=lambda: 1 / 0, name="doomed")
    thread.start()
    thread.join()

    class Finalizer:
        def __del__(self):
            raise ValueError("raised in __del__")

    Finalizer()
    raise RuntimeError("nobody caught this")
    """
)


def provoke(log_format: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PROVOCATIONS, log_format],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def json_lines(text: str) -> list[dict[str, Any]]:
    events = []
    for line in text.splitlines():
        event = json.loads(line)  # every line, or this fails
        assert isinstance(event, dict), line
        events.append(event)
    return events


def test_every_kind_of_record_is_one_json_line() -> None:
    result = provoke("json")
    assert result.returncode == 1 and result.stdout == ""
    events = json_lines(result.stderr)
    by_event = {e["event"]: e for e in events}
    assert by_event["structlog event"]["answer"] == 42 and by_event["structlog event"]["level"] == "info"
    assert "below the level" not in by_event and not any("below its floor" in e["event"] for e in events)
    library = by_event["Error in ASGI Framework (a library's error)"]
    assert library["logger"] == "hypercorn.error" and library["level"] == "error"
    for name in ("structlog exception", "stdlib exception"):
        assert by_event[name]["exception"].startswith("Traceback (most recent call last):")
        assert "ZeroDivisionError" in by_event[name]["exception"]
    assert by_event["stdlib exception"]["logger"] == "backfilld.admin"
    warning = next(e for e in events if "a warning, routed through logging" in e["event"])
    assert warning["logger"] == "py.warnings" and warning["level"] == "warning"
    thread = by_event["uncaught exception in a thread"]
    assert thread["thread"] == "doomed" and "ZeroDivisionError" in thread["exception"]
    assert "raised in __del__" in by_event["exception ignored"]["exception"]
    crash = by_event["uncaught exception"]
    assert crash["level"] == "critical" and "RuntimeError: nobody caught this" in crash["exception"]
    assert all("timestamp" in e and "level" in e for e in events)


def test_console_format_renders_the_same_records() -> None:
    result = provoke("console")
    assert result.returncode == 1
    for text in ("structlog event", "Error in ASGI Framework", "a warning, routed through logging"):
        assert text in result.stderr
    assert "RuntimeError: nobody caught this" in result.stderr and "uncaught exception" in result.stderr


def test_the_real_daemon_writes_only_json_lines(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path).start()
    try:
        # A row the daemon cannot read (written by hand, say): the admin API answers 500 and logs the
        # traceback through quart's stdlib logger.
        with contextlib.closing(sqlite3.connect(tmp_path / "data" / "db.sqlite3", timeout=60)) as conn:
            conn.execute(
                "INSERT INTO runs (mode, collections, created_at) VALUES ('explicit', '{not json', 0)"
            )
            conn.commit()
            run_id = conn.execute("SELECT max(id) FROM runs").fetchone()[0]
        crashed = daemon.call("GET", f"/_admin/runs/{run_id}")
        assert crashed.status_code == 500
        assert crashed.json() == {"error": "InternalServerError", "message": "internal server error"}
        assert daemon.call("GET", "/_admin/runs").status_code == 500
        # Garbage and a half-sent request on the admin port: hypercorn's side of things.
        for garbage in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" * 20, b"GET /healthz HTTP/1.1\r\nHo"):
            with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
                sock.sendall(garbage)
                sock.shutdown(socket.SHUT_WR)
                with contextlib.suppress(OSError):
                    sock.recv(4096)
        assert daemon.call("GET", "/healthz", token=None).status_code == 200
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
    finally:
        daemon.stop()
    events = json_lines(daemon.logs())
    crash = next(e for e in events if e["event"].startswith("admin request crashed: GET /_admin/runs/"))
    assert crash["logger"] == "backfilld.admin" and crash["level"] == "error"
    assert crash["exception"].startswith("Traceback (most recent call last):")
    assert "JSONDecodeError" in crash["exception"]
    assert [e["event"] for e in events].count("backfilld stopped") == 1
