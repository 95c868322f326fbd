"""``backfilld demo``: a complete, offline backfill against the simulated network, as a real process."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

from daemon.cli.demo import Observed, compare, demo_config
from daemon.simnet import DaemonLimits, demo_spec, expected_failed, expected_records
from daemon.simnet.expectations import expected_values
from tests.daemonproc import ROOT, write_config

COLLECTIONS = ("com.example.a", "com.example.b")


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("BACKFILLD_ADMIN_TOKEN", "BACKFILLD_CONFIG")}
    return subprocess.run(
        [sys.executable, "-m", "daemon", "demo", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_demo_matches_the_simulated_network() -> None:
    # No --config: ./config.toml of the repository gives the four default collections.
    result = demo()
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.startswith("backfilld demo: a simulated AT Protocol network on 127.0.0.1")
    assert "run 1 started (discover mode, 4 collections): 4 jobs queued" in out
    spec = demo_spec()
    records = len(expected_records(spec, limits=DaemonLimits(page_size=50)))
    assert f"  records on the queue   {records:,}  (the simulated network expects {records:,}: match)" in out
    assert re.search(
        r"^  jobs                   pending 0, running 0, done \d+, failed 12, cancelled 0$", out, re.M
    )
    assert (
        "  failed by error code   did_not_found 4, no_pds_service 4, repo_takendown 4  (as expected)" in out
    )
    for behaviour in (
        "plc_404",
        "doc_no_pds",
        "pds_takendown",
        "pds_500_once",
        "pds_429_once",
        "pds_bad_records",
    ):
        line = next(line for line in out.splitlines() if line.startswith(f"    {behaviour} "))
        assert line.endswith("as expected")
    assert out.rstrip().endswith("outcome: as expected")
    assert "\r" not in out


def test_demo_json_with_workdir_and_collections_from_config(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.toml", {"atproto": {"collections": list(COLLECTIONS)}})
    workdir = tmp_path / "demo"
    result = demo("--json", "--workdir", str(workdir), "--config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    spec = demo_spec(COLLECTIONS)
    limits = DaemonLimits(page_size=50)
    assert report["matches"] is True and report["differences"] == []
    assert (
        report["records"]["queued"]
        == report["records"]["expected"]
        == len(expected_records(spec, limits=limits))
    )
    assert report["records"]["missing"] == report["records"]["unexpected"] == 0
    failed = expected_failed(spec, limits=limits)
    assert report["jobs"]["failed"] == len(failed) == 6
    assert report["failed_by_error_code"] == report["expected_failed_by_error_code"]
    assert {a["behaviour"] for a in report["accounts"]} >= {"plc_404", "pds_500_once", "pds_429_once"}
    assert all(a["outcome"] == a["expected"] for a in report["accounts"])
    assert report["run"]["collections"] == list(COLLECTIONS)
    assert report["workdir"] == str(workdir)
    # Progress went to stderr, so stdout is only the JSON document.
    assert "run 1 started (discover mode, 2 collections)" in result.stderr

    # The database and the daemon's JSON log stay behind for a look.
    with sqlite3.connect(workdir / "backfilld.sqlite3") as db:
        (count,) = db.execute("SELECT count(*) FROM records").fetchone()
    assert count == report["records"]["queued"]
    events = [json.loads(line)["event"] for line in (workdir / "daemon.log").read_text().splitlines()]
    assert "backfilld ready" in events and "job finished" in events

    again = demo("--workdir", str(workdir), "--config", str(config))
    assert again.returncode == 1
    assert again.stderr.strip() == (
        f"backfilld: {workdir} already holds a demo database; give an empty or new directory"
    )


def test_compare_reports_differences(tmp_path: Path) -> None:
    spec = demo_spec(COLLECTIONS)
    config = demo_config(
        tmp_path, relay="http://127.0.0.1:1", plc_directory="http://127.0.0.1:2", collections=COLLECTIONS
    )
    limits = DaemonLimits(page_size=config.limits.page_size)
    records = expected_records(spec, limits=limits)
    failed = expected_failed(spec, limits=limits)
    jobs = [
        {"kind": "backfill", "did": did, "collection": c, "state": "failed", "error_code": code}
        for (did, c), code in failed.items()
    ]
    run = {"state": "finished", "jobs": {"done": 0, "failed": len(jobs)}}
    values = {key: value for key, (_, value) in expected_values(spec, limits=limits).items()}
    assert limits.mode == "verified"  # the demo's default: every record must come verified
    assert compare(Observed(run, jobs, set(records), len(records), values, len(records)), spec, config)[
        "matches"
    ]

    wrong = [dict(jobs[0], error_code="timeout"), *jobs[1:]]
    lost = set(sorted(records)[1:])
    altered = dict(values)
    altered[min(altered)] = {"$type": "other"}
    report = compare(Observed(run, wrong, lost, len(lost), altered, 0), spec, config)
    assert report["matches"] is False
    assert "1 records carry another value than the account's" in report["differences"]
    assert any(d.startswith("only 0 of") for d in report["differences"])
    assert report["records"]["missing"] == 1
    first = jobs[0]
    assert (
        f"{first['did']} {first['collection']}: failed with timeout, expected failure {first['error_code']}"
        in (report["differences"])
    )
    assert any(d.startswith("1 expected records are missing") for d in report["differences"])


def test_demo_config_stays_on_loopback(tmp_path: Path) -> None:
    config = demo_config(
        tmp_path, relay="http://127.0.0.1:1", plc_directory="http://127.0.0.1:2", collections=COLLECTIONS
    )
    assert config.admin.listen == "127.0.0.1:0" and config.network.allow_private_addresses
    assert config.daemon.database.parent == tmp_path and config.admin.token_file == tmp_path / "admin.token"
