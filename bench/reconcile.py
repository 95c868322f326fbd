"""``python -m bench.reconcile``: what keeping the delivered sets costs, and what a re-backfill writes.

The real daemon (SQLite, list mode, 16 workers) against the simulated network in its own process: one
backfill of every account, then the same backfill again with nothing changed on the network. Reported:
the entries each run wrote to the records queue (the second must write none), each run's pages per second,
and the delivered set's size on disk per record (SQLite's ``dbstat``: the ``delivered`` table and the
``pairs`` table, pages in use). Results are printed and saved under ``bench/results/``.
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
                    "network": {"allow_private_addresses": True, "per_host_concurrency": 4},
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
    }
    print(
        f"{args.accounts:,} accounts x {args.records} records: first backfill {first['seconds']} s, "
        f"wrote {first['operations']}; unchanged re-backfill {second['seconds']} s, wrote "
        f"{second['operations']}\ndelivered sets: {records:,} rows, {result['bytes_per_record']} bytes per "
        f"record on disk (delivered {sizes['delivered']:,} B, pairs {sizes['pairs']:,} B); "
        f"{result['ms_per_page_first']} ms per page on the first run, {result['ms_per_page_unchanged']} ms "
        "on the unchanged one (wall time over pages, 16 workers)"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"reconcile-{datetime.datetime.now(datetime.UTC):%Y-%m-%dT%H%M%SZ}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
