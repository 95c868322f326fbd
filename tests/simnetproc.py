"""The simulated network in a separate process (``python -m daemon.simnet``), for tests of the real daemon.

Besides starting and stopping it, the helpers drive its control endpoint: :func:`mutate` changes an
account's records (a new commit), :func:`current_spec` reads back the spec it serves (mutations included),
so that every expectation function works on it, and :func:`expected` asks the process itself.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from daemon.simnet import HostOptions, NetworkSpec, build_spec, resolve_web_dids
from daemon.simnet.control import spec_from_json

ROOT = Path(__file__).resolve().parents[1]


def _control_url(info: Mapping[str, Any]) -> str:
    return str(info["control_url"])


def mutate(
    info: Mapping[str, Any],
    did: str,
    collection: str,
    *,
    update: Sequence[int] = (),
    delete: Sequence[int] = (),
    create: int = 0,
    empty: bool = False,
    recreate: Sequence[int] = (),
) -> dict[str, Any]:
    """``POST /mutate``: change the records of ``did`` in ``collection`` (see ``daemon.simnet.Mutation``);
    returns ``{"did", "generation", "rev"}``."""
    body = {
        "did": did,
        "collection": collection,
        "update": list(update),
        "delete": list(delete),
        "create": create,
        "empty": empty,
        "recreate": list(recreate),
    }
    response = httpx.post(_control_url(info) + "/mutate", json=body, timeout=30)
    if response.status_code != 200:
        raise AssertionError(f"mutation refused: {response.text}")
    result: dict[str, Any] = response.json()
    return result


def current_spec(info: Mapping[str, Any]) -> NetworkSpec:
    """The spec the process serves now (did:web DIDs resolved, every mutation applied)."""
    return spec_from_json(httpx.get(_control_url(info) + "/spec", timeout=30).json())


def expected(
    info: Mapping[str, Any],
    *,
    dids: Sequence[str] | None = None,
    collections: Sequence[str] | None = None,
    values: bool = False,
    **limits: object,
) -> dict[str, Any]:
    """``GET /expected``: ``{"records": [[did, collection, rkey, cid], ...], "failed": [[did, collection,
    code], ...]}`` for the ``DaemonLimits`` fields in ``limits`` (``mode="list"``, ``page_size=50``, ...)."""
    params: list[tuple[str, str | int | float | bool | None]] = [(k, str(v)) for k, v in limits.items()]
    params += [("did", did) for did in dids or ()]
    params += [("collection", collection) for collection in collections or ()]
    if values:
        params.append(("values", "1"))
    response = httpx.get(_control_url(info) + "/expected", params=params, timeout=60)
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


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

    def repos(self) -> dict[str, Any]:
        """The repo build counters (repos and records built, seconds spent, cache use)."""
        result: dict[str, Any] = httpx.get(self.info["control_url"] + "/repos", timeout=10).json()
        return result

    def mutate(self, did: str, collection: str, **changes: Any) -> dict[str, Any]:
        """:func:`mutate` on this process."""
        return mutate(self.info, did, collection, **changes)

    def spec(self) -> NetworkSpec:
        """:func:`current_spec` of this process."""
        return current_spec(self.info)

    def expected(self, **kwargs: Any) -> dict[str, Any]:
        """:func:`expected` of this process."""
        return expected(self.info, **kwargs)

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
    rate_limit: tuple[int, int] | None = None,
    repo_rate_limit: tuple[int, int] | None = None,
    get_blocks: bool = True,
) -> Iterator[tuple[dict[str, Any], NetworkSpec]]:
    """Serve ``build_spec(...)``; yields its URLs and the spec it serves, did:web DIDs resolved.

    ``rate_limit``/``repo_rate_limit`` (requests, window seconds) and ``get_blocks=False`` apply to every
    PDS host. After a :func:`mutate`, :func:`current_spec` gives the spec served from then on.
    """
    args = [
        f"--accounts={accounts}",
        f"--records={records}",
        f"--hosts={hosts}",
        f"--collections={','.join(collections)}",
        f"--web-accounts={web_accounts}",
        f"--latency={latency}",
    ]
    args += [f"--hostile={name}={count}" for name, count in (hostile or {}).items()]
    if rate_limit is not None:
        args.append(f"--rate-limit={rate_limit[0]}/{rate_limit[1]}")
    if repo_rate_limit is not None:
        args.append(f"--repo-rate-limit={repo_rate_limit[0]}/{repo_rate_limit[1]}")
    if not get_blocks:
        args.append("--no-get-blocks")
    options = None
    if rate_limit is not None or repo_rate_limit is not None or not get_blocks:
        options = HostOptions(get_blocks=get_blocks, rate_limit=rate_limit, repo_rate_limit=repo_rate_limit)
    net = SimnetProcess(workdir, args)
    try:
        spec = build_spec(
            accounts,
            records,
            collections,
            hosts,
            hostile or {},
            web_accounts=web_accounts,
            latency=latency,
            host_options=options,
        )
        yield net.info, resolve_web_dids(spec, net.info["web_dids"])
    finally:
        net.stop()
