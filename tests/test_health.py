"""``/healthz`` (200 only while the database answers and the workers run, SPEC 5), the admin routes' answer
to a failing database (503, never 500, SPEC 7), and the watchdog's STATUS line; in-process, real sockets.

The real process under an operator's write lock is in ``test_health_db.py``.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from daemon.errors import StoreError
from daemon.process.daemon import Daemon
from daemon.simnet import build_spec, open_network
from tests.inprocess import COLL, running_daemon

TOKEN = "health-test-token"
# Generous: an answer must come, but how fast is never asserted (the suite runs on busy machines).
ANSWER_TIMEOUT = 30.0


async def test_healthz_reports_database_and_workers(tmp_path: Path) -> None:
    async with open_network(build_spec(1, 1, collections=[COLL])) as network:
        async with running_daemon(tmp_path, network) as daemon:
            async with httpx.AsyncClient(base_url=daemon.listening[0]) as client:
                assert (await client.get("/healthz")).status_code == 200

                def broken() -> bool:
                    raise sqlite3.OperationalError("disk I/O error")

                working = daemon.db.store.ping
                daemon.db.store.ping = broken  # type: ignore[method-assign]
                response = await client.get("/healthz")
                assert response.status_code == 503 and response.json() == {"ok": False}
                assert daemon.db.failing is not None
                daemon.db.store.ping = working  # type: ignore[method-assign]
                # The failure is remembered until a call succeeds: the ping of this request is that call.
                assert (await client.get("/healthz")).status_code in (200, 503)
                assert (await client.get("/healthz")).status_code == 200
                assert daemon.db.failing is None

                daemon.engine.stop()  # the workers wind down: no longer healthy
                assert (await client.get("/healthz")).status_code == 503


class Blocker:
    """A call that holds the database's thread until released (a hung disk, a lock past its timeout)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self) -> None:
        self.entered.set()
        self.release.wait(120)

    async def wait_entered(self) -> None:
        with trio.fail_after(ANSWER_TIMEOUT):
            while not self.entered.is_set():
                await trio.sleep(0.01)


async def test_healthz_answers_503_while_the_database_hangs_then_200(tmp_path: Path) -> None:
    async with open_network(build_spec(1, 1, collections=[COLL])) as network:
        async with running_daemon(tmp_path, network) as daemon:
            first, second = Blocker(), Blocker()
            async with (
                httpx.AsyncClient(base_url=daemon.listening[0], timeout=ANSWER_TIMEOUT) as client,
                trio.open_nursery() as nursery,
            ):
                assert (await client.get("/healthz")).status_code == 200
                nursery.start_soon(daemon.db.run, first)
                await first.wait_entered()
                nursery.start_soon(daemon.db.run, second)
                await trio.sleep(0.1)  # let `second` queue before the ping
                # The ping waits behind the hung call: /healthz gives up on it and answers.
                response = await client.get("/healthz")
                assert response.status_code == 503 and response.json() == {"ok": False}
                # `second` and the ping now run as one group: the ping is taken by the thread, no longer
                # cancellable, and hangs with `second`. /healthz still answers.
                first.release.set()
                await second.wait_entered()
                for _ in range(3):
                    assert (await client.get("/healthz")).status_code == 503
                second.release.set()
                with trio.fail_after(ANSWER_TIMEOUT):
                    while (await client.get("/healthz")).status_code != 200:
                        await trio.sleep(0.05)


def admin_overrides(tmp_path: Path) -> dict[str, dict[str, Any]]:
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    return {"admin": {"token_file": str(token_file)}}


ROUTES: list[tuple[str, str, str, dict[str, Any]]] = [
    ("job_counts", "GET", "/_admin/status", {}),
    ("list_jobs", "GET", "/_admin/jobs", {}),
    ("retry_jobs", "POST", "/_admin/jobs/retry", {"json": {"state": "failed"}}),
    ("create_run", "POST", "/_admin/backfill", {"json": {"dids": ["did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"]}}),
    ("list_runs", "GET", "/_admin/runs", {}),
    ("get_run", "GET", "/_admin/runs/1", {}),
    ("cancel_run", "POST", "/_admin/runs/1/cancel", {}),
    ("list_records_json", "GET", "/_admin/records", {}),
    ("ack_records", "POST", "/_admin/records/ack", {"json": {"through": 1}}),
    ("list_publishers", "GET", "/_admin/publishers", {}),
    ("queue_depth", "GET", "/metrics", {}),
]


@pytest.mark.parametrize(("method_name", "verb", "path", "kwargs"), ROUTES, ids=[r[2] for r in ROUTES])
async def test_every_route_answers_a_store_error_with_503(
    tmp_path: Path, method_name: str, verb: str, path: str, kwargs: dict[str, Any]
) -> None:
    async with open_network(build_spec(1, 1, collections=[COLL])) as network:
        async with running_daemon(tmp_path, network, admin_overrides(tmp_path)) as daemon:
            store = daemon.db.store
            assert hasattr(store, method_name)

            def locked(*args: object, **kwargs: object) -> None:
                raise sqlite3.OperationalError("database is locked")

            setattr(store, method_name, locked)
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with httpx.AsyncClient(base_url=daemon.listening[0], headers=headers) as client:
                response = await client.request(verb, path, **kwargs)
                assert response.status_code == 503, response.text
                body = response.json()
                assert body["error"] == "DatabaseUnavailable"
                assert "database is locked" in body["message"]
                delattr(store, method_name)  # the database is back
                again = await client.request(verb, path, **kwargs)
                assert again.status_code < 500, again.text
                assert (await client.get("/healthz")).status_code in (200, 503)
                assert (await client.get("/healthz")).status_code == 200


async def test_a_failing_watchdog_query_does_not_stop_the_daemon(tmp_path: Path) -> None:
    async with open_network(build_spec(1, 1, collections=[COLL])) as network:
        async with running_daemon(tmp_path, network) as daemon:
            store = daemon.db.store
            calls = 0

            def full() -> int:
                nonlocal calls
                calls += 1
                raise sqlite3.OperationalError("database or disk is full")

            store.queue_depth = full  # type: ignore[method-assign]
            sent: list[dict[str, str]] = []
            daemon.notifier.notify = lambda **fields: sent.append(fields) or True  # type: ignore[method-assign]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(daemon._watchdog, 0.01)
                with trio.fail_after(ANSWER_TIMEOUT):
                    while calls < 3 or not any("database failing" in m["STATUS"] for m in sent):
                        await trio.sleep(0.01)
                del store.queue_depth  # the database is back
                with trio.fail_after(ANSWER_TIMEOUT):
                    while "records queued" not in sent[-1]["STATUS"]:
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
            assert all(m["WATCHDOG"] == "1" for m in sent)
            assert "disk is full" in next(m["STATUS"] for m in sent if "database failing" in m["STATUS"])


async def test_status_line_says_when_the_database_does_not_answer(tmp_path: Path) -> None:
    async with open_network(build_spec(1, 1, collections=[COLL])) as network:
        async with running_daemon(tmp_path, network) as daemon:
            blocker = Blocker()
            sent: list[dict[str, str]] = []
            daemon.notifier.notify = lambda **fields: sent.append(fields) or True  # type: ignore[method-assign]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(daemon.db.run, blocker)
                await blocker.wait_entered()
                nursery.start_soon(daemon._watchdog, 0.01)
                with trio.fail_after(ANSWER_TIMEOUT):
                    while not any("not answering" in m["STATUS"] for m in sent):
                        await trio.sleep(0.01)
                blocker.release.set()
                with trio.fail_after(ANSWER_TIMEOUT):
                    while "records queued" not in sent[-1]["STATUS"]:
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()


def _status_for(daemon: Daemon, failing: StoreError | None) -> str:
    daemon.db.failing = failing
    return daemon.status_line()


async def test_status_line_names_the_database_failure(tmp_path: Path) -> None:
    async with open_network(build_spec(1, 1, collections=[COLL])) as network:
        async with running_daemon(tmp_path, network) as daemon:
            error = StoreError("database error (SQLITE_BUSY): database is locked", code="database_busy")
            line = _status_for(daemon, error)
            assert line.startswith("database failing (database_busy)") and "database is locked" in line
            assert "workers busy" in _status_for(daemon, None)
