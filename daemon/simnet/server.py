"""Serving a :class:`~daemon.simnet.model.NetworkSpec` on loopback: one listener per origin.

The PLC directory, the relay, every PDS host, every did:web account and a control endpoint each get their
own ``127.0.0.1`` port (bound to port 0), so each PDS is a distinct origin for the daemon's per-host limits.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Final

import trio

from daemon.simnet.http11 import Origin, OriginStats, serve_connection
from daemon.simnet.model import (
    Account,
    NetworkSpec,
    resolve_web_dids,
    web_did_for_port,
)
from daemon.simnet.responses import (
    NOT_FOUND,
    Action,
    DidWebHandler,
    PageCache,
    PdsHandler,
    PlcHandler,
    RelayHandler,
    json_reply,
    parse_query,
)

DEFAULT_PAGE_CACHE_BYTES: Final = 64 * 1_048_576


class RunningNetwork:
    """A served network: its URLs, its (resolved) spec and the counters of every origin.

    ``spec`` is the served spec, with every did:web placeholder replaced by the real
    ``did:web:localhost%3A<port>`` DID (``web_dids`` maps placeholder to real). ``stats`` maps each origin
    URL (PLC, relay, PDS hosts, did:web hosts; not the control endpoint) to its :class:`OriginStats`.
    """

    def __init__(
        self,
        spec: NetworkSpec,
        *,
        plc: Origin,
        relay: Origin,
        pds: tuple[Origin, ...],
        web: Mapping[str, Origin],
        web_dids: Mapping[str, str],
        control_url: str,
        pds_handlers: tuple[PdsHandler, ...],
    ) -> None:
        self.spec = spec
        self.plc_url = plc.url
        self.relay_url = relay.url
        self.pds_urls = tuple(origin.url for origin in pds)
        self.did_web_urls = {did: origin.url for did, origin in web.items()}
        self.web_dids = dict(web_dids)
        self.control_url = control_url
        self._origins = (plc, relay, *pds, *web.values())
        self._pds_handlers = pds_handlers
        self._accounts = {account.did: account for account in spec.accounts}
        self.stats: dict[str, OriginStats] = {origin.url: origin.stats for origin in self._origins}

    @property
    def plc_stats(self) -> OriginStats:
        """The PLC directory's counters."""
        return self.stats[self.plc_url]

    @property
    def relay_stats(self) -> OriginStats:
        """The relay's counters."""
        return self.stats[self.relay_url]

    def pds_stats(self, host: int) -> OriginStats:
        """The counters of PDS host ``host``."""
        return self.stats[self.pds_urls[host]]

    def account(self, did: str) -> Account:
        """The served account with this DID (``KeyError`` if none)."""
        return self._accounts[did]

    def pds_url(self, did: str) -> str:
        """The base URL of the PDS that hosts ``did``."""
        return self.pds_urls[self.account(did).pds]

    def did_document_url(self, did: str) -> str:
        """Where ``did``'s document is served: the PLC directory, or its did:web host's well-known path."""
        if did in self.did_web_urls:
            return f"{self.did_web_urls[did]}/.well-known/did.json"
        return f"{self.plc_url}/{did}"

    def reset(self) -> None:
        """Zero every counter and forget the state of the stateful hostile modes."""
        for origin in self._origins:
            origin.stats.reset()
        for handler in self._pds_handlers:
            handler.reset()

    def describe(self) -> dict[str, object]:
        """The URLs as a JSON-able mapping (what the process mode writes to its port file)."""
        return {
            "plc_url": self.plc_url,
            "relay_url": self.relay_url,
            "pds_urls": list(self.pds_urls),
            "did_web_urls": dict(self.did_web_urls),
            "web_dids": dict(self.web_dids),
            "control_url": self.control_url,
        }


class ControlHandler:
    """``GET /stats[?timestamps=1]`` (every origin's counters by URL) and ``GET /reset``."""

    def __init__(self) -> None:
        self.network: RunningNetwork | None = None

    def handle(self, path: str, query: str) -> Action:
        """The stats or reset answer."""
        network = self.network
        if network is None:
            return NOT_FOUND
        if path == "/stats":
            timestamps = parse_query(query).get("timestamps") == "1"
            return json_reply(
                200, {url: s.snapshot(timestamps=timestamps) for url, s in network.stats.items()}
            )
        if path == "/reset":
            network.reset()
            return json_reply(200, {"reset": True})
        return NOT_FOUND


async def _listen() -> tuple[trio.SocketListener, str]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    return listeners[0], f"http://127.0.0.1:{port}"


async def serve_network(
    spec: NetworkSpec,
    *,
    record_requests: bool = True,
    page_cache_bytes: int = DEFAULT_PAGE_CACHE_BYTES,
    task_status: trio.TaskStatus[RunningNetwork] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``spec`` until cancelled; ``nursery.start`` returns the :class:`RunningNetwork` once every
    listener is bound.

    ``record_requests=False`` keeps only counts and timestamps (not every path and query), for long
    benchmark runs; ``page_cache_bytes`` bounds the cache of rendered pages (shared by the relay and every
    PDS host).
    """
    # A socket that is bound but never listens reserves a port that refuses every connection.
    down: list[socket.socket] = []
    try:
        async with trio.open_nursery() as nursery:
            network, served = await _bind(spec, record_requests, page_cache_bytes, down)
            for origin, listener in served:
                handler = functools.partial(serve_connection, origin)
                nursery.start_soon(trio.serve_listeners, handler, [listener])
            task_status.started(network)
    finally:
        for sock in down:
            sock.close()


async def _bind(
    spec: NetworkSpec, record_requests: bool, cache_bytes: int, down: list[socket.socket]
) -> tuple[RunningNetwork, list[tuple[Origin, trio.SocketListener]]]:
    plc_listener, plc_url = await _listen()
    relay_listener, relay_url = await _listen()
    control_listener, control_url = await _listen()
    pds_urls: list[str] = []
    pds_listeners: list[trio.SocketListener | None] = []
    for host in range(spec.pds_hosts):
        if spec.host(host).behaviour == "host_down":
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            down.append(sock)
            pds_urls.append(f"http://127.0.0.1:{sock.getsockname()[1]}")
            pds_listeners.append(None)
        else:
            listener, url = await _listen()
            pds_urls.append(url)
            pds_listeners.append(listener)
    web_dids: dict[str, str] = {}
    web_bound: dict[str, tuple[trio.SocketListener, str]] = {}
    for account in spec.accounts:
        if account.is_web:
            listener, url = await _listen()
            real = web_did_for_port(int(url.rsplit(":", 1)[1]))
            web_dids[account.did] = real
            web_bound[real] = (listener, url)
    spec = resolve_web_dids(spec, web_dids)
    urls = tuple(pds_urls)

    def origin(
        name: str, url: str, handler: PdsHandler | PlcHandler | RelayHandler | DidWebHandler
    ) -> Origin:
        latency = spec.plc_latency if name in ("plc", "web") else 0.0
        return Origin(name, url, handler, latency, OriginStats(record_requests))

    cache = PageCache(cache_bytes)
    plc = origin("plc", plc_url, PlcHandler(spec, urls))
    relay = origin("relay", relay_url, RelayHandler(spec, cache))
    handlers = tuple(PdsHandler(spec, host, urls[host], cache) for host in range(spec.pds_hosts))
    pds = tuple(
        Origin(
            f"pds{host}", urls[host], handlers[host], spec.host_latency(host), OriginStats(record_requests)
        )
        for host in range(spec.pds_hosts)
    )
    web = {
        did: origin("web", url, DidWebHandler(spec.account(did), urls[spec.account(did).pds]))
        for did, (_, url) in web_bound.items()
    }
    control = ControlHandler()
    network = RunningNetwork(
        spec,
        plc=plc,
        relay=relay,
        pds=pds,
        web=web,
        web_dids=web_dids,
        control_url=control_url,
        pds_handlers=handlers,
    )
    control.network = network
    served = [(plc, plc_listener), (relay, relay_listener)]
    served += [(o, listener) for o, listener in zip(pds, pds_listeners, strict=True) if listener is not None]
    served += [(web[did], listener) for did, (listener, _) in web_bound.items()]
    served.append((Origin("control", control_url, control, 0.0, OriginStats(False)), control_listener))
    return network, served


@asynccontextmanager
async def open_network(
    spec: NetworkSpec, *, record_requests: bool = True, page_cache_bytes: int = DEFAULT_PAGE_CACHE_BYTES
) -> AsyncIterator[RunningNetwork]:
    """Serve ``spec`` for the duration of the ``async with`` block."""
    async with trio.open_nursery() as nursery:
        serve = functools.partial(
            serve_network, spec, record_requests=record_requests, page_cache_bytes=page_cache_bytes
        )
        network: RunningNetwork = await nursery.start(serve)
        try:
            yield network
        finally:
            nursery.cancel_scope.cancel()
