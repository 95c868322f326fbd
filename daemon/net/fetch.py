"""The HTTP edge: every upstream request of the daemon goes through :class:`Fetcher`, the only user of httpx.

What it guarantees, whoever the caller is (SPEC 6, 6.1, 7):

- one deadline bounds the whole request (connect, headers and every byte of the body); expiry is
  :class:`UpstreamTimeout`;
- the body is streamed and counted, and a response over ``max_response_bytes`` is dropped mid-stream
  (the connection is closed, never drained): ``ProtocolViolation("response_too_large")``;
- redirects are never followed: any 3xx is ``ProtocolViolation("redirect")``;
- PDS and did:web URLs (attacker-controlled) must be https and may only reach global addresses
  (:mod:`daemon.net.guard`) unless ``allow_private_addresses``; relay and PLC URLs come from the operator and
  are trusted;
- PDS and did:web requests take a per-host slot from :class:`~daemon.hosts.HostLimiter`; a 429 pauses the
  host (for every class) and raises :class:`RateLimited`, and nothing is sent to a paused host;
- httpx and httpcore exceptions never escape: they become :class:`UpstreamConnectError` or
  :class:`UpstreamTimeout`.

Connection pools: one ``httpx.AsyncClient`` per origin, each with a small pool. A single shared pool spent
most of its time walking its connection list, and small pools bound the damage of a misbehaving host. Every
pool is sized above the number of requests that may be in flight to its origin (``2 * n + 2``, where ``n``
is the per-host concurrency, or ``trusted_pool_size`` for the relay and PLC, enforced here by a trio
semaphore). Requests therefore never queue *inside* httpcore: cancelling a request that waits for a pool
connection can leak the slot for good (encode/httpcore#1093), while waiting on a trio semaphore is
cancel-safe. Idle clients beyond :data:`MAX_IDLE_CLIENTS` are closed, least recently used first, so a long
backfill over many PDSes does not hoard sockets.

Compression: only gzip is offered, and it is decoded here with a bounded output size, because httpx
decodes each network chunk in one go and a 64 KiB chunk of a gzip bomb inflates to ~64 MiB before any
counting could stop it.
"""

from __future__ import annotations

import ipaddress
import json
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

import httpcore
import httpx
import trio

from daemon.errors import (
    BlockedAddress,
    Code,
    ProtocolViolation,
    RateLimited,
    UpstreamConnectError,
    UpstreamTimeout,
)
from daemon.net.body import read_body
from daemon.net.guard import AddressResolver, GuardedNetworkBackend
from daemon.net.hosts import HostLimiter
from daemon.net.ratelimit import rate_limit_resume_at
from daemon.net.transport import PoolTransport

# The host classes: "pds" and "didweb" are attacker-controlled, "relay" and "plc" operator-configured.
# Operator-configured endpoints (SPEC 7): may be http or on loopback, no per-host politeness limits.
TRUSTED_HOST_CLASSES: frozenset[str] = frozenset({"relay", "plc"})

_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")

# Closed when idle once more clients than this exist.
MAX_IDLE_CLIENTS = 128

# Node's HTTP server (the reference PDS) closes idle keep-alive connections after 5 s; reusing one just as
# the server closes it fails the request, so give connections up a little earlier.
KEEPALIVE_EXPIRY = 4.0


class NetworkSettings(Protocol):
    """The part of ``[network]`` the fetcher reads (``daemon.config.NetworkConfig`` satisfies it)."""

    @property
    def rate_limit_pause(self) -> float: ...

    @property
    def allow_private_addresses(self) -> bool: ...

    @property
    def user_agent(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Response:
    """A complete upstream response: any status that is not 3xx or 429, the headers and the whole body."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> object:
        """The body decoded as strict JSON (no NaN/Infinity); ``ProtocolViolation("bad_response")`` if not."""
        try:
            return json.loads(self.body, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            # ValueError covers JSONDecodeError, UnicodeDecodeError and over-long integers; RecursionError
            # is what absurdly deep nesting produces.
            raise ProtocolViolation(f"response is not valid JSON: {exc}", code=Code.BAD_RESPONSE) from exc


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


class _Origin:
    """One origin's client, plus bookkeeping for eviction and (trusted origins only) its request gate."""

    __slots__ = ("gate", "http", "users")

    def __init__(self, http: httpx.AsyncClient, gate: trio.Semaphore | None) -> None:
        self.http = http
        self.gate = gate
        self.users = 0


class Fetcher:
    """Fetches JSON documents from upstream hosts under the guarantees of the module docstring.

    ``hosts`` is the process-wide per-host limiter (also read by ``/_admin/status``). ``resolver`` replaces
    the system resolver for guarded requests (tests). ``wall_clock`` gives unix time for 429 pauses.
    ``on_request(host_class, status_or_None, seconds)`` is called once per request that was attempted
    (``None`` when no status arrived); ``on_pause()`` once per 429 that paused a host.
    ``trusted_pool_size`` caps concurrent requests to one relay/PLC origin: pass at least the number of
    workers.
    """

    def __init__(
        self,
        *,
        network: NetworkSettings,
        max_response_bytes: int,
        hosts: HostLimiter,
        trusted_pool_size: int,
        resolver: AddressResolver | None = None,
        wall_clock: Callable[[], float] = time.time,
        on_request: Callable[[str, int | None, float], None] | None = None,
        on_pause: Callable[[], object] | None = None,
    ) -> None:
        self._on_pause = on_pause
        self._network = network
        self._max_response_bytes = max_response_bytes
        self._hosts = hosts
        self._trusted_pool_size = max(1, trusted_pool_size)
        self._wall_clock = wall_clock
        self._on_request = on_request
        self._guarded_backend = GuardedNetworkBackend(resolver=resolver)
        self._open_backend = httpcore.TrioBackend()
        self._ssl_context: ssl.SSLContext | None = None
        self._origins: OrderedDict[tuple[str, bool], _Origin] = OrderedDict()
        self._headers = {
            "User-Agent": network.user_agent,
            "Accept": "application/json",
            "Accept-Encoding": "gzip",
        }

    async def get_json(
        self,
        url: str,
        *,
        params: Mapping[str, str | int] | None = None,
        timeout: float,
        host_class: str,
    ) -> Response:
        """GET ``url`` (with ``params`` added to its query) and return the complete response.

        ``host_class`` is "pds", "didweb", "relay" or "plc" (anything else is treated as untrusted).

        ``timeout`` bounds the request from the moment it is sent (waiting for a per-host slot is not
        counted: that wait is politeness, not a slow upstream). Raises :class:`BlockedAddress`
        (``insecure_url``, ``blocked_address``), :class:`RateLimited`, :class:`UpstreamTimeout`,
        :class:`UpstreamConnectError` or :class:`ProtocolViolation` (``redirect``, ``response_too_large``).
        Every other status, 4xx and 5xx included, is returned for the caller to interpret.
        """
        trusted = host_class in TRUSTED_HOST_CLASSES
        target = self._check_url(url, trusted=trusted)
        origin = _origin_of(target)
        if trusted:
            self._hosts.raise_if_paused(origin)
        entry = self._origin(origin, trusted=trusted)
        entry.users += 1
        try:
            await self._evict_idle()
            async with self._gate(origin, entry):
                return await self._send(entry.http, target, params, timeout, host_class, origin)
        finally:
            entry.users -= 1

    async def aclose(self) -> None:
        """Close every client and its connections."""
        origins = list(self._origins.values())
        self._origins.clear()
        for entry in origins:
            await entry.http.aclose()

    def _check_url(self, url: str, *, trusted: bool) -> httpx.URL:
        try:
            target = httpx.URL(url)
        except (httpx.InvalidURL, TypeError, ValueError) as exc:
            raise BlockedAddress(f"not a usable URL: {url!r}", code=Code.INSECURE_URL) from exc
        if target.scheme not in ("http", "https") or not _usable_host(target):
            raise BlockedAddress(f"not an http(s) URL with a usable host: {url!r}", code=Code.INSECURE_URL)
        if not trusted and target.scheme != "https" and not self._network.allow_private_addresses:
            raise BlockedAddress(f"refusing non-https URL {url!r}", code=Code.INSECURE_URL)
        return target

    def _gate(self, origin: str, entry: _Origin) -> AbstractAsyncContextManager[None]:
        if entry.gate is None:
            return self._hosts.slot(origin)
        return self._trusted_slot(origin, entry.gate)

    @asynccontextmanager
    async def _trusted_slot(self, origin: str, gate: trio.Semaphore) -> AsyncIterator[None]:
        async with gate:
            self._hosts.raise_if_paused(origin)
            yield

    def _origin(self, origin: str, *, trusted: bool) -> _Origin:
        key = (origin, trusted)
        entry = self._origins.get(key)
        if entry is not None:
            self._origins.move_to_end(key)
            return entry
        if trusted:
            in_flight = self._trusted_pool_size
            guarded = False
        else:
            # The limiter decides how many requests can be in flight, so it sizes the pool.
            in_flight = self._hosts.per_host_concurrency
            guarded = not self._network.allow_private_addresses
        if self._ssl_context is None:
            # Loading the CA bundle is slow and large: one context for every pool.
            self._ssl_context = httpx.create_ssl_context()
        pool = httpcore.AsyncConnectionPool(
            ssl_context=self._ssl_context,
            max_connections=2 * in_flight + 2,
            max_keepalive_connections=in_flight,
            keepalive_expiry=KEEPALIVE_EXPIRY,
            http1=True,
            http2=False,
            network_backend=self._guarded_backend if guarded else self._open_backend,
        )
        http = httpx.AsyncClient(
            transport=PoolTransport(pool),
            headers=self._headers,
            follow_redirects=False,
            timeout=None,
            trust_env=False,
        )
        entry = self._origins[key] = _Origin(http, trio.Semaphore(in_flight) if trusted else None)
        return entry

    async def _evict_idle(self) -> None:
        excess = len(self._origins) - MAX_IDLE_CLIENTS
        if excess <= 0:
            return
        idle = [key for key, entry in self._origins.items() if entry.users == 0][:excess]
        evicted = [self._origins.pop(key) for key in idle]
        # Closing idle keep-alive sockets is quick; never let it hold up (or be cut short by) the request
        # that happened to trigger it.
        with trio.CancelScope(shield=True, deadline=trio.current_time() + 5.0):
            for entry in evicted:
                await entry.http.aclose()

    async def _send(
        self,
        http: httpx.AsyncClient,
        target: httpx.URL,
        params: Mapping[str, str | int] | None,
        timeout: float,
        host_class: str,
        origin: str,
    ) -> Response:
        where = f"{origin}{target.path}"
        started = trio.current_time()
        status: int | None = None
        try:
            with trio.CancelScope(deadline=started + timeout):
                try:
                    async with http.stream("GET", target, params=params) as response:
                        status = response.status_code
                        self._refuse_status(response, origin, where)
                        body = await read_body(response, self._max_response_bytes, where)
                        return Response(status=status, headers=response.headers, body=body)
                except httpx.TimeoutException as exc:
                    raise UpstreamTimeout(f"GET {where}: {exc}") from exc
                except httpx.HTTPError as exc:
                    raise UpstreamConnectError(f"GET {where}: {type(exc).__name__}: {exc}") from exc
            raise UpstreamTimeout(f"GET {where}: no complete response within {timeout:g} s")
        finally:
            if self._on_request is not None:
                self._on_request(host_class, status, trio.current_time() - started)

    def _refuse_status(self, response: httpx.Response, origin: str, where: str) -> None:
        status = response.status_code
        if 300 <= status < 400:
            location = response.headers.get("location", "")
            raise ProtocolViolation(
                f"GET {where}: HTTP {status} redirect to {location!r} not followed", code=Code.REDIRECT
            )
        if status == 429:
            resume_at = rate_limit_resume_at(
                response.headers,
                now=self._wall_clock(),
                default_pause=self._network.rate_limit_pause,
            )
            self._hosts.pause(origin, resume_at)
            if self._on_pause is not None:
                self._on_pause()
            raise RateLimited(
                f"GET {where}: HTTP 429; {origin} paused until {resume_at:.0f}",
                host=origin,
                resume_at=resume_at,
            )


def origin_key(url: str) -> str:
    """The per-host key of ``url`` as the fetcher uses it for limits, pauses and ``RateLimited.host``.

    ``scheme://host[:port]``, lower case, IDNA-encoded, the port only when it is not the scheme's default,
    no user info: ``https://PDS.example.com:443/xrpc`` and ``https://pds.example.com`` share one key.
    Raises :class:`BlockedAddress` (``insecure_url``) for a URL that does not parse.
    """
    try:
        return _origin_of(httpx.URL(url))
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise BlockedAddress(f"not a usable URL: {url!r}", code=Code.INSECURE_URL) from exc


def _usable_host(target: httpx.URL) -> bool:
    # httpx accepts hosts such as "exa%20mple.com" and ports above 65535; neither can be connected to.
    if target.port is not None and not 0 < target.port < 65536:
        return False
    host = target.raw_host.decode("ascii", "replace")
    if _HOST_NAME.fullmatch(host):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _origin_of(target: httpx.URL) -> str:
    return f"{target.scheme}://{target.netloc.decode('ascii')}"
