"""The simulated network's own ceiling: a bare trio + httpx client fetching the same pages as the daemon.

``python -m bench.bare --urls simnet.json --workers 16 --collection NSID ...`` does what a discovery run
does on the wire and nothing else: page the relay's ``listReposByCollection`` (one task, DIDs handed out as
pages arrive), and with ``--workers`` tasks fetch each DID's PLC document, take its PDS endpoint and page
``listRecords`` to the end. Bodies are parsed with ``json.loads`` (the cursor is needed); nothing is
validated or stored. One ``httpx.AsyncClient`` per origin, each pool as large as the worker count, so the
client is never throttled by its own pools. It prints one JSON object: wall seconds, requests, records and
the CPU seconds this process spent fetching.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import trio

LIST_REPOS = "/xrpc/com.atproto.sync.listReposByCollection"
LIST_RECORDS = "/xrpc/com.atproto.repo.listRecords"


class Counts:
    def __init__(self) -> None:
        self.relay = 0
        self.plc = 0
        self.pages = 0
        self.records = 0


class Clients:
    """One client per origin (the same shape as the daemon's fetcher)."""

    def __init__(self, pool: int) -> None:
        self._pool = pool
        self._clients: dict[str, httpx.AsyncClient] = {}

    def get(self, origin: str) -> httpx.AsyncClient:
        client = self._clients.get(origin)
        if client is None:
            limits = httpx.Limits(max_connections=self._pool, max_keepalive_connections=self._pool)
            client = self._clients[origin] = httpx.AsyncClient(base_url=origin, limits=limits, timeout=60.0)
        return client

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()


def pds_endpoint(did: str, document: dict[str, Any]) -> str:
    """The PDS URL of a DID document (the minimum the daemon also has to find)."""
    for service in document.get("service", []):
        if service.get("id") in ("#atproto_pds", f"{did}#atproto_pds"):
            return str(service["serviceEndpoint"]).rstrip("/")
    raise ValueError(f"no PDS in the document of {did}")


async def discover(
    clients: Clients,
    relay: str,
    collection: str,
    page_size: int,
    send: trio.MemorySendChannel[str],
    counts: Counts,
) -> None:
    async with send:
        cursor: str | None = None
        while True:
            params: dict[str, str | int] = {"collection": collection, "limit": page_size}
            if cursor:
                params["cursor"] = cursor
            response = await clients.get(relay).get(LIST_REPOS, params=params)
            response.raise_for_status()
            counts.relay += 1
            body = json.loads(response.content)
            for repo in body["repos"]:
                await send.send(repo["did"])
            cursor = body.get("cursor")
            if not cursor:
                return


async def backfill(
    clients: Clients,
    plc: str,
    collection: str,
    page_size: int,
    receive: trio.MemoryReceiveChannel[str],
    counts: Counts,
) -> None:
    async with receive:
        async for did in receive:
            response = await clients.get(plc).get(f"/{did}")
            response.raise_for_status()
            counts.plc += 1
            pds = pds_endpoint(did, json.loads(response.content))
            cursor: str | None = None
            while True:
                params: dict[str, str | int] = {"repo": did, "collection": collection, "limit": page_size}
                if cursor:
                    params["cursor"] = cursor
                response = await clients.get(pds).get(LIST_RECORDS, params=params)
                response.raise_for_status()
                page = json.loads(response.content)
                counts.pages += 1
                counts.records += len(page["records"])
                cursor = page.get("cursor")
                if not cursor:
                    break


async def fetch_all(
    urls: dict[str, Any], collection: str, workers: int, page_size: int, discovery_page_size: int
) -> dict[str, Any]:
    """Run the whole fetch and return what it did and how long it took."""
    counts = Counts()
    clients = Clients(workers)
    started_cpu = os.times()
    started = time.perf_counter()
    try:
        async with trio.open_nursery() as nursery:
            send, receive = trio.open_memory_channel[str](workers)
            nursery.start_soon(
                discover, clients, urls["relay_url"], collection, discovery_page_size, send, counts
            )
            for _ in range(workers):
                nursery.start_soon(
                    backfill, clients, urls["plc_url"], collection, page_size, receive.clone(), counts
                )
            receive.close()
        seconds = time.perf_counter() - started
        ended_cpu = os.times()
    finally:
        await clients.aclose()
    return {
        "seconds": seconds,
        "cpu_seconds": (ended_cpu.user - started_cpu.user) + (ended_cpu.system - started_cpu.system),
        "relay_requests": counts.relay,
        "plc_requests": counts.plc,
        "pages": counts.pages,
        "records": counts.records,
        "peak_rss_bytes": _peak_rss(),
    }


def _peak_rss() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bare", description=__doc__.splitlines()[0])
    parser.add_argument("--urls", type=Path, required=True, help="the simnet port file")
    parser.add_argument("--collection", required=True)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--page-size", type=int, default=100)
    parser.add_argument("--discovery-page-size", type=int, default=1000)
    args = parser.parse_args(argv)
    urls = json.loads(args.urls.read_text())
    result = trio.run(
        fetch_all, urls, args.collection, args.workers, args.page_size, args.discovery_page_size
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
