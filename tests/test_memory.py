"""SPEC 7's memory contract on the real daemon process: whatever the network sends within the size caps,
peak RSS stays under 300 MB with the default configuration; and a job that kills the daemon does not loop.

Each scenario runs the real ``backfilld run`` (the default configuration but for the simulated network's
URLs, ``allow_private_addresses``, a short retry backoff, so that the hostile pairs' four attempts fit in
the test's time, and a long page timeout, so that a busy machine changes nothing) against the simulated
network in a separate process, serving many accounts with hostile bodies just under the caps on several
hosts at once, so that all 16 workers hold them together. The daemon's RSS is sampled every 50 ms while
it runs. Nothing here asserts on timing.

The figures (peak RSS with healthy traffic, then with the hostile bodies) are printed: ``pytest -s``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil

from daemon.atproto.cid import format_cid
from daemon.jobs.blockcache import BlockCache
from daemon.jobs.verified import VerifiedHandler
from daemon.simnet import (
    Account,
    DaemonLimits,
    HostOptions,
    NetworkSpec,
    expected_failed,
    expected_records,
    plc_did,
)
from daemon.simnet.behaviours import RELAY_HUGE_BYTES
from daemon.simnet.control import spec_to_json
from daemon.simnet.expectations import discovery_error
from daemon.simnet.pds import huge_entries
from daemon.simnet.repos import RepoCache
from daemon.simnet.server import open_network
from daemon.store.models import RunCommit
from daemon.store.store import MAX_CRASH_RECOVERIES
from tests.daemonproc import DaemonProcess

ROOT = Path(__file__).resolve().parents[1]
RSS_LIMIT = 300_000_000  # SPEC 7: peak RSS under 300 MB with the default configuration
MIB = 1_048_576
C1 = "com.example.record"
C2 = "com.example.other"
BODY_MIB = 7.99  # just under max_response_bytes (8 MiB)
CAR_MIB = 63.9  # just under max_car_bytes (64 MiB)
WORKERS = 16  # the default
HOSTS = 6  # 4 requests in flight per host (the default): 24 > 16 workers

# Runs the simulated network in its own process from a spec written as JSON (the command line of
# ``python -m daemon.simnet`` has no way to give behaviours parameters).
SERVE = """
import json, sys, trio
from pathlib import Path
from daemon.simnet.__main__ import parse_args, run
from daemon.simnet.control import spec_from_json
spec = spec_from_json(json.loads(Path(sys.argv[1]).read_text()))
trio.run(run, parse_args(["--port-file", sys.argv[2]]), spec)
"""


@contextmanager
def served(workdir: Path, spec: NetworkSpec) -> Iterator[dict[str, Any]]:
    """Serve ``spec`` in a separate process; yields its URLs (``describe()`` of the running network)."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_file, port_file = workdir / "spec.json", workdir / "simnet.json"
    spec_file.write_text(json.dumps(spec_to_json(spec)))
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE, str(spec_file), str(port_file)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the simulated network did not start: {proc.stderr.read()!r}")  # type: ignore[union-attr]
            time.sleep(0.05)
        yield json.loads(port_file.read_text())
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


class Watch:
    """Samples the daemon's RSS every ``interval`` seconds (and its busy workers, less often) until
    stopped; notes whether the process ever went away. ``mark(name)`` records the peak so far."""

    def __init__(self, daemon: DaemonProcess, interval: float = 0.05) -> None:
        assert daemon.proc is not None
        self.daemon = daemon
        self.pid = daemon.proc.pid
        self.process = psutil.Process(self.pid)
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self.busy_max = 0
        self.died = False
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._rss, daemon=True), threading.Thread(target=self._busy)]

    def __enter__(self) -> Watch:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def _rss(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self.process.memory_info().rss
            except psutil.NoSuchProcess:
                self.died = True
                return
            self.peak = max(self.peak, rss)
            self.samples += 1
            self._stop.wait(self.interval)

    def _busy(self) -> None:
        while not self._stop.is_set():
            try:
                status = self.daemon.call("GET", "/_admin/status").json()
                self.busy_max = max(self.busy_max, status["workers"]["busy"])
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            self._stop.wait(0.2)

    def mark(self, name: str) -> None:
        self.peaks[name] = self.peak

    def check(self) -> None:
        """The daemon never died (no restart: the same process all along) and stayed under the limit."""
        assert not self.died and self.daemon.proc is not None and self.daemon.proc.poll() is None
        assert self.daemon.proc.pid == self.pid
        assert "recovered interrupted jobs" not in self.daemon.logs()
        assert self.samples > 20
        assert self.peak < RSS_LIMIT, f"peak RSS {self.peak / 1e6:.1f} MB: {self.peaks}"


def start_daemon(workdir: Path, info: dict[str, Any], mode: str, collections: list[str]) -> DaemonProcess:
    """The real daemon with the default configuration but for what the simulated network needs."""
    return DaemonProcess(
        workdir / "daemon",
        {
            "daemon": {"workers": WORKERS},
            "atproto": {
                "relay": info["relay_url"],
                "plc_directory": info["plc_url"],
                "collections": collections,
            },
            "sync": {"mode": mode},
            # the hostile pairs are retried max_attempts (4) times; the default backoff (5 s base) would
            # make that minutes
            "retry": {"backoff_base": 0.05, "backoff_cap": 0.5},
            # 16 CARs of 64 MiB at once from the simulated network's one Python process take longer than
            # the default 15 s when other work keeps both cores busy; the outcome must not depend on it
            "limits": {"page_timeout": 120.0},
            "network": {"allow_private_addresses": True},
        },
    ).start()


def backfill(daemon: DaemonProcess, body: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
    accepted = daemon.call("POST", "/_admin/backfill", json=body)
    assert accepted.status_code == 202, accepted.text
    return daemon.wait_run_finished(accepted.json()["run_id"], timeout=timeout)


def outcome(daemon: DaemonProcess, run: dict[str, Any]) -> tuple[dict[tuple[str, str], str], set[Any]]:
    """The run's failed backfill pairs with their codes, and every record in the queue (no duplicates)."""
    jobs = daemon.all_jobs(run_id=run["run_id"])
    backfills = [j for j in jobs if j["kind"] == "backfill"]
    assert all(j["state"] in ("done", "failed") for j in backfills)
    failed = {(j["did"], j["collection"]): j["error_code"] for j in backfills if j["state"] == "failed"}
    records = [(r["did"], r["collection"], r["rkey"], r["cid"]) for r in daemon.all_records()]
    assert len(records) == len(set(records))
    return failed, set(records)


def report(name: str, watch: Watch) -> None:
    figures = {phase: f"{peak / 1e6:.1f} MB" for phase, peak in watch.peaks.items()}
    print(f"\n{name}: peak RSS {figures}, {watch.samples} samples, {watch.busy_max} workers busy at most")


# --- list mode --------------------------------------------------------------------------------------------


def list_spec(healthy: int = 18, per_shape: int = 6) -> NetworkSpec:
    """Healthy accounts (two pages per collection), then ``per_shape`` accounts per hostile listRecords
    body; the relay answers C2's discovery with 8 MiB of junk entries."""
    counts = {C1: 150, C2: 150}
    accounts = [Account(plc_did(i), i % HOSTS, counts) for i in range(healthy)]
    for shape in ("empty_records", "minimal_records", "huge_value"):
        for _ in range(per_shape):
            index = len(accounts)
            params = {"mib": BODY_MIB, "shape": shape}
            accounts.append(Account(plc_did(index), index % HOSTS, {C1: 5, C2: 5}, "pds_huge", params))
    return NetworkSpec(tuple(accounts), HOSTS, (C1, C2), relay_behaviour={C2: "relay_huge"})


def test_list_mode_hostile_bodies_stay_within_the_memory_budget(tmp_path: Path) -> None:
    spec = list_spec()
    limits = DaemonLimits(mode="list")
    healthy = [a.did for a in spec.accounts if a.behaviour is None]
    with served(tmp_path / "net", spec) as info:
        daemon = start_daemon(tmp_path, info, "list", [C1, C2])
        try:
            with Watch(daemon) as watch:
                first = backfill(daemon, {"dids": healthy})
                watch.mark("healthy")
                run = backfill(daemon, {})  # discovery: C2's relay page is the 8 MiB junk
                watch.mark("hostile")
                watch.check()
            healthy_failed, _ = outcome(daemon, first)
            failed, records = outcome(daemon, run)
            discover = {
                j["collection"]: j for j in daemon.all_jobs(run_id=run["run_id"]) if j["kind"] == "discover"
            }
        finally:
            daemon.stop()
    report("list mode", watch)
    assert not healthy_failed
    assert failed == expected_failed(spec, limits=limits)
    assert set(failed.values()) == {"bad_response", "page_too_large", "response_too_large"}
    assert records == expected_records(spec, limits=limits)
    assert (discover[C2]["state"], discover[C2]["error_code"]) == ("failed", discovery_error(spec, C2))
    assert (run["discovery"][C2]["error"] or "").startswith("response_too_large")
    assert discover[C1]["state"] == "done" and run["dids"] == len(spec.accounts)
    assert watch.busy_max == WORKERS


# --- verified mode ----------------------------------------------------------------------------------------


def walked_with_get_blocks(spec: NetworkSpec, account: Account, collection: str) -> bool:
    """Whether the daemon reads ``collection`` of the account's repo with getBlocks rather than one getRepo
    (its own decision, from the root node)."""
    repo = RepoCache().get(spec, account)
    handler = VerifiedHandler.__new__(VerifiedHandler)
    handler._cache = BlockCache()
    handler._cache.put(repo.root, repo.blocks[repo.root])
    commit = RunCommit(format_cid(repo.commit), format_cid(repo.root), repo.rev)
    return handler._fetch_whole(collection, commit) is False


def with_big_repos(accounts: list[Account], behaviour: str, params: dict[str, object], count: int) -> None:
    """Add ``count`` accounts of ``behaviour`` whose C1 the daemon walks with getBlocks (C2 holds most of
    their records, so the root node is mostly C2's)."""
    index = len(accounts)
    added = 0
    while added < count:
        account = Account(plc_did(index), index % HOSTS, {C1: 30, C2: 2000}, behaviour, params)
        if walked_with_get_blocks(NetworkSpec((*accounts, account), HOSTS, (C1, C2)), account, C1):
            accounts.append(account)
            added += 1
        index += 1


TINY_RAW: dict[str, object] = {"size_mib": CAR_MIB, "block_bytes": 8}
TINY_DAG_CBOR: dict[str, object] = {"size_mib": CAR_MIB, "block_bytes": 8, "block_codec": "dag-cbor"}
BIG_DAG_CBOR: dict[str, object] = {"size_mib": CAR_MIB, "block_bytes": MIB, "block_codec": "dag-cbor"}
OVER_THE_CAP: dict[str, object] = {}  # 96 MiB of 1 MiB raw blocks


def verified_spec(hostile: list[tuple[dict[str, object], int]]) -> NetworkSpec:
    """Healthy accounts, then ``count`` car_huge accounts with each ``params`` (with the default endpoint,
    getRepo: their PDS has no getBlocks)."""
    accounts = [Account(plc_did(i), i % HOSTS, {C1: 150}) for i in range(12)]
    for params, count in hostile:
        for _ in range(count):
            index = len(accounts)
            accounts.append(Account(plc_did(index), index % HOSTS, {C1: 5}, "car_huge", params))
    return NetworkSpec(tuple(accounts), HOSTS, (C1,))


def run_verified(tmp_path: Path, spec: NetworkSpec, name: str) -> Watch:
    """Backfill the healthy accounts, then all of them, in verified mode (C1 only); checks the outcome
    exactly."""
    healthy = [a.did for a in spec.accounts if a.behaviour is None]
    with served(tmp_path / "net", spec) as info:
        daemon = start_daemon(tmp_path, info, "verified", [C1])
        try:
            with Watch(daemon) as watch:
                first = backfill(daemon, {"dids": healthy})
                watch.mark("healthy")
                run = backfill(daemon, {"dids": [a.did for a in spec.accounts]})
                watch.mark("hostile")
                report(name, watch)
                watch.check()
            healthy_failed, _ = outcome(daemon, first)
            failed, records = outcome(daemon, run)
        finally:
            daemon.stop()
    assert not healthy_failed
    assert failed == expected_failed(spec, collections=[C1])
    assert records == expected_records(spec, collections=[C1])
    return watch


def test_verified_mode_hostile_cars_stay_within_the_memory_budget(tmp_path: Path) -> None:
    """getRepo CARs just under max_car_bytes of tiny raw blocks (blobs: dropped as they arrive) and of
    1 MiB dag-cbor blocks (held until the walk is done), and CARs over the cap."""
    spec = verified_spec([(TINY_RAW, 4), (BIG_DAG_CBOR, 8), (OVER_THE_CAP, 4)])
    assert set(expected_failed(spec).values()) == {"car_too_large"}
    watch = run_verified(tmp_path, spec, "verified mode, getRepo")
    assert watch.busy_max == WORKERS


def test_verified_mode_getrepo_of_tiny_dag_cbor_blocks(tmp_path: Path) -> None:
    """getRepo CARs just under max_car_bytes of tiny dag-cbor blocks (more than the budget holds:
    response_too_large) beside CARs of 1 MiB blocks."""
    spec = verified_spec([(TINY_DAG_CBOR, 2), (BIG_DAG_CBOR, 8), (TINY_RAW, 2), (OVER_THE_CAP, 4)])
    assert set(expected_failed(spec).values()) == {"response_too_large", "car_too_large"}
    run_verified(tmp_path, spec, "verified mode, getRepo of tiny dag-cbor blocks")


def test_verified_mode_getblocks_with_tiny_extra_blocks(tmp_path: Path) -> None:
    accounts = [Account(plc_did(i), i % HOSTS, {C1: 150}) for i in range(6)]
    with_big_repos(accounts, "car_huge", {"size_mib": 8, "block_bytes": 8, "endpoint": "getBlocks"}, 8)
    spec = NetworkSpec(tuple(accounts), HOSTS, (C1, C2))
    run_verified(tmp_path, spec, "verified mode, getBlocks extras")


def test_verified_mode_getrecord_with_tiny_extra_blocks(tmp_path: Path) -> None:
    accounts = [Account(plc_did(i), i % HOSTS, {C1: 150}) for i in range(6)]
    params = {"size_mib": 16, "block_bytes": 8, "endpoint": "getRecord"}
    accounts += [Account(plc_did(6 + i), i % HOSTS, {C1: 5}, "car_huge", params) for i in range(4)]
    run_verified(tmp_path, NetworkSpec(tuple(accounts), HOSTS, (C1,)), "verified mode, getRecord extras")


# --- the simulated network's hostile bodies themselves ----------------------------------------------------


async def test_the_hostile_bodies_are_what_they_claim() -> None:
    list_accounts = list_spec(healthy=0, per_shape=1).accounts
    spec = NetworkSpec(list_accounts, HOSTS, (C1, C2), relay_behaviour={C2: "relay_huge"})
    async with open_network(spec) as net, httpx.AsyncClient(timeout=60) as client:
        for account in spec.accounts:
            url = net.pds_url(account.did) + "/xrpc/com.atproto.repo.listRecords"
            response = await client.get(url, params={"repo": account.did, "collection": C1, "limit": 100})
            body = response.content
            assert BODY_MIB * MIB - 64 <= len(body) <= BODY_MIB * MIB <= 8 * MIB
            decoded = json.loads(body)
            shape = account.params["shape"]
            records = decoded["records"]
            held = records[0]["value"] if shape == "huge_value" else records
            assert len(held) == huge_entries(str(shape), BODY_MIB * MIB, account.did, C1)
        relay = await client.get(
            net.relay_url + "/xrpc/com.atproto.sync.listReposByCollection", params={"collection": C2}
        )
        assert RELAY_HUGE_BYTES - 64 <= len(relay.content) <= RELAY_HUGE_BYTES < 8 * MIB
        assert all(entry == {"did": {}} for entry in json.loads(relay.content)["repos"])


# --- the crash-loop limit ---------------------------------------------------------------------------------


def jobs_by_did(daemon: DaemonProcess, run_id: int) -> dict[str, dict[str, Any]]:
    return {j["did"]: j for j in daemon.all_jobs(run_id=run_id) if j["kind"] == "backfill"}


def wait_for(daemon: DaemonProcess, run_id: int, ready: Callable[[dict[str, dict[str, Any]]], bool]) -> None:
    deadline = time.monotonic() + 60
    while not ready(jobs_by_did(daemon, run_id)):
        assert time.monotonic() < deadline, f"jobs never got there: {jobs_by_did(daemon, run_id)}"
        time.sleep(0.05)


def test_a_job_running_at_three_consecutive_deaths_fails_as_a_crash_loop(tmp_path: Path) -> None:
    """kill -9 the daemon three times while one job runs (its PDS never answers: as if its processing
    killed the process); at the next start that job is ``failed`` with ``crash_loop``. A long job that
    runs across the same deaths but writes pages between them is not one: it ends done, as do the others."""
    hang, slow = plc_did(10), plc_did(11)
    accounts = [Account(plc_did(i), 0, {C1: 150}) for i in range(4)]
    accounts += [Account(hang, 0, {C1: 5}, "pds_hang"), Account(slow, 1, {C1: 6000})]
    spec = NetworkSpec(tuple(accounts), 2, (C1,), host_options={1: HostOptions(latency=0.15)})
    with served(tmp_path / "net", spec) as info:
        daemon = start_daemon(tmp_path, info, "list", [C1])
        try:
            run_id = daemon.call("POST", "/_admin/backfill", json={"dids": [a.did for a in accounts]}).json()[
                "run_id"
            ]
            others = [a.did for a in accounts[:4]]
            wait_for(daemon, run_id, lambda jobs: all(jobs[did]["state"] == "done" for did in others))
            progress = 0
            for death in range(MAX_CRASH_RECOVERIES):

                def ready(jobs: dict[str, dict[str, Any]], progress: int = progress) -> bool:
                    return jobs[hang]["state"] == "running" and jobs[slow]["records_enqueued"] > progress

                wait_for(daemon, run_id, ready)
                progress = jobs_by_did(daemon, run_id)[slow]["records_enqueued"]
                assert progress < 6000, "the long job must still run at every death"
                daemon.kill()
                assert daemon.proc is not None and daemon.proc.returncode == -signal.SIGKILL
                daemon.start()
                jobs = jobs_by_did(daemon, run_id)
                if death < MAX_CRASH_RECOVERIES - 1:
                    assert jobs[hang]["state"] in ("pending", "running"), jobs[hang]
            run = daemon.wait_run_finished(run_id, timeout=120)
            jobs = jobs_by_did(daemon, run_id)
            _, records = outcome(daemon, run)
            events = daemon.log_events()
        finally:
            daemon.stop()
    assert (jobs[hang]["state"], jobs[hang]["error_code"]) == ("failed", "crash_loop")
    assert str(MAX_CRASH_RECOVERIES) in jobs[hang]["last_error"]
    assert all(jobs[did]["state"] == "done" for did in [*others, slow])
    assert records == expected_records(spec, limits=DaemonLimits(mode="list"), dids=[*others, slow])
    recoveries = [e for e in events if e.get("event") == "recovered interrupted jobs"]
    assert [e["crash_loop"] for e in recoveries] == [0] * (MAX_CRASH_RECOVERIES - 1) + [1]
