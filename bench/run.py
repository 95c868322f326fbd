"""``make bench``: the real daemon process against the simulated network, each in its own process.

For every scenario: start ``python -m daemon.simnet`` (one process); run the bare client
(``python -m bench.bare``: trio + httpx, same concurrency, same pages) as the network's ceiling; then, per
repetition, start ``python -m daemon run --config <temp config>`` (a fresh process and database),
``POST /_admin/backfill {}`` (discovery mode) and poll ``/_admin/runs/<id>`` every 100 ms until the run is
finished, while an acking consumer drains the records queue and the daemon's RSS is sampled every 50 ms;
then the bare client again. Results are printed and saved as JSON under ``bench/results/``.
See ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import psutil
import trio

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
POLL_INTERVAL = 0.1
CONSUMER_BATCH = 1000
DISCOVERY_PAGE_SIZE = 1000


@dataclass(frozen=True, slots=True)
class Scenario:
    """One benchmark: ``accounts`` x ``records`` in one collection over ``hosts`` PDS hosts, ``latency``
    seconds added to every PDS and PLC answer, ``workers`` daemon workers (and bare-client tasks),
    ``repeat`` daemon runs by default."""

    name: str
    title: str
    accounts: int
    records: int
    hosts: int
    workers: int
    latency: float
    repeat: int

    @property
    def total_records(self) -> int:
        return self.accounts * self.records


SCENARIOS: dict[str, Scenario] = {
    "a": Scenario("a", "zero latency, 1,000 accounts x 400 records, 4 hosts", 1000, 400, 4, 16, 0.0, 2),
    "b": Scenario("b", "50 ms per request, 300 accounts x 400 records, 4 hosts", 300, 400, 4, 16, 0.05, 1),
    "b200": Scenario(
        "b200", "200 ms per request, 96 accounts x 400 records, 4 hosts", 96, 400, 4, 16, 0.2, 1
    ),
    "c": Scenario("c", "memory: 10,000 accounts x 100 records (1M), 4 hosts", 10_000, 100, 4, 16, 0.0, 1),
}


def quick(scenario: Scenario) -> Scenario:
    """A scaled-down scenario (``--quick``): a smoke test of the harness, not a measurement."""
    return replace(
        scenario, title=scenario.title + " [quick: 1/10 of the accounts]", accounts=scenario.accounts // 10
    )


def daemon_config(scenario: Scenario, urls: dict[str, Any]) -> dict[str, dict[str, object]]:
    """The bench config; docs/performance.md says why each value is what it is."""
    return {
        "daemon": {
            "workers": scenario.workers,
            "log_level": "warning",
            "log_format": "json",
            "max_records_queue": scenario.total_records + 1,
            "shutdown_grace": 10.0,
        },
        "atproto": {
            "collections": [COLLECTION],
            "relay": urls.get("relay_url", "http://simnet.invalid"),
            "plc_directory": urls.get("plc_url", "http://simnet.invalid"),
        },
        "limits": {
            "discovery_page_size": DISCOVERY_PAGE_SIZE,
            "max_discovered_dids": scenario.accounts,
            "max_discovery_pages_per_collection": 1000,
        },
        "network": {
            "allow_private_addresses": True,
            "per_host_rate": 0.0,
            "per_host_concurrency": scenario.workers,
        },
    }


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


async def drive_daemon(daemon: DaemonProcess, simnet_pid: int, consume: bool) -> dict[str, Any]:
    """POST a discovery run and poll it to the end; the daemon process's CPU, RSS and timings."""
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
    return {
        "run": run,
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


def profiler(kind: str | None, daemon: DaemonProcess, path: Path) -> subprocess.Popen[bytes] | None:
    """Attach py-spy to the running daemon (stopped with SIGINT, which makes it write ``path``)."""
    if kind != "py-spy":
        return None
    spy = subprocess.Popen(
        [
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
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)
    return spy


def run_daemon(
    scenario: Scenario,
    simnet: SimnetProcess,
    workdir: Path,
    *,
    root: Path,
    consume: bool,
    profile: str | None,
) -> dict[str, Any]:
    """One fresh daemon process and database (the ``daemon`` package of ``root``), one discovery run."""
    simnet.control("/reset")
    daemon = DaemonProcess(workdir, daemon_config(scenario, simnet.urls), root)
    python: Sequence[str] = (sys.executable,)
    profile_path = workdir / f"profile-{profile}.txt"
    if profile == "pyinstrument":
        python = (str(Path(sys.executable).with_name("pyinstrument")), "-r", "text", "-o", str(profile_path))
    daemon.start(python)
    spy = profiler(profile, daemon, profile_path)
    try:
        simnet_process = psutil.Process(simnet.pid)
        simnet_cpu = cpu_seconds(simnet_process)
        measured = trio.run(drive_daemon, daemon, simnet.pid, consume)
        measured["simnet_cpu_seconds"] = cpu_seconds(simnet_process) - simnet_cpu
        measured["requests"] = simnet.request_counts()
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
    finally:
        measured_exit = daemon.stop()
    run = measured.pop("run")
    records, pages = run["records_enqueued"], measured["requests"]["pds"]
    result = {
        "daemon_root": str(root),
        "records": records,
        "pages": pages,
        "records_per_s": records / measured["seconds"],
        "pages_per_s": pages / measured["seconds"],
        "cpu_seconds_per_100k_records": measured["cpu_seconds"] * 100_000 / max(records, 1),
        **measured,
        "jobs": run["jobs"],
        "run_state": run["state"],
        "complete": records == scenario.total_records and run["jobs"]["done"] == scenario.accounts,
        "exit_status": measured_exit,
    }
    if profile is not None:
        result["profile"] = str(profile_path)
    if scenario.latency > 0:
        latent = measured["requests"]["pds"] + measured["requests"]["plc"]
        ideal = latent * scenario.latency / scenario.workers
        result["bound"] = {
            "latent_requests": latent,
            "ideal_seconds": ideal,
            "ratio": ideal / measured["seconds"],
        }
    return result


# -- the bare client ----------------------------------------------------------------------------------------


def run_bare(scenario: Scenario, simnet: SimnetProcess) -> dict[str, Any]:
    """One bare-client pass in its own process."""
    simnet.control("/reset")
    simnet_process = psutil.Process(simnet.pid)
    simnet_cpu = cpu_seconds(simnet_process)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    machine_before = MachineCpu.take([simnet.pid])
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.bare",
            "--urls",
            str(simnet.port_file),
            "--collection",
            COLLECTION,
            "--workers",
            str(scenario.workers),
            "--discovery-page-size",
            str(DISCOVERY_PAGE_SIZE),
        ],
        cwd=ROOT,
        capture_output=True,
        check=True,
        text=True,
    )
    ended = resource.getrusage(resource.RUSAGE_CHILDREN)
    child_cpu = (ended.ru_utime - children.ru_utime) + (ended.ru_stime - children.ru_stime)
    load = MachineCpu.take([simnet.pid]).since(machine_before, extra_ours=child_cpu)
    bare: dict[str, Any] = json.loads(out.stdout)
    bare.update(
        records_per_s=bare["records"] / bare["seconds"],
        pages_per_s=bare["pages"] / bare["seconds"],
        cpu_seconds_per_100k_records=bare["cpu_seconds"] * 100_000 / max(bare["records"], 1),
        simnet_cpu_seconds=cpu_seconds(simnet_process) - simnet_cpu,
        requests=simnet.request_counts(),
        load=load,
    )
    if scenario.latency > 0:
        latent = bare["pages"] + bare["plc_requests"]
        bare["bound"] = {"ratio": latent * scenario.latency / scenario.workers / bare["seconds"]}
    return bare


# -- a scenario ---------------------------------------------------------------------------------------------


def run_scenario(
    scenario: Scenario,
    workroot: Path,
    *,
    roots: Sequence[Path],
    consume: bool,
    profile: str | None,
    repeat: int | None,
) -> dict[str, Any]:
    """Bare pass, then per repetition one daemon run per root and a bare pass; the scenario's results.

    Other tenants of the (shared) machine can only slow a pass down, so each side's figures are its best
    pass: the daemon's fastest run per root, and the bare client's fastest pass as the ceiling.
    """
    workdir = workroot / scenario.name
    # Enough page cache for every page of the scenario: after the first pass the network only serves.
    cache_mib = max(64, scenario.total_records * 400 // MIB + 64)
    simnet = SimnetProcess(
        workdir / "simnet",
        accounts=scenario.accounts,
        records=scenario.records,
        hosts=scenario.hosts,
        collections=[COLLECTION],
        latency=scenario.latency,
        plc_latency=scenario.latency,
        page_cache_mib=cache_mib,
    )
    say = f"[{scenario.name}]"
    daemon_runs: dict[str, list[dict[str, Any]]] = {str(root): [] for root in roots}
    bare_runs: list[dict[str, Any]] = []
    with simnet:
        print(f"{say} simnet up (pid {simnet.pid})", flush=True)

        def bare_pass() -> None:
            bare = run_bare(scenario, simnet)
            bare_runs.append(bare)
            print(f"{say} bare client: {bare['records']:,} records in {bare['seconds']:.2f} s", flush=True)

        bare_pass()
        for index in range(repeat or scenario.repeat):
            for number, root in enumerate(roots):
                daemon = run_daemon(
                    scenario,
                    simnet,
                    workdir / f"daemon-{index}-{number}",
                    root=root,
                    consume=consume,
                    profile=profile if index == 0 else None,
                )
                daemon_runs[str(root)].append(daemon)
                print(
                    f"{say} daemon ({root}): {daemon['records']:,} records in {daemon['seconds']:.2f} s",
                    flush=True,
                )
            bare_pass()
    bare = max(bare_runs, key=lambda r: r["records_per_s"])
    variants = {}
    for root, runs in daemon_runs.items():
        daemon = min(runs, key=lambda r: r["seconds"])
        variants[root] = {
            "daemon": daemon,
            "ratio_records_per_s": daemon["records_per_s"] / bare["records_per_s"],
            "ratio_pages_per_s": daemon["pages_per_s"] / bare["pages_per_s"],
            "runs": runs,
        }
    first = variants[str(roots[0])]
    return {
        "scenario": asdict(scenario),
        "config": daemon_config(scenario, {}),
        "daemon": first["daemon"],
        "bare": bare,
        "ratio_records_per_s": first["ratio_records_per_s"],
        "ratio_pages_per_s": first["ratio_pages_per_s"],
        "daemon_runs": first["runs"],
        "bare_runs": bare_runs,
        **({"variants": variants} if len(variants) > 1 else {}),
    }


# -- the report ---------------------------------------------------------------------------------------------


def summarise(result: dict[str, Any]) -> list[str]:
    """The human-readable lines for one scenario."""
    s, b = result["scenario"], result["bare"]
    variants = result.get("variants") or {result["daemon"]["daemon_root"]: result}
    lines = [f"({s['name']}) {s['title']}, {s['workers']} workers"]
    for root, variant in variants.items():
        d = variant["daemon"]
        runs = len(variant.get("runs") or variant["daemon_runs"])
        label = f"daemon {root}" if len(variants) > 1 else "daemon"
        lines += [
            f"  {label}{' (best of ' + str(runs) + ')' if runs > 1 else ''}: {d['records']:,} records, "
            f"{d['pages']:,} pages in {d['seconds']:.2f} s = {d['records_per_s']:,.0f} records/s, "
            f"{d['pages_per_s']:,.1f} pages/s; {d['cpu_seconds_per_100k_records']:.2f} CPU s per 100k records "
            f"({d['cpu_main_thread_seconds'] / max(d['cpu_seconds'], 1e-9):.0%} on the main thread); "
            f"peak RSS {d['peak_rss_bytes'] / MIB:.1f} MiB (idle {d['idle_rss_bytes'] / MIB:.1f}); "
            f"complete: {d['complete']}",
            f"    ratio to the bare client: {variant['ratio_records_per_s']:.2f}x records/s; other tenants of "
            f"the machine: {d['load']['other_tenants_cores_busy']:.2f} cores busy meanwhile",
        ]
        if "bound" in d:
            bound = d["bound"]
            lines.append(
                f"    bound: {bound['latent_requests']:,} requests x {s['latency'] * 1000:.0f} ms / "
                f"{s['workers']} workers = {bound['ideal_seconds']:.2f} s; the daemon at {bound['ratio']:.3f} "
                "of the bound"
            )
        consumer = d["consumer"]
        if consumer["enabled"]:
            lines.append(
                f"    consumer: {consumer['consumed']:,} records acknowledged; queue drained "
                f"{consumer['drained_at_seconds']:.2f} s after the POST"
            )
    lines.append(
        f"  bare client (best of {len(result['bare_runs'])}): {b['records']:,} records in {b['seconds']:.2f} s = "
        f"{b['records_per_s']:,.0f} records/s, {b['pages_per_s']:,.1f} pages/s; "
        f"{b['cpu_seconds_per_100k_records']:.2f} CPU s per 100k records; other tenants: "
        f"{b['load']['other_tenants_cores_busy']:.2f} cores busy"
        + (f"; at {b['bound']['ratio']:.3f} of the bound" if "bound" in b else "")
    )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="*", default=list(SCENARIOS), help="a, b, b200, c (default: all)")
    parser.add_argument("--quick", action="store_true", help="1/10 of the accounts: a smoke test")
    parser.add_argument("--repeat", type=int, help="daemon runs per scenario (default: a 2, b 1, c 1)")
    parser.add_argument("--no-consumer", action="store_true", help="no acking consumer during the run")
    parser.add_argument("--profile", choices=("pyinstrument", "py-spy"), help="profile the first daemon run")
    parser.add_argument(
        "--daemon-root",
        type=Path,
        action="append",
        help="a checkout whose daemon package to run (repeat to compare versions; default: this one)",
    )
    parser.add_argument("--out", type=Path, help="result file (default: bench/results/<date-time>.json)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, profiles)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.scenarios if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    now = datetime.datetime.now(datetime.UTC)
    document: dict[str, Any] = {
        "date": now.isoformat(timespec="seconds"),
        "command": "python -m bench.run " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "consumer": not args.no_consumer,
        "scenarios": {},
    }
    workroot = Path(tempfile.mkdtemp(prefix="backfilld-bench-"))
    try:
        for name in args.scenarios:
            scenario = quick(SCENARIOS[name]) if args.quick else SCENARIOS[name]
            result = run_scenario(
                scenario,
                workroot,
                roots=[root.resolve() for root in args.daemon_root or [ROOT]],
                consume=not args.no_consumer,
                profile=args.profile,
                repeat=args.repeat,
            )
            document["scenarios"][name] = result
            print("\n".join(summarise(result)), flush=True)
        scenarios = document["scenarios"]
        if "a" in scenarios and "c" in scenarios:
            ratio = scenarios["c"]["daemon"]["peak_rss_bytes"] / scenarios["a"]["daemon"]["peak_rss_bytes"]
            document["peak_rss_c_over_a"] = ratio
            print(f"peak RSS (c) / (a): {ratio:.2f}")
    finally:
        if args.keep:
            print(f"work directory kept: {workroot}")
        else:
            shutil.rmtree(workroot, ignore_errors=True)
    out = args.out or RESULTS / f"{now.strftime('%Y-%m-%dT%H%M%SZ')}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"saved {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
