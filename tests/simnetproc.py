"""The simulated network in a separate process (``python -m daemon.simnet``), for tests of the real daemon."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from daemon.simnet import NetworkSpec, build_spec, resolve_web_dids


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
    """Serve the network; yields its URLs (the port file) and the spec it serves, did:web DIDs resolved."""
    port_file = workdir / "simnet.json"
    args = [
        sys.executable,
        "-m",
        "daemon.simnet",
        "--accounts",
        str(accounts),
        "--records",
        str(records),
        "--hosts",
        str(hosts),
        "--collections",
        ",".join(collections),
        "--web-accounts",
        str(web_accounts),
        "--latency",
        str(latency),
        "--port-file",
        str(port_file),
    ]
    for name, count in (hostile or {}).items():
        args += ["--hostile", f"{name}={count}"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"simnet did not start: {proc.stderr.read() if proc.stderr else ''!r}")
            time.sleep(0.05)
        info = json.loads(port_file.read_text())
        spec = build_spec(
            accounts, records, collections, hosts, hostile or {}, web_accounts=web_accounts, latency=latency
        )
        yield info, resolve_web_dids(spec, info["web_dids"])
    finally:
        proc.terminate()
        proc.wait(10)
