"""Reconcile through the real daemon process: kill -9 in the middle of a re-backfill, then restart.

The simulated network runs in its own process (mutated through its control endpoint). A consumer reads
the queue over the admin API as an indexer would; after the restart the run finishes, no change was
written twice, nothing was lost, and the consumer's records equal the network's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.daemonproc import DaemonProcess
from tests.simnetproc import expected, mutate, simnet_process

COLLS = ["com.example.a", "com.example.b"]


def apply(state: dict[tuple[str, str, str], str], entries: list[dict[str, Any]]) -> None:
    for entry in entries:
        key = (entry["did"], entry["collection"], entry["rkey"])
        if entry["operation"] == "delete":
            del state[key]
        else:
            state[key] = entry["cid"]


@pytest.mark.parametrize("mode", ["verified", "list"])
def test_kill_9_in_the_middle_of_a_reconcile_then_restart(tmp_path: Path, mode: str) -> None:
    with simnet_process(tmp_path, accounts=16, records=300, hosts=2, collections=COLLS, latency=0.02) as (
        net,
        spec,
    ):
        daemon = DaemonProcess(
            tmp_path / "daemon",
            {
                "daemon": {"workers": 4},
                "atproto": {"relay": net["relay_url"], "plc_directory": net["plc_url"], "collections": COLLS},
                "limits": {"page_timeout": 30.0},
                "network": {"per_host_rate": 0.0},
                "sync": {"mode": mode},
            },
        ).start()
        dids = [a.did for a in spec.accounts]
        state: dict[tuple[str, str, str], str] = {}
        try:
            first = daemon.call("POST", "/_admin/backfill", json={"dids": dids}).json()["run_id"]
            daemon.wait_run_finished(first, timeout=120)
            apply(state, daemon.all_records())
            # the accounts change: updates, deletes and creates in both collections
            for index, did in enumerate(dids):
                mutate(net, did, COLLS[index % 2], update=[0, 1, 2], delete=[10, 11], create=3)
            second = daemon.call("POST", "/_admin/backfill", json={"dids": dids}).json()["run_id"]
            deadline = time.monotonic() + 60
            while daemon.call("GET", f"/_admin/runs/{second}").json()["jobs"]["done"] < 8:
                assert time.monotonic() < deadline, "the re-backfill made no progress"
                time.sleep(0.01)
            daemon.kill()
            daemon.start()
            run = daemon.wait_run_finished(second, timeout=120)
            written = [e for e in daemon.all_records() if e["run_id"] == second]
        finally:
            daemon.stop()
        network = {(did, coll, rkey): cid for did, coll, rkey, cid in expected(net, mode=mode)["records"]}
    assert run["state"] == "finished" and run["jobs"]["done"] == 32
    keys = [(e["did"], e["collection"], e["rkey"]) for e in written]
    assert len(keys) == len(set(keys))  # no change written twice across the kill
    assert run["operations"] == {"create": 16 * 3, "update": 16 * 3, "delete": 16 * 2}
    apply(state, written)
    assert state == network
