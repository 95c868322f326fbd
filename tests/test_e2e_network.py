"""The real daemon process against the simulated network in another process: whole runs, kill -9."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx

from daemon.simnet import DaemonLimits, expected_failed, expected_records, possible_records
from tests.daemonproc import DaemonProcess
from tests.simnetproc import simnet_process

COLLS = ["com.example.record", "com.example.other"]

# Every hostile account behaviour that ends on its own within seconds. The 429 modes that never recover
# pause their whole host 20 times over; the engine and fetcher tests cover them with a mock clock.
HOSTILE = {
    "plc_404": 1,
    "plc_410": 1,
    "plc_hang": 1,
    "doc_no_pds": 1,
    "doc_wrong_id": 1,
    "doc_bad_json": 1,
    "doc_pds_url": 1,
    "pds_404_first": 1,
    "pds_404_mid": 1,
    "pds_500": 1,
    "pds_500_once": 1,
    "pds_fail_after_page": 1,
    "pds_hang": 1,
    "pds_trickle": 1,
    "pds_disconnect": 1,
    "pds_huge": 1,
    "pds_429_once": 1,
    "pds_too_many_records": 1,
    "pds_repeat_cursor": 1,
    "pds_body_not_object": 1,
    "pds_invalid_json": 1,
    "pds_missing_records": 1,
    "pds_record_not_object": 1,
    "pds_cursor_not_string": 1,
    "pds_bad_records": 2,
    "pds_takendown": 1,
    "pds_deactivated": 1,
    "pds_suspended": 1,
    "pds_repo_not_found": 1,
    "pds_could_not_find": 1,
    "pds_redirect": 1,
    "pds_endless": 1,
}


def test_discovery_run_with_every_hostile_behaviour(tmp_path: Path) -> None:
    with simnet_process(
        tmp_path, accounts=40, records=130, hosts=3, collections=COLLS, hostile=HOSTILE, web_accounts=2
    ) as (net, spec):
        daemon = DaemonProcess(
            tmp_path / "daemon",
            {
                "daemon": {"workers": 8},
                "atproto": {"relay": net["relay_url"], "plc_directory": net["plc_url"], "collections": COLLS},
                "limits": {
                    "page_timeout": 1.0,
                    "discovery_timeout": 2.0,
                    "discovery_page_size": 10,
                    "max_pages_per_collection": 20,
                    "max_response_bytes": 1_048_576,
                },
                "retry": {"max_attempts": 3, "backoff_base": 0.02, "backoff_cap": 0.2},
                "network": {"per_host_rate": 0.0, "rate_limit_pause": 1.0},
            },
        ).start()
        try:
            accepted = daemon.call("POST", "/_admin/backfill", json={})
            assert accepted.status_code == 202
            run = daemon.wait_run_finished(accepted.json()["run_id"], timeout=120)
            jobs = daemon.all_jobs(run_id=run["run_id"])
            records = daemon.all_records()
        finally:
            daemon.stop()
    limits = DaemonLimits(max_attempts=3, max_pages_per_collection=20, max_response_bytes=1_048_576)
    n_accounts = len(spec.accounts)
    assert run["state"] == "finished" and run["dids"] == n_accounts
    assert all(d["error"] is None for d in run["discovery"].values())
    backfill = {(j["did"], j["collection"]): j for j in jobs if j["kind"] == "backfill"}
    assert len(backfill) == n_accounts * len(COLLS)
    failed = {pair: j["error_code"] for pair, j in backfill.items() if j["state"] == "failed"}
    assert failed == expected_failed(spec, limits=limits)
    assert all(j["state"] == "done" for pair, j in backfill.items() if pair not in failed)
    assert all(j["last_error"] for j in backfill.values() if j["state"] == "failed")
    permanent = {"did_not_found", "did_tombstoned", "no_pds_service", "invalid_did_document"}
    permanent |= {"repo_takendown", "repo_deactivated", "repo_suspended", "repo_not_found"}
    assert all(j["attempts"] == 1 for j in backfill.values() if j["error_code"] in permanent)
    got = [(r["did"], r["collection"], r["rkey"], r["cid"]) for r in records]
    assert len(got) == len(set(got))
    assert expected_records(spec, limits=limits) <= set(got) <= possible_records(spec)
    assert run["records_enqueued"] == len(got)


def test_kill_9_during_a_large_backfill_then_restart_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    with simnet_process(
        tmp_path, accounts=150, records=500, hosts=2, collections=COLLS[:1], latency=0.005
    ) as (net, spec):
        overrides: dict[str, dict[str, object]] = {
            "daemon": {"workers": 4},
            "atproto": {"relay": net["relay_url"], "plc_directory": net["plc_url"], "collections": COLLS[:1]},
            "limits": {"max_backfill_dids": 1000},
            "network": {"per_host_rate": 0.0},
        }
        daemon = DaemonProcess(tmp_path / "daemon", overrides).start()
        try:
            run_id = daemon.call(
                "POST", "/_admin/backfill", json={"dids": [a.did for a in spec.accounts]}
            ).json()["run_id"]
            deadline = time.monotonic() + 60
            while daemon.call("GET", f"/_admin/runs/{run_id}").json()["records_enqueued"] < 15_000:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            daemon.kill()
            assert daemon.proc is not None and daemon.proc.returncode == -9
            daemon.start()  # the same config, database and port
            run = daemon.wait_run_finished(run_id, timeout=120)
            records = daemon.all_records()
            jobs = daemon.all_jobs(run_id=run_id)
        finally:
            daemon.stop()
    got = [(r["did"], r["collection"], r["rkey"], r["cid"]) for r in records]
    assert run["state"] == "finished" and run["jobs"]["done"] == 150
    assert len(got) == len(set(got)) == 75_000
    assert set(got) == expected_records(spec)
    assert all(j["state"] == "done" for j in jobs)
    assert "recovered interrupted jobs" in daemon.logs()


def _slow_network_daemon(tmp_path: Path, net: dict[str, object], grace: float) -> DaemonProcess:
    return DaemonProcess(
        tmp_path / "daemon",
        {
            "daemon": {"workers": 4, "shutdown_grace": grace},
            "atproto": {"relay": net["relay_url"], "plc_directory": net["plc_url"], "collections": COLLS[:1]},
            "limits": {"page_timeout": 60.0},
            "network": {"per_host_rate": 0.0},
        },
    ).start()


def test_sigterm_drains_after_the_current_page_and_a_restart_finishes_the_work(tmp_path: Path) -> None:
    with simnet_process(tmp_path, accounts=12, records=400, hosts=2, collections=COLLS[:1], latency=0.1) as (
        net,
        spec,
    ):
        daemon = _slow_network_daemon(tmp_path, net, grace=30.0)
        try:
            run_id = daemon.call(
                "POST", "/_admin/backfill", json={"dids": [a.did for a in spec.accounts]}
            ).json()["run_id"]
            while daemon.call("GET", "/_admin/status").json()["workers"]["busy"] < 4:
                time.sleep(0.02)
            daemon.signal(signal.SIGTERM)
            assert daemon.wait(30) == 0
            assert "job interrupted by shutdown; pending again" in daemon.logs()
            daemon.start()
            run = daemon.wait_run_finished(run_id, timeout=60)
            records = daemon.all_records()
        finally:
            daemon.stop()
    got = [(r["did"], r["collection"], r["rkey"], r["cid"]) for r in records]
    assert run["jobs"]["done"] == 12 and len(got) == len(set(got)) == 4800
    assert set(got) == expected_records(spec)


def test_a_second_signal_cancels_at_once(tmp_path: Path) -> None:
    with simnet_process(
        tmp_path, accounts=0, records=0, hosts=1, collections=COLLS[:1], hostile={"pds_hang": 4}
    ) as (net, spec):
        daemon = _slow_network_daemon(tmp_path, net, grace=600.0)  # a drain would wait for the 60 s timeouts
        try:
            daemon.call("POST", "/_admin/backfill", json={"dids": [a.did for a in spec.accounts]})
            # wait until all four requests hang at the PDS (a job still resolving would stop at once)
            pds = net["pds_urls"][0]
            while httpx.get(net["control_url"] + "/stats", timeout=10).json()[pds]["in_flight"] < 4:
                time.sleep(0.02)
            daemon.signal(signal.SIGTERM)
            time.sleep(0.5)
            assert daemon.proc is not None and daemon.proc.poll() is None  # still draining
            daemon.signal(signal.SIGINT)
            assert daemon.wait(20) == 0
        finally:
            daemon.stop()
    assert "second signal; cancelling now" in daemon.logs()
