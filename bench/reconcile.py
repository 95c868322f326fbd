"""``python -m bench.reconcile``: what keeping the delivered sets costs, and what a re-backfill writes.

The real daemon (SQLite, list mode, 16 workers) against the simulated network in its own process: one
backfill of every account, then the same backfill again with nothing changed on the network. Reported:
the entries each run wrote to the records queue (the second must write none), each run's wall time per
page, and the delivered set's size on disk per record (SQLite's ``dbstat``: the ``delivered`` table and
the ``pairs`` table, pages in use). Then the store alone (no network, no other thread): the time
``apply_page`` takes per 100-record page on a first listing and on an unchanged one. Results are printed and saved under ``bench/results/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.measure import machine
from bench.procs import ROOT, TOKEN, DaemonProcess, SimnetProcess
from daemon.store.models import ListedRecord
from daemon.store.sqlite import SqliteStore

COLLECTION = "com.emdashcms.experimental.package.release"
RESULTS = ROOT / "bench" / "results"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


def backfill(daemon: DaemonProcess, dids: list[str]) -> dict[str, Any]:
    """One explicit run of ``dids``, timed until it is finished: the run, with ``seconds`` added."""
    started = time.monotonic()
    answer = httpx.post(daemon.base + "/_admin/backfill", json={"dids": dids}, headers=HEADERS, timeout=30)
    if answer.status_code != 202:
        raise RuntimeError(f"the backfill was refused: {answer.status_code} {answer.text}")
    run_id = answer.json()["run_id"]
    while True:
        run: dict[str, Any] = httpx.get(
            f"{daemon.base}/_admin/runs/{run_id}", headers=HEADERS, timeout=30
        ).json()
        if run["state"] in ("finished", "cancelled"):
            run["seconds"] = round(time.monotonic() - started, 2)
            return run
        time.sleep(0.05)


def table_bytes(database: Path, *tables: str) -> dict[str, int]:
    """Bytes of the pages each table (and its indexes) uses in the SQLite file (``dbstat``)."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as conn:
        sizes: dict[str, int] = {}
        for table in tables:
            names = [table] + [
                row[0]
                for row in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?", (table,)
                )
            ]
            marks = ",".join("?" * len(names))
            (used,) = conn.execute(
                f"SELECT coalesce(sum(pgsize - unused), 0) FROM dbstat WHERE name IN ({marks})", names
            ).fetchone()
            sizes[table] = int(used)
        (rows,) = conn.execute("SELECT count(*) FROM delivered").fetchone()
        sizes["delivered_rows"] = int(rows)
    return sizes


def store_page_cost(workdir: Path, pairs: int = 300, pages: int = 4) -> dict[str, float]:
    """Milliseconds of ``apply_page`` per 100-record page: a first listing, then an unchanged one."""
    store = SqliteStore.open(workdir / "store.sqlite3")
    value = json.dumps({"$type": COLLECTION, "text": "x" * 200, "createdAt": "2026-01-01T00:00:00.000Z"})
    listing = [
        [ListedRecord(f"3k{page:02d}{i:09d}", "bafyreib" + "a" * 51, value) for i in range(100)]
        for page in range(pages)
    ]
    dids = [f"did:plc:{i:024d}" for i in range(pairs)]
    costs: dict[str, float] = {}
    try:
        for name in ("first", "unchanged"):
            store.create_run(mode="explicit", collections=[COLLECTION], dids=dids, now=time.time())
            jobs = store.claim_jobs(now=time.time(), limit=pairs, owner="bench", max_records_queue=1 << 40)
            started = time.perf_counter()
            for job in jobs:
                assert job.did is not None
                for page, records in enumerate(listing):
                    last = page == pages - 1
                    store.apply_page(
                        job.lease,
                        did=job.did,
                        collection=COLLECTION,
                        records=records,
                        cursor=None if last else f"c{page}",
                        skipped=0,
                        complete=last,
                        now=time.time(),
                    )
            costs[name] = round(1000 * (time.perf_counter() - started) / (pairs * pages), 3)
    finally:
        store.close()
    return costs


def main(argv: list[str] | None = None) -> int:
    """Run both backfills and print the figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.reconcile", description=__doc__)
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--records", type=int, default=200)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="backfilld-reconcile-") as temporary:
        workdir = Path(temporary)
        with SimnetProcess(
            workdir / "simnet",
            accounts=args.accounts,
            records=args.records,
            hosts=4,
            collections=[COLLECTION],
        ) as net:
            dids = [account["did"] for account in net.control("/spec")["accounts"]]
            daemon = DaemonProcess(
                workdir / "daemon",
                {
                    "daemon": {"workers": 16, "log_level": "info", "log_format": "json"},
                    "limits": {"max_backfill_dids": args.accounts},
                    "atproto": {
                        "collections": [COLLECTION],
                        "relay": net.urls["relay_url"],
                        "plc_directory": net.urls["plc_url"],
                    },
                    # politeness off, as in bench.run: the run's time is then the daemon's own
                    "network": {
                        "allow_private_addresses": True,
                        "per_host_rate": 0.0,
                        "per_host_concurrency": 16,
                    },
                    "sync": {"mode": "list"},
                },
            )
            daemon.start()
            try:
                first = backfill(daemon, dids)
                second = backfill(daemon, dids)
            finally:
                daemon.stop()
            sizes = table_bytes(daemon.workdir / "data" / "backfilld.sqlite3", "delivered", "pairs")
        store_costs = store_page_cost(workdir)
    records = sizes["delivered_rows"]
    pages = args.accounts * -(-args.records // 100)
    result = {
        "args": vars(args),
        "machine": machine(),
        "date": f"{datetime.datetime.now(datetime.UTC):%Y-%m-%dT%H:%M:%SZ}",
        "first": {"seconds": first["seconds"], "operations": first["operations"]},
        "unchanged": {"seconds": second["seconds"], "operations": second["operations"]},
        "delivered_rows": records,
        "delivered_bytes": sizes["delivered"],
        "pairs_bytes": sizes["pairs"],
        "bytes_per_record": round((sizes["delivered"] + sizes["pairs"]) / max(records, 1), 1),
        "ms_per_page_first": round(1000 * first["seconds"] / pages, 3),
        "ms_per_page_unchanged": round(1000 * second["seconds"] / pages, 3),
        "store_ms_per_page": store_costs,
    }
    print(
        f"{args.accounts:,} accounts x {args.records} records: first backfill {first['seconds']} s, "
        f"wrote {first['operations']}; unchanged re-backfill {second['seconds']} s, wrote "
        f"{second['operations']}\ndelivered sets: {records:,} rows, {result['bytes_per_record']} bytes per "
        f"record on disk (delivered {sizes['delivered']:,} B, pairs {sizes['pairs']:,} B); "
        f"{result['ms_per_page_first']} ms per page on the first run, {result['ms_per_page_unchanged']} ms "
        "on the unchanged one (wall time over pages, 16 workers)\n"
        f"the store alone: apply_page {store_costs['first']} ms per 100-record page on a first listing, "
        f"{store_costs['unchanged']} ms on an unchanged one (each its own transaction, fsync included)"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"reconcile-{datetime.datetime.now(datetime.UTC):%Y-%m-%dT%H%M%SZ}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
