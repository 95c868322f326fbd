"""``/healthz``: 200 only while the database answers and the workers run (SPEC 5)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx

from daemon.simnet import build_spec, open_network
from tests.inprocess import COLL, running_daemon


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
                daemon.db.store.ping = working  # type: ignore[method-assign]
                assert (await client.get("/healthz")).status_code == 200

                daemon.engine.stop()  # the workers wind down: no longer healthy
                assert (await client.get("/healthz")).status_code == 503
