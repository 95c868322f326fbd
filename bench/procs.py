"""The processes a benchmark scenario runs: the simulated network and the real daemon, each on its own.

Both are started as ``python -m ...`` children of the bench process, on loopback, and stopped with SIGTERM
(SIGKILL after a grace period). The daemon gets a fresh temporary directory with its own config, database
and admin token for every scenario.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from tests.daemonproc import free_port, write_config

TOKEN = "bench-token-0123456789abcdef"
ROOT = Path(__file__).resolve().parents[1]


def _stop(proc: subprocess.Popen[bytes], grace: float) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


class SimnetProcess:
    """``python -m daemon.simnet`` in its own process; ``urls`` is what it wrote to its port file.

    ``module`` is what runs (``bench.hostile`` for a network with parametrised hostile accounts, which takes
    the same options and ``extra_args`` of its own); ``repo_cache_mib`` sizes the cache of signed repos
    (verified mode), ``page_cache_mib`` the cache of rendered listRecords pages.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        accounts: int,
        records: int,
        hosts: int,
        collections: Sequence[str],
        latency: float = 0.0,
        plc_latency: float = 0.0,
        page_cache_mib: int = 64,
        repo_cache_mib: int = 256,
        extra_args: Sequence[str] = (),
        module: str = "daemon.simnet",
    ) -> None:
        self.workdir = workdir
        self.port_file = workdir / "simnet.json"
        self.log_path = workdir / "simnet.log"
        self.args = [
            "--accounts",
            str(accounts),
            "--records",
            str(records),
            "--hosts",
            str(hosts),
            "--collections",
            ",".join(collections),
            "--latency",
            repr(latency),
            "--plc-latency",
            repr(plc_latency),
            "--page-cache-mib",
            str(page_cache_mib),
            "--repo-cache-mib",
            str(repo_cache_mib),
            "--port-file",
            str(self.port_file),
            *extra_args,
        ]
        self.module = module
        self.proc: subprocess.Popen[bytes] | None = None
        self.urls: dict[str, Any] = {}

    def __enter__(self) -> SimnetProcess:
        workdir = self.workdir
        workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, *self.args],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 120.0
        while not self.port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"simnet exited with {self.proc.returncode}: {self.log_path.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError("simnet did not write its port file within 120 s")
            time.sleep(0.05)
        self.urls = json.loads(self.port_file.read_text())
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc is not None:
            _stop(self.proc, 10.0)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def control(self, path: str) -> dict[str, Any]:
        """``GET {control_url}{path}`` (``/stats`` or ``/reset``)."""
        response = httpx.get(self.urls["control_url"] + path, timeout=30.0)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def pds_requests(self) -> int:
        """listRecords requests served by every PDS host since the last reset."""
        stats = self.control("/stats")
        return sum(int(stats[url]["requests"]) for url in self.urls["pds_urls"])

    def request_counts(self) -> dict[str, Any]:
        """Requests served since the last reset, by origin kind (relay, plc, pds), and the PDS hosts'
        answers by status (``pds_statuses``)."""
        stats = self.control("/stats")
        statuses: dict[str, int] = {}
        for url in self.urls["pds_urls"]:
            for status, count in stats[url]["statuses"].items():
                statuses[status] = statuses.get(status, 0) + int(count)
        return {
            "relay": int(stats[self.urls["relay_url"]]["requests"]),
            "plc": int(stats[self.urls["plc_url"]]["requests"]),
            "pds": sum(int(stats[url]["requests"]) for url in self.urls["pds_urls"]),
            "pds_statuses": dict(sorted(statuses.items())),
        }

    def repos(self) -> dict[str, Any]:
        """The network's repo build counters (``GET /repos``): builds cost the network CPU."""
        return self.control("/repos")

    def expected(self, **limits: object) -> dict[str, Any]:
        """What a correct daemon ends up with under ``limits`` (``GET /expected``, e.g. ``mode="list"``)."""
        query = "&".join(f"{key}={value}" for key, value in limits.items())
        return self.control(f"/expected?{query}")


class DaemonProcess:
    """``python -m daemon run --config <temp config>`` with its own database, token and admin port.

    ``root`` is the checkout whose ``daemon`` package runs (put first on ``PYTHONPATH``), so that two
    versions of the daemon can be compared against the same simulated network.
    """

    def __init__(self, workdir: Path, sections: dict[str, dict[str, object]], root: Path = ROOT) -> None:
        self.workdir = workdir
        self.root = root
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        sections = {name: dict(values) for name, values in sections.items()}
        sections.setdefault("daemon", {}).setdefault("database", "data/backfilld.sqlite3")
        sections.setdefault("admin", {}).update(listen=f"127.0.0.1:{self.port}", token_file="admin.token")
        self.config = write_config(workdir / "config.toml", sections)
        (workdir / "admin.token").write_text(TOKEN + "\n")
        self.log_path = workdir / "daemon.log"
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, python: Sequence[str] = (sys.executable,)) -> DaemonProcess:
        """Start the daemon and wait until it is healthy.

        ``python`` is the command that runs ``-m daemon``: the interpreter, or a profiler that takes ``-m``.
        """
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "BACKFILLD_ADMIN_TOKEN")}
        env["PYTHONPATH"] = str(self.root)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*python, "-m", "daemon", "run", "--config", str(self.config)],
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.logs()[-4000:]}")
            try:
                if httpx.get(self.base + "/healthz", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"daemon not healthy after 60 s:\n{self.logs()[-4000:]}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit status."""
        if self.proc is None:
            return None
        return _stop(self.proc, grace)
