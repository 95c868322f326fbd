"""``python -m bench.cluster``: records/s with 1, 2 and 3 daemons on one PostgreSQL database (SPEC 10).

The scale-out case: per-host politeness is what limits a cold start (``per_host_rate = 20`` requests/s per
PDS host per daemon, 4 hosts), and each daemon has its own egress address (``network.local_address``
127.0.0.2, .3, .4), so every daemon gets its own budget at every PDS, as separate machines would. The
simulated network runs in its own process; a throwaway PostgreSQL server (``tests/pgserver.py``, run
unprivileged when root) holds a fresh database for each pass. Each pass starts N daemons, posts one
explicit run of every account to the first, and times it until the run is ``finished`` (any daemon's API
shows the whole cluster's run). Results are printed and saved under ``bench/results/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.measure import machine
from bench.procs import ROOT, TOKEN, DaemonProcess, SimnetProcess
from tests.pgserver import PgServer, find_pg_bin

COLLECTION = "com.emdashcms.experimental.package.release"
ADDRESSES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
RESULTS = ROOT / "bench" / "results"


def daemon_sections(
    database: str, urls: dict[str, Any], address: str, rate: float, mode: str, accounts: int
) -> dict[str, Any]:
    """One cluster member's config: the shared database, its own address, the politeness under test."""
    return {
        "daemon": {"database": database, "workers": 16, "log_level": "info", "log_format": "json"},
        "limits": {"max_backfill_dids": accounts},
        "atproto": {
            "collections": [COLLECTION],
            "relay": urls["relay_url"],
            "plc_directory": urls["plc_url"],
        },
        "network": {
            "allow_private_addresses": True,
            "per_host_rate": rate,
            "per_host_concurrency": 4,
            "local_address": address,
        },
        "sync": {"mode": mode},
    }


def one_pass(
    workdir: Path, server: PgServer, net: SimnetProcess, dids: list[str], daemons: int, rate: float, mode: str
) -> dict[str, Any]:
    """N daemons on a fresh database: seconds, records and records/s of one explicit run of ``dids``."""
    database = server.create_database()
    members = [
        DaemonProcess(
            workdir / f"n{daemons}-{i}",
            daemon_sections(database, net.urls, ADDRESSES[i], rate, mode, len(dids)),
        )
        for i in range(daemons)
    ]
    try:
        for member in members:
            member.start()
        headers = {"Authorization": f"Bearer {TOKEN}"}
        started = time.monotonic()
        answer = httpx.post(
            members[0].base + "/_admin/backfill", json={"dids": dids}, headers=headers, timeout=30
        )
        if answer.status_code != 202:
            raise RuntimeError(f"the backfill was refused: {answer.status_code} {answer.text}")
        run_id = answer.json()["run_id"]
        while True:
            run = httpx.get(f"{members[-1].base}/_admin/runs/{run_id}", headers=headers, timeout=30).json()
            if run["state"] in ("finished", "cancelled"):
                break
            time.sleep(0.1)
        seconds = time.monotonic() - started
    finally:
        for member in members:
            member.stop()
    records = int(run["records_enqueued"])
    return {
        "daemons": daemons,
        "seconds": round(seconds, 2),
        "records": records,
        "records_per_second": round(records / seconds, 1),
        "jobs": run["jobs"],
    }


def main(argv: list[str] | None = None) -> int:
    """Run the passes and print the table."""
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__)
    parser.add_argument("--accounts", type=int, default=240)
    parser.add_argument("--records", type=int, default=300)
    parser.add_argument("--rate", type=float, default=20.0, help="network.per_host_rate of each daemon")
    parser.add_argument("--mode", choices=("list", "verified"), default="list")
    parser.add_argument("--max-daemons", type=int, default=3, choices=(1, 2, 3))
    args = parser.parse_args(argv)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="backfilld-cluster-") as temporary:
        workdir = Path(temporary)
        bin_dir = find_pg_bin()
        if bin_dir is None:
            print("no PostgreSQL binaries found (initdb, pg_ctl)", file=sys.stderr)
            return 1
        with (
            PgServer(bin_dir) as server,
            SimnetProcess(
                workdir / "simnet",
                accounts=args.accounts,
                records=args.records,
                hosts=4,
                collections=[COLLECTION],
            ) as net,
        ):
            spec = net.control("/spec")
            dids = [account["did"] for account in spec["accounts"]]
            for daemons in range(1, args.max_daemons + 1):
                result = one_pass(workdir, server, net, dids, daemons, args.rate, args.mode)
                results.append(result)
                print(
                    f"{daemons} daemon(s): {result['records']:,} records in {result['seconds']} s "
                    f"({result['records_per_second']:,.0f} records/s)",
                    flush=True,
                )
    base = results[0]["records_per_second"]
    print(
        f"\nscale-out, {args.accounts} accounts x {args.records} records, 4 hosts, per_host_rate = "
        f"{args.rate:g} per daemon, {args.mode} mode ({machine()['cpu_model']}, {machine()['nproc']} cores, "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d})"
    )
    print("| daemons | seconds | records/s | vs 1 daemon |\n|---|---|---|---|")
    for result in results:
        print(
            f"| {result['daemons']} | {result['seconds']} | {result['records_per_second']:,.0f} | "
            f"{result['records_per_second'] / base:.2f}x |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"cluster-{datetime.datetime.now(datetime.UTC):%Y-%m-%dT%H%M%SZ}.json"
    out.write_text(json.dumps({"args": vars(args), "machine": machine(), "results": results}, indent=2))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
