"""Serving a :class:`~daemon.simnet.spec.NetworkSpec` on loopback: one listener per origin.

The PLC directory, the relay, every PDS host, every did:web account and a control endpoint each get their
own ``127.0.0.1`` port (bound to port 0), so each PDS is a distinct origin for the daemon's per-host limits.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Final

import trio

from daemon.simnet.actions import PageCache
from daemon.simnet.control import ControlHandler
from daemon.simnet.http11 import Origin, OriginStats, serve_connection
from daemon.simnet.identity import DidWebHandler, PlcHandler
from daemon.simnet.ids import web_did_for_port
from daemon.simnet.pds import PdsHandler
from daemon.simnet.records import Mutation
from daemon.simnet.relay import RelayHandler
from daemon.simnet.repos import DEFAULT_REPO_CACHE_BYTES, RepoCache
from daemon.simnet.spec import Account, NetworkSpec, resolve_web_dids, with_account, with_mutation

DEFAULT_PAGE_CACHE_BYTES: Final = 64 * 1_048_576


class RunningNetwork:
    """A served network: its URLs, its (resolved) spec and the counters of every origin.

    ``spec`` is the served spec, with every did:web placeholder replaced by the real
    ``did:web:localhost%3A<port>`` DID (``web_dids`` maps placeholder to real), and with every mutation so
    far (:meth:`mutate`). ``stats`` maps each origin URL (PLC, relay, PDS hosts, did:web hosts; not the
    control endpoint) to its :class:`OriginStats`; ``repos`` is the cache of built repos (and its build
    counters).
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
        handlers: Handlers,
        repos: RepoCache,
    ) -> None:
        self.spec = spec
        self.plc_url = plc.url
        self.relay_url = relay.url
        self.pds_urls = tuple(origin.url for origin in pds)
        self.did_web_urls = {did: origin.url for did, origin in web.items()}
        self.web_dids = dict(web_dids)
        self.control_url = control_url
        self.repos = repos
        self._origins = (plc, relay, *pds, *web.values())
        self._handlers = handlers
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
        return self.spec.account(did)

    def pds_url(self, did: str) -> str:
        """The base URL of the PDS that hosts ``did``."""
        return self.pds_urls[self.account(did).pds]

    def did_document_url(self, did: str) -> str:
        """Where ``did``'s document is served: the PLC directory, or its did:web host's well-known path."""
        if did in self.did_web_urls:
            return f"{self.did_web_urls[did]}/.well-known/did.json"
        return f"{self.plc_url}/{did}"

    def reset(self) -> None:
        """Zero every counter and forget the state of the stateful hostile modes (and which DIDs were
        resolved, for pds_moved and key_rotated)."""
        for origin in self._origins:
            origin.stats.reset()
        self._handlers.reset()

    def mutate(
        self,
        did: str,
        mutation: Mutation | str,
        *,
        update: Sequence[int] = (),
        delete: Sequence[int] = (),
        create: int = 0,
        empty: bool = False,
        recreate: Sequence[int] = (),
    ) -> Account:
        """Change the records of ``did`` (a new commit, with a newer rev), and serve the new state.

        Either a :class:`Mutation`, or the collection and the changes: ``mutate(did, collection,
        update=[indices], delete=[indices], create=n, empty=False, recreate=[indices])`` (see
        :class:`Mutation` for their order). ``spec`` (and so the expectation functions) follows.
        Raises ConfigError for a change that names records that are not there.
        """
        if isinstance(mutation, str):
            mutation = Mutation(mutation, tuple(update), tuple(delete), create, empty, tuple(recreate))
        self.spec = with_mutation(self.spec, did, mutation)
        self._handlers.set_spec(self.spec)
        return self.spec.account(did)

    def set_behaviour(
        self, did: str, behaviour: str | None, params: Mapping[str, object] | None = None
    ) -> Account:
        """Make ``did`` behave as ``behaviour`` (None: well behaved) from now on; ``spec`` follows."""
        account = replace(self.spec.account(did), behaviour=behaviour, params=dict(params or {}))
        self.spec = with_account(self.spec, account)
        self._handlers.set_spec(self.spec)
        return self.spec.account(did)

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


class Handlers:
    """Every handler of a network, told together about a new spec or a reset."""

    def __init__(
        self,
        plc: PlcHandler,
        relay: RelayHandler,
        pds: tuple[PdsHandler, ...],
        web: tuple[DidWebHandler, ...],
    ) -> None:
        self.plc = plc
        self.relay = relay
        self.pds = pds
        self.web = web

    def set_spec(self, spec: NetworkSpec) -> None:
        """Serve ``spec`` from now on."""
        self.plc.set_spec(spec)
        self.relay.set_spec(spec)
        for pds in self.pds:
            pds.set_spec(spec)
        for web in self.web:
            web.set_spec(spec)

    def reset(self) -> None:
        """Forget the state of the stateful modes."""
        self.plc.reset()
        for pds in self.pds:
            pds.reset()
        for web in self.web:
            web.reset()


async def _listen() -> tuple[trio.SocketListener, str]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    return listeners[0], f"http://127.0.0.1:{port}"


async def serve_network(
    spec: NetworkSpec,
    *,
    record_requests: bool = True,
    page_cache_bytes: int = DEFAULT_PAGE_CACHE_BYTES,
    repo_cache_bytes: int = DEFAULT_REPO_CACHE_BYTES,
    task_status: trio.TaskStatus[RunningNetwork] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``spec`` until cancelled; ``nursery.start`` returns the :class:`RunningNetwork` once every
    listener is bound.

    ``record_requests=False`` keeps only counts and timestamps (not every path and query), for long
    benchmark runs; ``page_cache_bytes`` bounds the cache of rendered pages (shared by the relay and every
    PDS host), ``repo_cache_bytes`` the cache of built repos (shared by every PDS host).
    """
    # A socket that is bound but never listens reserves a port that refuses every connection.
    down: list[socket.socket] = []
    try:
        async with trio.open_nursery() as nursery:
            network, served = await _bind(spec, record_requests, page_cache_bytes, repo_cache_bytes, down)
            for origin, listener in served:
                handler = functools.partial(serve_connection, origin)
                nursery.start_soon(trio.serve_listeners, handler, [listener])
            task_status.started(network)
    finally:
        for sock in down:
            sock.close()


async def _bind(
    spec: NetworkSpec, record_requests: bool, cache_bytes: int, repo_bytes: int, down: list[socket.socket]
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
    cache = PageCache(cache_bytes)
    repos = RepoCache(repo_bytes)
    plc_handler = PlcHandler(spec, urls)
    relay_handler = RelayHandler(spec, cache)
    pds_stats = [OriginStats(record_requests) for _ in range(spec.pds_hosts)]
    pds_handlers = tuple(
        PdsHandler(spec, host, urls[host], cache, repos, pds_stats[host].count_rate_limited)
        for host in range(spec.pds_hosts)
    )
    web_handlers = {did: DidWebHandler(spec, spec.account(did), urls) for did in web_bound}
    plc = Origin("plc", plc_url, plc_handler, spec.plc_latency, OriginStats(record_requests))
    relay = Origin("relay", relay_url, relay_handler, 0.0, OriginStats(record_requests))
    pds = tuple(
        Origin(f"pds{host}", urls[host], pds_handlers[host], spec.host_latency(host), pds_stats[host])
        for host in range(spec.pds_hosts)
    )
    web = {
        did: Origin("web", url, web_handlers[did], spec.plc_latency, OriginStats(record_requests))
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
        handlers=Handlers(plc_handler, relay_handler, pds_handlers, tuple(web_handlers.values())),
        repos=repos,
    )
    control.network = network
    served = [(plc, plc_listener), (relay, relay_listener)]
    served += [(o, listener) for o, listener in zip(pds, pds_listeners, strict=True) if listener is not None]
    served += [(web[did], listener) for did, (listener, _) in web_bound.items()]
    served.append((Origin("control", control_url, control, 0.0, OriginStats(False)), control_listener))
    return network, served


@asynccontextmanager
async def open_network(
    spec: NetworkSpec,
    *,
    record_requests: bool = True,
    page_cache_bytes: int = DEFAULT_PAGE_CACHE_BYTES,
    repo_cache_bytes: int = DEFAULT_REPO_CACHE_BYTES,
) -> AsyncIterator[RunningNetwork]:
    """Serve ``spec`` for the duration of the ``async with`` block."""
    async with trio.open_nursery() as nursery:
        serve = functools.partial(
            serve_network,
            spec,
            record_requests=record_requests,
            page_cache_bytes=page_cache_bytes,
            repo_cache_bytes=repo_cache_bytes,
        )
        network: RunningNetwork = await nursery.start(serve)
        try:
            yield network
        finally:
            nursery.cancel_scope.cancel()
