"""A real Daemon (engine, fetcher, admin server) inside the test's trio run, against the simulated network.

Real sockets on loopback, so these tests use small real timeouts (never MockClock, whose autojump would
fire while a socket is merely waiting) and assert outcomes, never durations.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from daemon.config import parse_config
from daemon.process.daemon import Daemon
from daemon.simnet import RunningNetwork
from daemon.store.models import Job, Run

COLL = "com.example.record"
FAST: dict[str, dict[str, Any]] = {
    "daemon": {"workers": 8, "shutdown_grace": 2.0, "log_level": "warning", "log_format": "json"},
    "limits": {"page_timeout": 1.0, "discovery_timeout": 1.0},
    "retry": {"max_attempts": 3, "backoff_base": 0.005, "backoff_cap": 0.02},
    "network": {"allow_private_addresses": True, "per_host_rate": 0.0, "per_host_concurrency": 4},
}


def daemon_config(
    tmp_path: Path, network: RunningNetwork, overrides: dict[str, dict[str, Any]] | None = None
) -> Any:
    sections: dict[str, dict[str, Any]] = {
        "daemon": {"database": str(tmp_path / "db.sqlite3")},
        "admin": {"listen": "127.0.0.1:0", "token_file": ""},
        "atproto": {
            "relay": network.relay_url,
            "plc_directory": network.plc_url,
            "collections": list(network.spec.collections),
        },
    }
    for source in (FAST, overrides or {}):
        for section, values in source.items():
            sections.setdefault(section, {}).update(values)
    return parse_config(sections, path=tmp_path / "config.toml")


@asynccontextmanager
async def running_daemon(
    tmp_path: Path,
    network: RunningNetwork,
    overrides: dict[str, dict[str, Any]] | None = None,
    *,
    wall_clock: Callable[[], float] = time.time,
) -> AsyncIterator[Daemon]:
    daemon = Daemon(daemon_config(tmp_path, network, overrides), rng=random.Random(3), wall_clock=wall_clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        yield daemon
        daemon.stop()


async def start_run(
    daemon: Daemon,
    *,
    dids: Sequence[str] = (),
    collections: Sequence[str] | None = None,
    full: bool = False,
) -> int:
    """Start a run as ``POST /_admin/backfill`` does (explicit with ``dids``, else discover)."""
    wanted = daemon.config.atproto.collections if collections is None else collections
    run_id, _ = await daemon.db.run(
        daemon.db.store.create_run,
        mode="explicit" if dids else "discover",
        # in the configured order, as the admin API passes them (SPEC 6.4)
        collections=[c for c in daemon.config.atproto.collections if c in wanted],
        dids=list(dids),
        now=daemon.wall_clock(),
        full=full,
        ordered=daemon.config.sync.ordered_collections,
    )
    daemon.engine.notify()
    return run_id


async def finish(daemon: Daemon, run_id: int, timeout: float = 60.0) -> Run:
    with trio.fail_after(timeout):
        while True:
            run = await daemon.db.run(daemon.db.store.get_run, run_id)
            assert run is not None
            if run.state in ("finished", "cancelled"):
                return run
            await trio.sleep(0.02)


async def jobs_of(daemon: Daemon, run_id: int) -> list[Job]:
    return await daemon.db.run(daemon.db.store.list_jobs, run_id=run_id, limit=100_000)


async def queued_records(daemon: Daemon) -> list[dict[str, Any]]:
    """Every records job on the queue, in id order, in its public form (SPEC 5 ``GET /_admin/records``)."""
    records: list[dict[str, Any]] = []
    after = 0
    while True:
        text, last = await daemon.db.run(daemon.db.store.list_records_json, after=after, limit=10_000)
        if last is None:
            return records
        records += json.loads(text)
        after = last


async def queued(daemon: Daemon) -> list[tuple[str, str, str, str]]:
    """``(did, collection, rkey, cid)`` of every records job on the queue, in id order."""
    return [(r["did"], r["collection"], r["rkey"], r["cid"]) for r in await queued_records(daemon)]


def outcome(jobs: Sequence[Job]) -> dict[tuple[str | None, str], tuple[str, str | None]]:
    return {(j.did, j.collection): (j.state, j.error_code) for j in jobs if j.kind == "backfill"}
