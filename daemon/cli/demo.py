"""``backfilld demo``: a complete backfill against the built-in simulated network, offline, in seconds.

One trio run holds both halves: the simulated network (:mod:`daemon.simnet`: a relay, a PLC directory and
three PDS hosts on loopback ports, with a few hostile accounts) and a real :class:`~daemon.runtime.Daemon`
with a fresh database. The backfill itself goes through the admin API with the same blocking client code
as ``backfilld backfill --wait`` (run in a worker thread, so the trio loop keeps serving both halves), and
the outcome is compared with what the simulated network says a correct daemon ends up with.

Settings differ from production on purpose: private addresses are allowed (everything is on 127.0.0.1),
retries back off for fractions of a second instead of seconds, and pages are smaller so that some accounts
take several pages.
"""

from __future__ import annotations

import functools
import json
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import trio

from daemon.cli.client import AdminClient, endpoint_from_url, read_admin_token
from daemon.cli.progress import ProgressDisplay, plural, run_elapsed
from daemon.cli.runs import describe_started, iter_jobs, wait_for_run
from daemon.config import (
    DEFAULT_COLLECTIONS,
    AdminConfig,
    AtprotoConfig,
    Config,
    DaemonConfig,
    LimitsConfig,
    NetworkConfig,
    RetryConfig,
)
from daemon.errors import BackfillError, Code, DemoError
from daemon.process.daemon import Daemon
from daemon.process.logsetup import configure_logging
from daemon.simnet import (
    DaemonLimits,
    NetworkSpec,
    demo_spec,
    expected_failed,
    expected_records,
    expected_values,
    open_network,
)
from daemon.simnet import relay_dids as relay_listing
from daemon.store.models import JOB_STATES

DATABASE_NAME = "backfilld.sqlite3"
LOG_NAME = "daemon.log"
# Far more than the demo needs (a few seconds); only a bug makes it wait this long.
DEMO_TIMEOUT = 120.0
MAX_DIFFERENCES = 10
EXIT_OK = 0
EXIT_MISMATCH = 1

RecordKey = tuple[str, str, str, str]

# What the hostile accounts of demo_spec() do, for the summary (other behaviours are shown by name only).
BEHAVIOURS = {
    "plc_404": "the PLC directory does not know the DID",
    "doc_no_pds": "the DID document names no PDS",
    "pds_takendown": "the PDS says RepoTakendown",
    "pds_404_first": "the PDS answers 404: no such collection",
    "pds_500_once": "every page fails once with HTTP 500",
    "pds_429_once": "the PDS rate-limits once (429, Retry-After)",
    "pds_bad_records": "pages mix in invalid records (skipped)",
}


@dataclass(frozen=True, slots=True)
class Observed:
    """What the demo read back from the daemon once the run was over."""

    run: dict[str, Any]
    jobs: list[dict[str, Any]]
    records: set[RecordKey]
    queue_depth: int
    values: dict[tuple[str, str, str], object]
    verified: int


def demo_config(workdir: Path, *, relay: str, plc_directory: str, collections: Sequence[str]) -> Config:
    """The daemon configuration of the demo: everything in ``workdir``, admin on a free loopback port."""
    return Config(
        path=workdir / "config.toml",
        daemon=DaemonConfig(
            database=workdir / DATABASE_NAME,
            workers=8,
            shutdown_grace=2.0,
            log_format="json",
            log_level="info",
        ),
        admin=AdminConfig(listen="127.0.0.1:0", token_file=workdir / "admin.token"),
        atproto=AtprotoConfig(relay=relay, plc_directory=plc_directory, collections=tuple(collections)),
        limits=LimitsConfig(page_size=50, page_timeout=2.0, discovery_timeout=2.0),
        retry=RetryConfig(max_attempts=4, backoff_base=0.2, backoff_cap=2.0),
        network=NetworkConfig(per_host_rate=200.0, rate_limit_pause=2.0, allow_private_addresses=True),
    )


def expectation_limits(config: Config) -> DaemonLimits:
    """The daemon settings the simulated network's expectations depend on."""
    return DaemonLimits(
        page_size=config.limits.page_size,
        max_attempts=config.retry.max_attempts,
        max_pages_per_collection=config.limits.max_pages_per_collection,
        max_response_bytes=config.limits.max_response_bytes,
        allow_private_addresses=config.network.allow_private_addresses,
        mode=config.sync.mode,
        max_car_bytes=config.sync.max_car_bytes,
    )


def _all_records(client: AdminClient) -> Iterator[dict[str, Any]]:
    after = 0
    while True:
        records = client.records(after=after, limit=1000).get("records") or []
        if not records:
            return
        yield from records
        after = int(records[-1]["id"])


def drive(client: AdminClient, stream: TextIO) -> Observed:
    """Start a discovery run, wait for it with live progress, and read back its jobs and records (blocking;
    the demo runs it in a worker thread)."""
    with client:
        started = client.backfill()
        run_id = int(started["run_id"])
        print(describe_started(started), file=stream, flush=True)
        run = wait_for_run(client, run_id, ProgressDisplay(stream))
        jobs = list(iter_jobs(client, run_id=run_id))
        entries = list(_all_records(client))
        records = {(r["did"], r["collection"], r["rkey"], r["cid"]) for r in entries}
        values = {(r["did"], r["collection"], r["rkey"]): r.get("record") for r in entries}
        verified = sum(1 for r in entries if r.get("verified") is True)
        depth = int(client.status()["records_queue"]["depth"])
    return Observed(run, jobs, records, depth, values, verified)


async def _serve_and_drive(
    spec: NetworkSpec, workdir: Path, stream: TextIO
) -> tuple[Observed | BackfillError, NetworkSpec, Config]:
    # Failures come back as values: raised inside the nurseries they would arrive wrapped in
    # exception groups, and the CLI reports a BackfillError as one plain line.
    result: Observed | BackfillError = DemoError(
        f"the demo run did not finish within {DEMO_TIMEOUT:.0f}s", code=Code.DEMO_TIMEOUT
    )
    async with open_network(spec) as net:
        config = demo_config(
            workdir, relay=net.relay_url, plc_directory=net.plc_url, collections=spec.collections
        )
        try:
            daemon = Daemon(config)
        except BackfillError as exc:
            return exc, net.spec, config
        async with trio.open_nursery() as nursery:
            listening: list[str] = await nursery.start(daemon.run)
            try:
                client = AdminClient(
                    endpoint_from_url(listening[0]), read_admin_token(config.admin.token_file)
                )
                with trio.move_on_after(DEMO_TIMEOUT):
                    result = await trio.to_thread.run_sync(
                        functools.partial(drive, client, stream), abandon_on_cancel=True
                    )
            except BackfillError as exc:
                result = exc
            finally:
                daemon.stop()
        return result, net.spec, config


def _outcome(states: Mapping[str, Counter[str | None]]) -> str:
    """``4 done`` or ``2 done, 2 failed (http_status)`` from per-state error-code counters."""
    parts = []
    for state in ("done", "failed", "cancelled", "pending", "running"):
        codes = states.get(state)
        if not codes:
            continue
        text = f"{sum(codes.values())} {state}"
        named = sorted(code for code in codes if code)
        if named:
            text += f" ({', '.join(named)})"
        parts.append(text)
    return ", ".join(parts) or "no jobs"


def compare(observed: Observed, spec: NetworkSpec, config: Config) -> dict[str, Any]:
    """The demo's verdict: the daemon's records and failed pairs against the simulated network's."""
    collections = config.atproto.collections
    discovered = sorted({did for c in collections for did in relay_listing(spec, c)})
    limits = expectation_limits(config)
    want_records = expected_records(spec, limits=limits, dids=discovered, collections=collections)
    want_failed = expected_failed(spec, limits=limits, dids=discovered, collections=collections)
    got_failed: dict[tuple[str, str], str] = {}
    by_did: dict[str, dict[str, Counter[str | None]]] = {}
    differences: list[str] = []
    for job in observed.jobs:
        if job["kind"] != "backfill":
            if job["state"] != "done":
                differences.append(
                    f"discovery of {job['collection']} ended {job['state']} ({job['error_code']})"
                )
            continue
        state, code = job["state"], job.get("error_code")
        by_did.setdefault(job["did"], {}).setdefault(state, Counter())[
            code if state == "failed" else None
        ] += 1
        if state == "failed":
            got_failed[(job["did"], job["collection"])] = str(code)
    for pair in sorted(set(want_failed) | set(got_failed)):
        want, got = want_failed.get(pair), got_failed.get(pair)
        if want != got:
            differences.append(
                f"{pair[0]} {pair[1]}: {'failed with ' + got if got else 'not failed'}, "
                f"expected {'failure ' + want if want else 'success'}"
            )
    missing, unexpected = want_records - observed.records, observed.records - want_records
    want_values = expected_values(spec, limits=limits, dids=discovered, collections=collections)
    wrong_values = sum(
        1 for key, value in observed.values.items() if key in want_values and want_values[key][1] != value
    )
    if wrong_values:
        differences.append(f"{wrong_values:,} records carry another value than the account's")
    if limits.mode == "verified" and observed.verified != len(observed.records):
        differences.append(f"only {observed.verified:,} of {len(observed.records):,} records are verified")
    if missing:
        differences.append(f"{len(missing):,} expected records are missing, e.g. {min(missing)}")
    if unexpected:
        differences.append(f"{len(unexpected):,} records were not expected, e.g. {min(unexpected)}")
    if observed.run.get("state") != "finished":
        differences.append(f"the run ended {observed.run.get('state')}, not finished")
    accounts = []
    for account in spec.accounts:
        if account.behaviour is None or account.did not in discovered:
            continue
        expected: dict[str, Counter[str | None]] = {}
        for collection in collections:
            code = want_failed.get((account.did, collection))
            expected.setdefault("failed" if code else "done", Counter())[code] += 1
        accounts.append(
            {
                "behaviour": account.behaviour,
                "did": account.did,
                "outcome": _outcome(by_did.get(account.did, {})),
                "expected": _outcome(expected),
            }
        )
    return {
        "matches": not differences,
        "run": observed.run,
        "records": {
            "queued": len(observed.records),
            "queue_depth": observed.queue_depth,
            "expected": len(want_records),
            "missing": len(missing),
            "unexpected": len(unexpected),
            "verified": observed.verified,
            "mode": limits.mode,
        },
        "jobs": observed.run.get("jobs", {}),
        "failed_by_error_code": dict(Counter(got_failed.values())),
        "expected_failed_by_error_code": dict(Counter(want_failed.values())),
        "accounts": accounts,
        "differences": differences,
    }


def render_summary(report: Mapping[str, Any]) -> list[str]:
    """The human-readable closing summary of a demo."""
    records, jobs = report["records"], report["jobs"]
    verdict = "match" if not records["missing"] and not records["unexpected"] else "MISMATCH"
    lines = [
        "",
        "Summary",
        f"  records on the queue   {records['queue_depth']:,}  (the simulated network expects "
        f"{records['expected']:,}: {verdict})",
        (
            f"  verified               {records['verified']:,} of them proven against the accounts' signed "
            "commits and Merkle Search Trees (sync.mode = verified)"
            if records["mode"] == "verified"
            else "  verified               none: sync.mode = list (listRecords values, CIDs checked)"
        ),
        "  jobs                   "
        + ", ".join(f"{state} {int(jobs.get(state, 0)):,}" for state in JOB_STATES),
    ]
    got, want = report["failed_by_error_code"], report["expected_failed_by_error_code"]
    codes = ", ".join(f"{code} {n}" for code, n in sorted(got.items())) or "none"
    lines.append(
        f"  failed by error code   {codes}  ({'as expected' if got == want else 'expected: ' + str(want)})"
    )
    if report["accounts"]:
        lines.append("  hostile accounts:")
        rows = [
            (a["behaviour"], BEHAVIOURS.get(a["behaviour"], ""), a["did"], a["outcome"], a["expected"])
            for a in report["accounts"]
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        for behaviour, meaning, did, outcome, expected in rows:
            mark = "as expected" if outcome == expected else f"EXPECTED {expected}"
            cells = (behaviour, meaning, did, outcome)
            lines.append(
                "    " + "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + f"  {mark}"
            )
    for difference in report["differences"][:MAX_DIFFERENCES]:
        lines.append(f"  difference: {difference}")
    if report.get("workdir"):
        lines.append(f"  database and daemon log kept in {report['workdir']}")
    lines.append(
        "outcome: as expected"
        if report["matches"]
        else "outcome: NOT as expected (see the differences above)"
    )
    return lines


def _describe_network(spec: NetworkSpec) -> str:
    hostile = sum(1 for a in spec.accounts if a.behaviour is not None)
    return (
        f"backfilld demo: a simulated AT Protocol network on 127.0.0.1 (a relay, a PLC directory, "
        f"{spec.pds_hosts} PDS hosts; {len(spec.accounts)} accounts, {hostile} of them hostile, "
        f"{plural(len(spec.collections), 'collection')}) and a daemon with a fresh database"
    )


def run_demo(*, config: Config | None, workdir: Path | None, as_json: bool, out: TextIO | None = None) -> int:
    """Run the demo; 0 when the outcome is what the simulated network expects, else 1.

    ``config`` (the operator's, when there is one) only contributes its collections. With ``workdir``
    the database and the daemon's log are kept there (it must not hold a database already).
    """
    stream = out or sys.stdout
    collections = config.atproto.collections if config is not None else DEFAULT_COLLECTIONS
    spec = demo_spec(collections)
    if workdir is not None:
        if (workdir / DATABASE_NAME).exists():
            raise DemoError(
                f"{workdir} already holds a demo database; give an empty or new directory",
                code=Code.DEMO_WORKDIR,
            )
        workdir.mkdir(parents=True, exist_ok=True)
        return _run_in(spec, workdir, keep=True, as_json=as_json, stream=stream)
    with tempfile.TemporaryDirectory(prefix="backfilld-demo-") as temporary:
        return _run_in(spec, Path(temporary), keep=False, as_json=as_json, stream=stream)


def _run_in(spec: NetworkSpec, workdir: Path, *, keep: bool, as_json: bool, stream: TextIO) -> int:
    progress = sys.stderr if as_json else stream
    print(_describe_network(spec), file=progress, flush=True)
    with open(workdir / LOG_NAME, "a", encoding="utf-8") as log:
        # The daemon's log would garble the progress bar; it goes to a file (kept with --workdir).
        configure_logging("json", "info", stream=log)
        observed, served, config = trio.run(_serve_and_drive, spec, workdir, progress)
    if isinstance(observed, BackfillError):
        raise observed
    report = compare(observed, served, config)
    report["workdir"] = str(workdir) if keep else None
    report["seconds"] = round(run_elapsed(observed.run, 0.0), 3)
    if as_json:
        print(json.dumps(report, indent=2), file=stream)
    else:
        for line in render_summary(report):
            print(line, file=stream)
    return EXIT_OK if report["matches"] else EXIT_MISMATCH
