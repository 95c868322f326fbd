"""The simulated network in a separate process (``python -m daemon.simnet``), for tests of the real daemon."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from daemon.simnet import NetworkSpec, build_spec, resolve_web_dids

ROOT = Path(__file__).resolve().parents[1]


class SimnetProcess:
    """``python -m daemon.simnet ARGS`` in a child process; ``info`` is its port file (URLs, pid)."""

    def __init__(self, workdir: Path, args: Sequence[str]) -> None:
        self.port_file = workdir / "simnet.json"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.simnet", *args, f"--port-file={self.port_file}"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 30
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the simulated network did not start: {self.proc.stderr.read()!r}")  # type: ignore[union-attr]
            time.sleep(0.05)
        self.info: dict[str, Any] = json.loads(self.port_file.read_text())

    def stats(self) -> dict[str, Any]:
        """Every origin's request counters, by URL."""
        result: dict[str, Any] = httpx.get(self.info["control_url"] + "/stats", timeout=10).json()
        return result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)


@contextmanager
def simnet_process(
    workdir: Path,
    *,
    accounts: int,
    records: int,
    hosts: int,
    collections: list[str],
    hostile: dict[str, int] | None = None,
    web_accounts: int = 0,
    latency: float = 0.0,
) -> Iterator[tuple[dict[str, Any], NetworkSpec]]:
    """Serve ``build_spec(...)``; yields its URLs and the spec it serves, did:web DIDs resolved."""
    args = [
        f"--accounts={accounts}",
        f"--records={records}",
        f"--hosts={hosts}",
        f"--collections={','.join(collections)}",
        f"--web-accounts={web_accounts}",
        f"--latency={latency}",
    ]
    args += [f"--hostile={name}={count}" for name, count in (hostile or {}).items()]
    net = SimnetProcess(workdir, args)
    try:
        spec = build_spec(
            accounts, records, collections, hosts, hostile or {}, web_accounts=web_accounts, latency=latency
        )
        yield net.info, resolve_web_dids(spec, net.info["web_dids"])
    finally:
        net.stop()
