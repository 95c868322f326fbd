"""``make bench``: the daemon against the simulated network, beside a Node and a Python bare client.

The real daemon process and the simulated network, each in its own process, and two bare clients (Node's
fetch and Python's trio + httpx) on the same network in the same run.

Scenarios (issue 12), each reported as ratios within one run:

- (a) zero latency, 1,000 accounts x 400 records, 4 hosts, 16 workers, list mode: the daemon's records/s
  over the Node client's (and the Python client's);
- (b) 50 ms per request, 300 accounts x 400 records, list mode: the daemon's time against the bound
  ``requests x latency / workers`` (the clients' too, for reference);
- (c) zero latency, 10,000 accounts x 100 records (per-job overhead), list mode: ratio to the Node client;
- (d) verified mode on the networks of (a) and (c): records/s, the ratio to list mode's records/s on the
  same network in the same run, and requests per pair;
- (e) peak RSS: of every daemon run above, and of list- and verified-mode runs against hostile bodies
  (bodies just under and over the size caps, in every hostile shape the simulated network has);
- b200 (not run by default): 200 ms per request, 96 accounts x 400, list mode, a diagnostic of (b).

Each network is one ``python -m daemon.simnet`` process (``python -m bench.hostile`` for (e)), warmed up by
an unmeasured Node pass (its page cache, and its repo cache for verified mode); then a pass of each bare
client, and per repetition one fresh ``python -m daemon run`` per mode (and per ``--daemon-root``), each
followed by another client pass. A daemon run is ``POST /_admin/backfill {}`` (discovery) polled every
100 ms until finished, with an acking consumer draining the records queue and the daemon's RSS sampled
every 50 ms. The machine is shared, so each side is reported by its best pass. Results are printed as a
table (the machine, the command, the date, every target met or not) and saved as JSON under
``bench/results/``. See ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import psutil
import trio

from bench.hostile import format_behaviour
from bench.measure import (
    MIB,
    MachineCpu,
    RssSampler,
    cpu_seconds,
    machine,
    main_thread_cpu,
    vm_hwm,
)
from bench.procs import ROOT, TOKEN, DaemonProcess, SimnetProcess

COLLECTION = "com.emdashcms.experimental.package.release"
RESULTS = ROOT / "bench" / "results"
BARE_MJS = ROOT / "bench" / "bare.mjs"
WORKERS = 16
POLL_INTERVAL = 0.1
CONSUMER_BATCH = 1000
DISCOVERY_PAGE_SIZE = 1000
RUN_DEADLINE = 1800.0  # seconds a daemon run may take before the bench gives up on it
CLIENT_DEADLINE = 1800.0
MB = 1_000_000
# The simulated network's caches, sized to hold every page and every repo of a network so that after the
# warm-up it only serves from memory (a listRecords page of 100 records is about 50 KB, a repo about 530
# bytes per record).
PAGE_BYTES_PER_RECORD = 640
REPO_BYTES_PER_RECORD = 700
MODES = ("list", "verified")


@dataclass(frozen=True, slots=True)
class Network:
    """One simulated network: ``accounts`` well-behaved accounts with ``records`` records each in one
    collection over ``hosts`` PDS hosts, ``latency`` seconds added to every PDS and PLC answer, and
    ``hostile`` accounts (behaviour, count, params) with ``records`` records each too."""

    key: str
    title: str
    accounts: int
    records: int
    hosts: int = 4
    latency: float = 0.0
    hostile: tuple[tuple[str, int, dict[str, object]], ...] = ()
    repeat: int = 1

    @property
    def all_accounts(self) -> int:
        return self.accounts + sum(count for _, count, _ in self.hostile)

    @property
    def total_records(self) -> int:
        return self.all_accounts * self.records


# The hostile bodies of scenario (e) (issue 9): per worker, a body as large as the daemon lets in. In list
# mode the pds_huge accounts send a listRecords body of 7.9 MiB (under max_response_bytes, 8 MiB: read and
# decoded whole) of each shape the simulated network has: an array of about 120,000 small objects that
# never closes ("junk"), ``{"records":[{},{},...]}`` (the dense body that costs ~190 MiB once a generic
# JSON decoder has it), a page of minimal ``{"uri","cid"}`` entries far over the page size, and one
# record whose value is ``[{},{},...]``; or a body of 64 MiB (cut at the cap). In verified mode the
# car_huge accounts have no getBlocks and send a getRepo CAR of 63 MiB (under max_car_bytes, 64 MiB: the
# whole repo, then filler blocks no walk needs: 1 MiB raw blocks, or 8-byte DAG-CBOR blocks, the most
# blocks a CAR of that size can hold) or of 96 MiB (cut at the cap). Each kind of account is healthy in
# the other mode.
HOSTILE_BODIES: tuple[tuple[str, int, dict[str, object]], ...] = (
    ("pds_huge", 8, {"mib": 7.9}),
    ("pds_huge", 8, {"mib": 7.9, "shape": "empty_records"}),
    ("pds_huge", 8, {"mib": 7.9, "shape": "minimal_records"}),
    ("pds_huge", 8, {"mib": 7.9, "shape": "huge_value"}),
    ("pds_huge", 8, {}),
    ("car_huge", 12, {"size_mib": 63}),
    ("car_huge", 4, {"size_mib": 63, "block_bytes": 8, "block_codec": "dag-cbor"}),
    ("car_huge", 8, {}),
)

NETWORKS: dict[str, Network] = {
    "A": Network("A", "0 ms, 1,000 accounts x 400 records, 4 hosts", 1000, 400, repeat=2),
    "B": Network("B", "50 ms per request, 300 accounts x 400 records, 4 hosts", 300, 400, latency=0.05),
    "B200": Network("B200", "200 ms per request, 96 accounts x 400 records, 4 hosts", 96, 400, latency=0.2),
    "C": Network("C", "0 ms, 10,000 accounts x 100 records (1M), 4 hosts", 10_000, 100),
    "H": Network("H", "hostile bodies: 200 accounts x 100 records + hostile accounts, 4 hosts", 200, 100),
}


@dataclass(frozen=True, slots=True)
class Scenario:
    """A scenario of the issue: on which networks it runs the bare clients, and which daemon modes."""

    name: str
    title: str
    legs: tuple[tuple[str, bool, tuple[str, ...]], ...]  # (network, bare clients, daemon modes)


SCENARIOS: dict[str, Scenario] = {
    "a": Scenario(
        "a", "zero latency, 1,000 x 400, list mode: ratio to the Node client", (("A", True, ("list",)),)
    ),
    "b": Scenario("b", "50 ms per request, list mode: ratio to the latency bound", (("B", True, ("list",)),)),
    "c": Scenario(
        "c", "10,000 x 100 (per-job overhead), list mode: ratio to Node", (("C", True, ("list",)),)
    ),
    "d": Scenario(
        "d",
        "verified mode on the networks of (a) and (c): ratio to list mode",
        (("A", False, MODES), ("C", False, MODES)),
    ),
    "e": Scenario("e", "peak RSS, and under hostile bodies", (("H", False, MODES),)),
    "b200": Scenario("b200", "200 ms per request (diagnostic of b)", (("B200", True, ("list",)),)),
}
DEFAULT_SCENARIOS = ("a", "b", "c", "d", "e")


@dataclass(slots=True)
class Leg:
    """What runs on one network in this bench run."""

    network: Network
    clients: bool = False
    modes: list[str] = field(default_factory=list)
    scenarios: list[str] = field(default_factory=list)


def plan(
    names: Sequence[str], *, quick: bool, extra_hostile: Sequence[tuple[str, int, dict[str, object]]]
) -> list[Leg]:
    """The networks the chosen scenarios need, each with the union of their clients and daemon modes."""
    legs: dict[str, Leg] = {}
    for name in names:
        for key, clients, modes in SCENARIOS[name].legs:
            leg = legs.setdefault(key, Leg(network(key, quick=quick, extra_hostile=extra_hostile)))
            leg.clients = leg.clients or clients
            leg.modes = [mode for mode in MODES if mode in leg.modes or mode in modes]
            leg.scenarios.append(name)
    return [legs[key] for key in NETWORKS if key in legs]


def network(
    key: str, *, quick: bool, extra_hostile: Sequence[tuple[str, int, dict[str, object]]] = ()
) -> Network:
    """Network ``key``, scaled to 1/10 of its well-behaved accounts and one repetition with ``quick``."""
    net = NETWORKS[key]
    if key == "H":
        net = replace(net, hostile=(*HOSTILE_BODIES, *extra_hostile))
    if quick:
        net = replace(
            net, title=net.title + " [quick: 1/10 of the accounts]", accounts=net.accounts // 10, repeat=1
        )
    return net


def daemon_config(net: Network, mode: str, urls: dict[str, Any]) -> dict[str, dict[str, object]]:
    """The bench config; docs/performance.md says why each value is what it is."""
    config: dict[str, dict[str, object]] = {
        "daemon": {
            "workers": WORKERS,
            "log_level": "info",
            "log_format": "json",
            "max_records_queue": net.total_records + 1,
            "shutdown_grace": 10.0,
        },
        "atproto": {
            "collections": [COLLECTION],
            "relay": urls.get("relay_url", "http://simnet.invalid"),
            "plc_directory": urls.get("plc_url", "http://simnet.invalid"),
        },
        "limits": {
            "discovery_page_size": DISCOVERY_PAGE_SIZE,
            "max_discovered_dids": net.all_accounts,
            "max_discovery_pages_per_collection": 1000,
        },
        "sync": {"mode": mode},
        "network": {
            "allow_private_addresses": True,
            "per_host_rate": 0.0,
            "per_host_concurrency": WORKERS,
        },
    }
    if net.hostile:
        # Hostile jobs retry soon, so that their bodies keep arriving while the run lasts.
        config["retry"] = {"backoff_base": 0.2, "backoff_cap": 1.0}
    return config


# -- the daemon ---------------------------------------------------------------------------------------------


class Consumer:
    """An acking consumer of the records queue, as an aggregator's indexer would be: read up to 1,000
    records after its cursor, acknowledge them, repeat; sleep 50 ms when the queue is empty."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.consumed = 0
        self.requests = 0
        self.drained_at: float | None = None

    async def run(self, run_over: trio.Event, started: float) -> None:
        after = 0
        while True:
            response = await self.client.get(
                "/_admin/records", params={"after": after, "limit": CONSUMER_BATCH}
            )
            response.raise_for_status()
            self.requests += 1
            records = response.json()["records"]
            if records:
                after = records[-1]["id"]
                self.consumed += len(records)
                ack = await self.client.post("/_admin/records/ack", json={"through": after})
                ack.raise_for_status()
                self.requests += 1
                if len(records) == CONSUMER_BATCH:
                    continue
            elif run_over.is_set():
                self.drained_at = time.perf_counter() - started
                return
            await trio.sleep(0.05)


async def failed_jobs(client: httpx.AsyncClient, run_id: int) -> list[list[str]]:
    """(DID, error code) of every failed job of the run."""
    failed: list[list[str]] = []
    after = 0
    while True:
        response = await client.get(
            "/_admin/jobs", params={"state": "failed", "run_id": run_id, "after": after, "limit": 1000}
        )
        response.raise_for_status()
        body = response.json()
        failed += [[job["did"], job["error_code"]] for job in body["jobs"]]
        if not body["jobs"] or body.get("cursor") is None:
            return failed
        after = body["cursor"]


async def drive_daemon(
    daemon: DaemonProcess, simnet_pid: int, consume: bool, collect_failed: bool = False
) -> dict[str, Any]:
    """POST a discovery run and poll it to the end; the daemon process's CPU, RSS and timings (and, with
    ``collect_failed``, its failed jobs)."""
    process = psutil.Process(daemon.pid)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=daemon.base, headers=headers, timeout=60.0) as client:
        idle_rss = process.memory_info().rss
        sampler = RssSampler(daemon.pid)
        consumer = Consumer(client)
        run_over = trio.Event()
        async with trio.open_nursery() as nursery:
            machine_before = MachineCpu.take([daemon.pid, simnet_pid])
            cpu_before, main_before = cpu_seconds(process), main_thread_cpu(process)
            bench_before = cpu_seconds(psutil.Process())
            started = time.perf_counter()
            nursery.start_soon(sampler.run, started)
            response = await client.post("/_admin/backfill", json={})
            response.raise_for_status()
            run_id = response.json()["run_id"]
            if consume:
                nursery.start_soon(consumer.run, run_over, started)
            polls = 0
            while True:
                await trio.sleep(POLL_INTERVAL)
                polls += 1
                run = (await client.get(f"/_admin/runs/{run_id}")).json()
                if run["state"] in ("finished", "cancelled"):
                    break
                if time.perf_counter() - started > RUN_DEADLINE:
                    raise RuntimeError(f"the daemon's run did not finish within {RUN_DEADLINE:.0f} s: {run}")
            seconds = time.perf_counter() - started
            cpu_after, main_after = cpu_seconds(process), main_thread_cpu(process)
            bench_cpu = cpu_seconds(psutil.Process()) - bench_before
            load = MachineCpu.take([daemon.pid, simnet_pid]).since(machine_before)
            run_over.set()
            if consume:
                with trio.move_on_after(600):
                    while consumer.drained_at is None:
                        await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        cpu_drained = cpu_seconds(process)
        failed = await failed_jobs(client, run_id) if collect_failed else None
    return {
        "run": run,
        "failed_jobs": failed,
        "seconds": seconds,
        "daemon_reported_seconds": (run["finished_at"] or 0) - run["created_at"],
        "cpu_seconds": cpu_after - cpu_before,
        "cpu_main_thread_seconds": main_after - main_before,
        "cpu_seconds_until_drained": cpu_drained - cpu_before,
        "bench_process_cpu_seconds": bench_cpu,
        "idle_rss_bytes": idle_rss,
        "peak_rss_bytes": sampler.peak,
        "peak_rss_vmhwm_bytes": vm_hwm(daemon.pid),
        "rss_series": sampler.series,
        "polls": polls,
        "load": load,
        "consumer": {
            "enabled": consume,
            "consumed": consumer.consumed,
            "requests": consumer.requests,
            "drained_at_seconds": consumer.drained_at,
        },
    }


def profiler(
    kind: str | None, daemon: DaemonProcess, path: Path, idle: bool
) -> subprocess.Popen[bytes] | None:
    """Attach py-spy to the running daemon, every thread (stopped with SIGINT, which makes it write
    ``path``); with ``idle`` the samples of threads waiting (the trio loop in epoll, SQLite's thread on its
    queue) are kept too."""
    if kind != "py-spy":
        return None
    command = [
        str(Path(sys.executable).with_name("py-spy")),
        "record",
        "--pid",
        str(daemon.pid),
        "--format",
        "raw",
        "--threads",
        "--nonblocking",
        "--rate",
        "250",
        "-o",
        str(path),
    ]
    if idle:
        command.append("--idle")
    spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    return spy


def run_daemon(
    net: Network,
    mode: str,
    simnet: SimnetProcess,
    workdir: Path,
    *,
    root: Path,
    consume: bool,
    profile: str | None,
    profile_idle: bool,
    expected: dict[str, Any],
) -> dict[str, Any]:
    """One fresh daemon process and database (the ``daemon`` package of ``root``), one discovery run."""
    simnet.control("/reset")
    daemon = DaemonProcess(workdir, daemon_config(net, mode, simnet.urls), root)
    python: Sequence[str] = (sys.executable,)
    profile_path = workdir / f"profile-{profile}.txt"
    if profile == "pyinstrument":
        python = (str(Path(sys.executable).with_name("pyinstrument")), "-r", "text", "-o", str(profile_path))
    daemon.start(python)
    spy = profiler(profile, daemon, profile_path, profile_idle)
    try:
        simnet_process = psutil.Process(simnet.pid)
        simnet_cpu = cpu_seconds(simnet_process)
        repos_before = simnet.repos()
        measured = trio.run(drive_daemon, daemon, simnet.pid, consume, "failed_codes" in expected)
        measured["simnet_cpu_seconds"] = cpu_seconds(simnet_process) - simnet_cpu
        measured["requests"] = simnet.request_counts()
        measured["simnet_repo_builds"] = simnet.repos()["repos_built"] - repos_before["repos_built"]
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
    finally:
        measured_exit = daemon.stop()
    run = measured.pop("run")
    records, requests = run["records_enqueued"], measured["requests"]
    pairs = net.all_accounts
    failed = run["jobs"].get("failed", 0)
    complete = records == expected["records"] and failed == expected["failed"]
    failed_jobs = measured.pop("failed_jobs")
    if failed_jobs is not None:
        # The hostile network: every pair must fail with the code a correct daemon fails it with.
        codes = dict(sorted(Counter(code for _, code in failed_jobs).items()))
        wrong = sorted(
            f"{did}: {code} (expected {expected['failed_by_did'].get(did, 'done')})"
            for did, code in failed_jobs
            if expected["failed_by_did"].get(did) != code
        )
        seen = {did for did, _ in failed_jobs}
        wrong += sorted(
            f"{did}: done (expected {code})"
            for did, code in expected["failed_by_did"].items()
            if did not in seen
        )
        measured["failed_codes"] = codes
        measured["unexpected_outcomes"] = wrong
        complete = complete and not wrong
    result = {
        "mode": mode,
        "daemon_root": str(root),
        "records": records,
        "pages": requests["pds"] if mode == "list" else None,
        "pds_requests": requests["pds"],
        "records_per_s": records / measured["seconds"],
        "pds_requests_per_s": requests["pds"] / measured["seconds"],
        "pds_requests_per_pair": requests["pds"] / pairs,
        "plc_requests_per_pair": requests["plc"] / pairs,
        "cpu_seconds_per_100k_records": measured["cpu_seconds"] * 100_000 / max(records, 1),
        **measured,
        "jobs": run["jobs"],
        "operations": run.get("operations"),
        "run_state": run["state"],
        "expected": {k: v for k, v in expected.items() if k != "failed_by_did"},
        "complete": complete,
        "exit_status": measured_exit,
        "profiled": profile is not None,
        "workdir": str(workdir),
    }
    if mode == "list":
        result["pages_per_s"] = requests["pds"] / measured["seconds"]
    if profile is not None:
        result["profile"] = str(profile_path)
    if net.latency > 0:
        latent = requests["pds"] + requests["plc"]
        ideal = latent * net.latency / WORKERS
        result["bound"] = {
            "latent_requests": latent,
            "ideal_seconds": ideal,
            "ratio": ideal / measured["seconds"],
        }
    return result


# -- the bare clients ---------------------------------------------------------------------------------------


def client_command(kind: str, simnet: SimnetProcess, mode: str, keep_going: bool = False) -> list[str]:
    """The command line of bare client ``kind`` (``node`` or ``python``)."""
    common = [
        "--urls",
        str(simnet.port_file),
        "--collection",
        COLLECTION,
        "--workers",
        str(WORKERS),
        "--discovery-page-size",
        str(DISCOVERY_PAGE_SIZE),
    ]
    if kind == "node":
        node = shutil.which("node")
        assert node is not None
        return [node, str(BARE_MJS), *common, "--mode", mode, *(["--keep-going"] if keep_going else [])]
    assert mode == "list"
    return [sys.executable, "-m", "bench.bare", *common]


def run_client(
    kind: str, net: Network, simnet: SimnetProcess, mode: str = "list", *, keep_going: bool = False
) -> dict[str, Any]:
    """One pass of bare client ``kind`` in its own process (``keep_going``: the Node client skips the DIDs
    whose requests fail, for warm-ups of the hostile network)."""
    simnet.control("/reset")
    simnet_process = psutil.Process(simnet.pid)
    simnet_cpu = cpu_seconds(simnet_process)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    machine_before = MachineCpu.take([simnet.pid])
    out = subprocess.run(
        client_command(kind, simnet, mode, keep_going),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=CLIENT_DEADLINE,
    )
    if out.returncode != 0:
        raise RuntimeError(f"the {kind} client exited with {out.returncode}:\n{out.stderr[-4000:]}")
    ended = resource.getrusage(resource.RUSAGE_CHILDREN)
    child_cpu = (ended.ru_utime - children.ru_utime) + (ended.ru_stime - children.ru_stime)
    load = MachineCpu.take([simnet.pid]).since(machine_before, extra_ours=child_cpu)
    bare: dict[str, Any] = json.loads(out.stdout)
    bare.setdefault("client", kind)
    bare.setdefault("requests", bare["relay_requests"] + bare["plc_requests"] + bare["pages"])
    bare.update(
        mode=mode,
        records_per_s=bare["records"] / bare["seconds"],
        pages_per_s=bare["pages"] / bare["seconds"],
        cpu_seconds_per_100k_records=bare["cpu_seconds"] * 100_000 / max(bare["records"], 1),
        simnet_cpu_seconds=cpu_seconds(simnet_process) - simnet_cpu,
        served=simnet.request_counts(),
        load=load,
    )
    if net.latency > 0:
        latent = bare["pages"] + bare["plc_requests"]
        ideal = latent * net.latency / WORKERS
        bare["bound"] = {"latent_requests": latent, "ideal_seconds": ideal, "ratio": ideal / bare["seconds"]}
    return bare


# -- one network --------------------------------------------------------------------------------------------


def start_simnet(net: Network, workdir: Path, modes: Sequence[str]) -> SimnetProcess:
    page_cache_mib = max(64, net.total_records * PAGE_BYTES_PER_RECORD // MIB + 64)
    repo_cache_mib = (
        max(64, net.total_records * REPO_BYTES_PER_RECORD // MIB + 64) if "verified" in modes else 64
    )
    extra: list[str] = []
    for name, count, params in net.hostile:
        extra += ["--behaviour", format_behaviour(name, count, params)]
    return SimnetProcess(
        workdir / "simnet",
        accounts=net.accounts,
        records=net.records,
        hosts=net.hosts,
        collections=[COLLECTION],
        latency=net.latency,
        plc_latency=net.latency,
        page_cache_mib=page_cache_mib,
        repo_cache_mib=repo_cache_mib,
        extra_args=extra,
        module="bench.hostile" if net.hostile else "daemon.simnet",
    )


def best(runs: list[dict[str, Any]], *, key: str, lowest: bool) -> dict[str, Any]:
    """The best pass (profiled daemon runs only when there is no other)."""
    pool = [r for r in runs if not r.get("profiled")] or runs
    return (min if lowest else max)(pool, key=lambda r: r[key])


def run_network(
    leg: Leg,
    workroot: Path,
    *,
    roots: Sequence[Path],
    consume: bool,
    profile: str | None,
    profile_idle: bool,
    repeat: int | None,
    node: bool,
) -> dict[str, Any]:
    """Warm-up, client passes and daemon runs on one network; its results."""
    net = leg.network
    workdir = workroot / net.key
    simnet = start_simnet(net, workdir, leg.modes)
    say = f"[{net.key}]"
    daemon_runs: dict[tuple[str, str], list[dict[str, Any]]] = {
        (str(root), mode): [] for root in roots for mode in leg.modes
    }
    clients = ((["node"] if node else []) + ["python"]) if leg.clients else []
    client_runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in clients}
    warmups: list[dict[str, Any]] = []
    with simnet:
        print(f"{say} {net.title}: simnet up (pid {simnet.pid}); modes {', '.join(leg.modes)}", flush=True)
        expected: dict[str, dict[str, Any]] = {}
        for mode in leg.modes:
            if net.hostile:
                answer = simnet.expected(mode=mode)
                expected[mode] = {
                    "records": len(answer["records"]),
                    "failed": len(answer["failed"]),
                    "failed_codes": dict(sorted(Counter(code for _, _, code in answer["failed"]).items())),
                    "failed_by_did": {did: code for did, _, code in answer["failed"]},
                }
            else:
                expected[mode] = {"records": net.total_records, "failed": 0}
        # Warm-up: every page rendered (and every repo built) once, so that measured passes only serve.
        # Only the Node client can skip hostile accounts; without Node a hostile network is not warmed.
        warm: list[tuple[str, str]] = []
        if node:
            warm = [("node", "list")] + ([("node", "warm-repos")] if "verified" in leg.modes else [])
        elif not net.hostile:
            warm = [("python", "list")]
        for kind, mode in warm:
            warmup = run_client(kind, net, simnet, mode, keep_going=bool(net.hostile))
            warmups.append(warmup)
            print(f"{say} warm-up ({kind}, {mode}): {warmup['seconds']:.2f} s", flush=True)

        def clients_pass() -> None:
            for kind in clients:
                bare = run_client(kind, net, simnet)
                client_runs[kind].append(bare)
                print(
                    f"{say} {kind} client: {bare['records']:,} records in {bare['seconds']:.2f} s "
                    f"({bare['records_per_s']:,.0f} records/s)",
                    flush=True,
                )

        clients_pass()
        for index in range(repeat or net.repeat):
            for number, root in enumerate(roots):
                for mode in leg.modes:
                    run = run_daemon(
                        net,
                        mode,
                        simnet,
                        workdir / f"daemon-{mode}-{index}-{number}",
                        root=root,
                        consume=consume,
                        profile=profile if index == 0 else None,
                        profile_idle=profile_idle,
                        expected=expected[mode],
                    )
                    daemon_runs[(str(root), mode)].append(run)
                    print(
                        f"{say} daemon {mode} ({root}): {run['records']:,} records in {run['seconds']:.2f} s "
                        f"({run['records_per_s']:,.0f} records/s), peak RSS {run['peak_rss_bytes'] / MIB:.1f} MiB"
                        + ("" if run["complete"] else f"; INCOMPLETE: {incomplete(run)}"),
                        flush=True,
                    )
            clients_pass()
    best_clients = {
        kind: best(runs, key="records_per_s", lowest=False) for kind, runs in client_runs.items() if runs
    }
    variants: dict[str, dict[str, Any]] = {}
    for root in roots:
        by_mode: dict[str, Any] = {}
        for mode in leg.modes:
            runs = daemon_runs[(str(root), mode)]
            daemon = best(runs, key="seconds", lowest=True)
            entry: dict[str, Any] = {"daemon": daemon, "runs": runs, "ratios": {}}
            for kind, bare in best_clients.items():
                entry["ratios"][f"records_per_s_to_{kind}"] = daemon["records_per_s"] / bare["records_per_s"]
                if mode == "list":
                    entry["ratios"][f"pages_per_s_to_{kind}"] = daemon["pages_per_s"] / bare["pages_per_s"]
            by_mode[mode] = entry
        if "list" in by_mode and "verified" in by_mode:
            ratio = (
                by_mode["verified"]["daemon"]["records_per_s"] / by_mode["list"]["daemon"]["records_per_s"]
            )
            by_mode["verified"]["ratios"]["records_per_s_to_list"] = ratio
        variants[str(root)] = by_mode
    return {
        "network": {**asdict(net), "all_accounts": net.all_accounts, "total_records": net.total_records},
        "scenarios": leg.scenarios,
        "modes": leg.modes,
        "configs": {mode: daemon_config(net, mode, {}) for mode in leg.modes},
        "simnet_command": f"python -m {simnet.module} " + shlex.join(simnet.args),
        "expected": {
            mode: {k: v for k, v in e.items() if k != "failed_by_did"} for mode, e in expected.items()
        },
        "warmups": warmups,
        "clients": best_clients,
        "client_runs": client_runs,
        "daemon": variants[str(roots[0])],
        **({"variants": variants} if len(variants) > 1 else {}),
    }


# -- targets and the report ---------------------------------------------------------------------------------


def _target(
    scenario: str,
    what: str,
    value: float | None,
    *,
    floor: float,
    aim: float | None = None,
    at_most: bool = False,
    unit: str = "",
    note: str = "",
) -> dict[str, Any]:
    if value is None:
        status = "not measured"
    else:
        ok = value <= floor if at_most else value >= floor
        status = "met" if ok else "not met"
        if ok and aim is not None:
            status += " (aim met)" if (value <= aim if at_most else value >= aim) else " (aim not met)"
    return {
        "scenario": scenario,
        "target": what,
        "value": value,
        "measured": ""
        if value is None
        else (f"{value:.0f}" if at_most and unit == "" else f"{value:.3f}") + unit,
        "threshold": ("<= " if at_most else ">= ") + f"{floor:g}{unit}",
        "aim": None if aim is None else ("<= " if at_most else ">= ") + f"{aim:g}{unit}",
        "status": status,
        "note": note,
    }


def targets(document: dict[str, Any], chosen: Sequence[str]) -> list[dict[str, Any]]:
    """Every target of issue 12 that the chosen scenarios measure, met or not (the first daemon root)."""
    nets = document["networks"]

    def daemon(key: str, mode: str) -> dict[str, Any] | None:
        entry = nets.get(key, {}).get("daemon", {}).get(mode)
        return None if entry is None else entry

    out: list[dict[str, Any]] = []
    for key, name, floor, aim in (("A", "a", 0.35, 0.5), ("C", "c", 0.3, None)):
        if name not in chosen:
            continue
        entry = daemon(key, "list")
        value = None if entry is None else entry["ratios"].get("records_per_s_to_node")
        out.append(
            _target(
                name,
                "daemon / Node client, records/s (list mode)",
                value,
                floor=floor,
                aim=aim,
                unit="x",
                note="" if value is not None else "no Node client (node not on PATH)",
            )
        )
    if "b" in chosen and (entry := daemon("B", "list")) is not None:
        out.append(
            _target(
                "b",
                "daemon / latency bound (list mode, 50 ms)",
                entry["daemon"]["bound"]["ratio"],
                floor=0.85,
                aim=0.95,
                note="; ".join(
                    f"{kind} client at {bare['bound']['ratio']:.3f} of the bound"
                    for kind, bare in nets["B"]["clients"].items()
                ),
            )
        )
    if "d" in chosen:
        for key in ("A", "C"):
            entry = daemon(key, "verified")
            value = None if entry is None else entry["ratios"].get("records_per_s_to_list")
            out.append(
                _target("d", f"verified / list mode, records/s, network {key}", value, floor=0.8, unit="x")
            )
    if "e" in chosen or any(name in chosen for name in ("a", "c", "d")):
        peaks = [
            (key, mode, entry["daemon"]["peak_rss_bytes"])
            for key, net in nets.items()
            if key != "H"
            for mode, entry in net["daemon"].items()
        ]
        if peaks:
            key, mode, peak = max(peaks, key=lambda p: p[2])
            out.append(
                _target(
                    "e",
                    "peak RSS of every run (largest), MB",
                    peak / MB,
                    floor=100,
                    at_most=True,
                    note=f"network {key}, {mode} mode",
                )
            )
        for mode in MODES:
            a, c = daemon("A", mode), daemon("C", mode)
            if a is not None and c is not None:
                ratio = c["daemon"]["peak_rss_bytes"] / a["daemon"]["peak_rss_bytes"]
                out.append(
                    _target(
                        "e",
                        f"peak RSS flat in jobs and records: C / A ({mode} mode)",
                        ratio,
                        floor=1.2,
                        at_most=True,
                        unit="x",
                        note="C has 10x the jobs and 2.5x the records of A",
                    )
                )
        if "H" in nets:
            for mode in nets["H"]["modes"]:
                entry = daemon("H", mode)
                if entry is None:
                    continue
                note = ", ".join(sorted({format_behaviour(*h) for h in nets["H"]["network"]["hostile"]}))
                if not entry["daemon"]["complete"]:
                    note += "; outcomes differ from a correct daemon's: " + incomplete(entry["daemon"])
                out.append(
                    _target(
                        "e",
                        f"peak RSS under hostile bodies ({mode} mode), MB",
                        entry["daemon"]["peak_rss_bytes"] / MB,
                        floor=300,
                        at_most=True,
                        note=note,
                    )
                )
    out.sort(key=lambda t: t["scenario"])
    return out


def incomplete(run: dict[str, Any]) -> str:
    """What a daemon run did otherwise than a correct daemon would (empty when nothing)."""
    expected = run["expected"]
    parts = []
    if run["records"] != expected["records"]:
        parts.append(f"{run['records']:,} records, expected {expected['records']:,}")
    failed = run["jobs"].get("failed", 0)
    if failed != expected["failed"]:
        parts.append(f"{failed} failed jobs, expected {expected['failed']}")
    if "failed_codes" in run:
        parts.append(f"failed by code {run['failed_codes']}, expected {expected['failed_codes']}")
        if run["unexpected_outcomes"]:
            parts.append(f"{len(run['unexpected_outcomes'])} pairs with another outcome than expected")
    return "; ".join(parts)


def _rss(run: dict[str, Any]) -> str:
    return f"{run['peak_rss_bytes'] / MIB:.1f} MiB"


def _load(run: dict[str, Any]) -> str:
    return f"{run['load']['other_tenants_cores_busy']:.2f}"


def render(document: dict[str, Any]) -> list[str]:
    """The report: machine, command, date; a row per pass kind; the targets."""
    m = document["machine"]
    lines = [
        f"backfilld benchmark, {document['date']}",
        f"machine: {m['hostname']}: {m['nproc']} cores ({m['cpu_model']}), {m['memory_total_mib'] / 1024:.0f} GiB RAM, "
        f"{m['platform']}, Python {m['python']}, Node {m.get('node') or 'not found'}; "
        f"load average at start {', '.join(f'{v:.2f}' for v in m['load_average_at_start'])}",
        f"command: {document['command']}",
    ]
    if document["quick"]:
        lines.append(
            "QUICK RUN: 1/10 of the accounts, one repetition: a smoke test of the harness, not a measurement"
        )
    lines.append("")
    for key, net in document["networks"].items():
        scenarios = ", ".join(f"({name})" for name in net["scenarios"])
        lines.append(f"network {key} {scenarios}: {net['network']['title']}, {WORKERS} workers")
    lines += [
        "",
        "| network | pass | seconds | records/s | pages/s or PDS req/s | PDS req / pair | CPU s / 100k records "
        "| peak RSS | vs Node | vs Python | other | other tenants (cores) | complete |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, net in document["networks"].items():
        label = key
        for kind, bare in net["clients"].items():
            bound = f"bound {bare['bound']['ratio']:.3f}" if "bound" in bare else ""
            lines.append(
                f"| {label} | {kind} client (best of {len(net['client_runs'][kind])}) | {bare['seconds']:.2f} | "
                f"{bare['records_per_s']:,.0f} | {bare['pages_per_s']:,.1f} | {bare['pages'] / net['network']['all_accounts']:.2f} | "
                f"{bare['cpu_seconds_per_100k_records']:.2f} | {(bare['peak_rss_bytes'] or 0) / MIB:.0f} MiB (client) | | | {bound} | "
                f"{_load(bare)} | |"
            )
        for root, by_mode in (net.get("variants") or {"": net["daemon"]}).items():
            for mode, entry in by_mode.items():
                d, ratios = entry["daemon"], entry["ratios"]
                other = []
                if "bound" in d:
                    other.append(f"bound {d['bound']['ratio']:.3f}")
                if "records_per_s_to_list" in ratios:
                    other.append(f"{ratios['records_per_s_to_list']:.2f}x list")
                if d["simnet_repo_builds"]:
                    other.append(f"{d['simnet_repo_builds']} repo builds")
                node = ratios.get("records_per_s_to_node")
                python = ratios.get("records_per_s_to_python")
                main = d["cpu_main_thread_seconds"] / max(d["cpu_seconds"], 1e-9)
                lines.append(
                    f"| {label} | daemon {mode}{' ' + root if root else ''} (best of {len(entry['runs'])}) | "
                    f"{d['seconds']:.2f} | {d['records_per_s']:,.0f} | {d['pds_requests_per_s']:,.1f} | "
                    f"{d['pds_requests_per_pair']:.2f} | {d['cpu_seconds_per_100k_records']:.2f} ({main:.0%} main) | "
                    f"{_rss(d)} (idle {d['idle_rss_bytes'] / MIB:.0f}) | "
                    f"{'' if node is None else f'{node:.2f}x'} | {'' if python is None else f'{python:.2f}x'} | "
                    f"{'; '.join(other)} | {_load(d)} | {'yes' if d['complete'] else 'NO'} |"
                )
    lines += [
        "",
        "| scenario | target | measured | threshold | aim | result | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in document["targets"]:
        value = t.get("measured", "" if t["value"] is None else f"{t['value']:.3g}")
        lines.append(
            f"| ({t['scenario']}) | {t['target']} | {value} | {t['threshold']} | {t['aim'] or ''} | "
            f"{t['status']} | {t['note']} |"
        )
    return lines


def node_version() -> str | None:
    node = shutil.which("node")
    if node is None:
        return None
    try:
        return subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: Sequence[str] | None = None) -> int:
    from bench.hostile import parse_behaviour

    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument(
        "scenarios",
        nargs="*",
        default=list(DEFAULT_SCENARIOS),
        help="a, b, c, d, e, b200 (default: a b c d e)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="1/10 of the accounts, one repetition: a smoke test"
    )
    parser.add_argument(
        "--repeat", type=int, help="daemon runs per mode and network (default: A 2, others 1)"
    )
    parser.add_argument("--no-consumer", action="store_true", help="no acking consumer during the run")
    parser.add_argument(
        "--profile", choices=("pyinstrument", "py-spy"), help="profile the first daemon run of each mode"
    )
    parser.add_argument("--profile-idle", action="store_true", help="py-spy: keep idle samples too (--idle)")
    parser.add_argument(
        "--hostile-body",
        type=parse_behaviour,
        action="append",
        default=[],
        metavar="NAME=COUNT[,KEY=VALUE...]",
        help="more hostile accounts for scenario e (a simulated network behaviour and its parameters)",
    )
    parser.add_argument(
        "--daemon-root",
        type=Path,
        action="append",
        help="a checkout whose daemon package to run (repeat to compare versions; default: this one)",
    )
    parser.add_argument("--out", type=Path, help="result file (default: bench/results/<date-time>.json)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, profiles)")
    parser.add_argument(
        "--report", type=Path, metavar="FILE", help="print the table of a saved result and exit"
    )
    args = parser.parse_args(argv)
    if args.report is not None:
        print("\n".join(render(json.loads(args.report.read_text()))))
        return 0
    unknown = [name for name in args.scenarios if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    now = datetime.datetime.now(datetime.UTC)
    node = node_version()
    document: dict[str, Any] = {
        "date": now.isoformat(timespec="seconds"),
        "command": "python -m bench.run " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": {**machine(), "node": node},
        "quick": args.quick,
        "consumer": not args.no_consumer,
        "scenarios_chosen": args.scenarios,
        "networks": {},
    }
    if node is None:
        print("node not found on PATH: the Node client is left out, targets (a) and (c) are not measured")
    workroot = Path(tempfile.mkdtemp(prefix="backfilld-bench-"))
    try:
        for leg in plan(args.scenarios, quick=args.quick, extra_hostile=args.hostile_body):
            document["networks"][leg.network.key] = run_network(
                leg,
                workroot,
                roots=[root.resolve() for root in args.daemon_root or [ROOT]],
                consume=not args.no_consumer,
                profile=args.profile,
                profile_idle=args.profile_idle,
                repeat=args.repeat,
                node=node is not None,
            )
        document["targets"] = targets(document, args.scenarios)
        print("\n" + "\n".join(render(document)), flush=True)
    finally:
        if args.keep:
            print(f"work directory kept: {workroot}")
        else:
            shutil.rmtree(workroot, ignore_errors=True)
        out = args.out or RESULTS / f"{now.strftime('%Y-%m-%dT%H%M%SZ')}{'-quick' if args.quick else ''}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(document, indent=2) + "\n")
        tmp.replace(out)
        print(f"saved {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
