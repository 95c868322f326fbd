"""The HTTP edge: every upstream request of the daemon goes through :class:`Fetcher`.

What it guarantees, whoever the caller is (SPEC 6, 6.1, 7):

- one deadline bounds the whole request (connect, headers and every byte of the body); expiry is
  :class:`UpstreamTimeout`;
- the body is streamed and counted, and a response over its cap (``max_response_bytes``, or the caller's
  own, e.g. ``max_car_bytes``) is dropped mid-stream (the connection is closed, never drained):
  ``ProtocolViolation("response_too_large")``; what a body holds counts against the memory budget
  (:mod:`daemon.net.budget`) until the caller is done with it;
- redirects are never followed: any 3xx is ``ProtocolViolation("redirect")``;
- PDS and did:web URLs (attacker-controlled) must be https and may only reach global addresses
  (:mod:`daemon.net.guard`) unless ``allow_private_addresses``; relay and PLC URLs come from the operator
  and are trusted;
- PDS and did:web requests take a per-host slot from :class:`~daemon.net.hosts.HostLimiter`; a 429 pauses
  the host (for every class) and raises :class:`RateLimited`, and nothing is sent to a paused host; the
  ``RateLimit-*`` headers of every response pace the host so the limit is not reached at all;
- no cookie is ever stored or sent (there is no cookie jar), and no proxy or ``.netrc`` from the
  environment is used;
- httpcore exceptions never escape: they become :class:`UpstreamConnectError` or :class:`UpstreamTimeout`
  (the one mapping of foreign errors).

The client is httpx's own connection layer, httpcore, used directly: one small pool of HTTP/1.1
connections per origin (:mod:`daemon.net.pool`: most recently used first, one liveness check per request
rather than one per idle connection), sized to the requests that may be in flight to its origin (the
per-host concurrency, or ``trusted_pool_size`` for the relay and PLC, enforced here by a trio semaphore),
so requests never queue inside it and a cancelled request cannot leak a slot (encode/httpcore#1093).
Small pools also bound the damage of a misbehaving host. Idle pools beyond :data:`MAX_IDLE_POOLS` are
closed, least recently used first.

Compression: only gzip is offered, and it is decoded with a bounded output size (:mod:`daemon.net.body`):
a 64 KiB chunk of a gzip bomb would otherwise inflate to ~64 MiB before any counting could stop it.
"""

from __future__ import annotations

import ipaddress
import json
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlencode

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
from daemon.net.body import decoded_chunks, read_body
from daemon.net.budget import GENERIC_DECODE_FACTOR, BudgetHolder, MemoryBudget
from daemon.net.guard import AddressResolver, GuardedNetworkBackend
from daemon.net.hosts import HostLimiter
from daemon.net.pool import OriginPool
from daemon.net.ratelimit import rate_limit_resume_at

# The host classes: "pds" and "didweb" are attacker-controlled, "relay" and "plc" operator-configured.
# Operator-configured endpoints (SPEC 7): may be http or on loopback, no per-host politeness limits.
TRUSTED_HOST_CLASSES: frozenset[str] = frozenset({"relay", "plc"})

_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")

# Closed when idle once more pools than this exist.
MAX_IDLE_POOLS = 128

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

    @property
    def local_address(self) -> str: ...


@dataclass(slots=True)
class Response:
    """A complete upstream response: any status that is not 3xx or 429, the headers and the whole body.

    ``headers`` has lower-case names. While the response is held by :meth:`Fetcher.request`'s context,
    its body counts against the memory budget; :meth:`reserve` takes more for a decode.
    """

    status: int
    headers: Mapping[str, str]
    body: bytes | bytearray
    holder: BudgetHolder | None = field(default=None, repr=False)

    def json(self) -> object:
        """The body decoded as strict JSON (no NaN/Infinity); ``ProtocolViolation("bad_response")`` if not."""
        try:
            return json.loads(self.body, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            # ValueError covers JSONDecodeError, UnicodeDecodeError and over-long integers; RecursionError
            # is what absurdly deep nesting produces.
            raise ProtocolViolation(f"response is not valid JSON: {exc}", code=Code.BAD_RESPONSE) from exc

    async def reserve(self, factor: int) -> None:
        """Take ``factor`` times the body's size from the memory budget before decoding it."""
        await self.reserve_bytes(len(self.body) * factor)

    async def reserve_bytes(self, amount: int) -> None:
        """Take ``amount`` more bytes from the memory budget (for a decode), held until the response ends."""
        if self.holder is not None:
            await self.holder.take(amount, "decoding a response")

    async def json_budgeted(self) -> object:
        """:meth:`json` with the generic decode's worst-case cost reserved from the budget first."""
        await self.reserve(GENERIC_DECODE_FACTOR)
        return self.json()


@dataclass(slots=True)
class StreamedResponse:
    """A response whose body the caller consumes as it arrives (``chunks``, gzip decoded, capped)."""

    status: int
    headers: Mapping[str, str]
    chunks: AsyncIterator[bytes]


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


@dataclass(frozen=True, slots=True)
class _Target:
    url: httpcore.URL
    host: bytes
    origin: str
    path: str

    @property
    def core_origin(self) -> httpcore.Origin:
        """The origin as httpcore names it (the default port filled in)."""
        return self.url.origin


class _Origin:
    """One origin's connection pool, plus bookkeeping for eviction and (trusted origins only) its gate."""

    __slots__ = ("gate", "pool", "users")

    def __init__(self, pool: OriginPool, gate: trio.Semaphore | None) -> None:
        self.pool = pool
        self.gate = gate
        self.users = 0


class Fetcher:
    """Fetches from upstream hosts under the guarantees of the module docstring.

    ``hosts`` is the process-wide per-host limiter (also read by ``/_admin/status``). ``resolver`` replaces
    the system resolver for guarded requests (tests). ``wall_clock`` gives unix time for 429 pauses.
    ``on_request(host_class, status_or_None, seconds)`` is called once per request that was attempted
    (``None`` when no status arrived); ``on_pause()`` once per 429 that paused a host.
    ``trusted_pool_size`` caps concurrent requests to one relay/PLC origin: pass at least the number of
    workers. ``budget`` is the memory budget bodies count against.
    """

    def __init__(
        self,
        *,
        network: NetworkSettings,
        max_response_bytes: int,
        hosts: HostLimiter,
        trusted_pool_size: int,
        budget: MemoryBudget | None = None,
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
        self.budget = budget if budget is not None else MemoryBudget()
        self._wall_clock = wall_clock
        self._on_request = on_request
        self._local_address = network.local_address or None
        self._guarded_backend = GuardedNetworkBackend(resolver=resolver)
        self._open_backend = httpcore.TrioBackend()
        self._ssl_context: ssl.SSLContext | None = None
        self._origins: OrderedDict[tuple[str, bool], _Origin] = OrderedDict()
        self._headers = [
            (b"User-Agent", network.user_agent.encode()),
            (b"Accept-Encoding", b"gzip"),
        ]

    async def get_json(
        self,
        url: str,
        *,
        params: Mapping[str, str | int] | None = None,
        timeout: float,
        host_class: str,
        max_bytes: int | None = None,
    ) -> Response:
        """GET a small document and return the complete response, detached from the memory budget."""
        async with self.request(
            url, params=params, timeout=timeout, host_class=host_class, max_bytes=max_bytes
        ) as response:
            return Response(response.status, response.headers, bytes(response.body))

    @asynccontextmanager
    async def request(
        self,
        url: str,
        *,
        params: Mapping[str, str | int | list[str]] | None = None,
        timeout: float,
        host_class: str,
        max_bytes: int | None = None,
        accept: str = "application/json",
    ) -> AsyncIterator[Response]:
        """GET ``url`` (with ``params`` added to its query); the complete response, held by the budget
        until the ``async with`` ends. The host slot is released before the body is handed over.

        ``host_class`` is "pds", "didweb", "relay" or "plc" (anything else is treated as untrusted).
        ``timeout`` bounds the request from the moment it is sent (waiting for a per-host slot is not
        counted: that wait is politeness, not a slow upstream). Raises :class:`BlockedAddress`
        (``insecure_url``, ``blocked_address``), :class:`RateLimited`, :class:`UpstreamTimeout`,
        :class:`UpstreamConnectError` or :class:`ProtocolViolation` (``redirect``, ``response_too_large``).
        Every other status, 4xx and 5xx included, is returned for the caller to interpret.
        """
        holder = self.budget.holder()
        try:
            limit = max_bytes or self._max_response_bytes
            async with self._exchange(url, params, timeout, host_class, accept) as (
                status,
                headers,
                raw,
                where,
            ):
                body = await read_body(raw, headers=headers, limit=limit, where=where, holder=holder)
            yield Response(status, _header_map(headers), body, holder)
        finally:
            holder.release()

    @asynccontextmanager
    async def stream(
        self,
        url: str,
        *,
        params: Mapping[str, str | int | list[str]] | None = None,
        timeout: float,
        host_class: str,
        max_bytes: int,
        accept: str = "application/vnd.ipld.car",
        too_large_code: Code = Code.RESPONSE_TOO_LARGE,
    ) -> AsyncIterator[StreamedResponse]:
        """GET ``url`` and hand over its body as it arrives (a CAR, say), capped at ``max_bytes``
        (over it: ``ProtocolViolation(too_large_code)``).

        The host slot and the deadline cover the whole ``async with``: consume the body inside it.
        """
        async with self._exchange(url, params, timeout, host_class, accept) as (status, headers, raw, where):
            body = decoded_chunks(
                raw, headers=headers, limit=max_bytes, where=where, too_large_code=too_large_code
            )
            async with aclosing(body) as chunks:
                yield StreamedResponse(status, _header_map(headers), chunks)

    async def aclose(self) -> None:
        """Close every pool and its connections."""
        origins = list(self._origins.values())
        self._origins.clear()
        for entry in origins:
            await entry.pool.aclose()

    @asynccontextmanager
    async def _exchange(
        self,
        url: str,
        params: Mapping[str, str | int | list[str]] | None,
        timeout: float,
        host_class: str,
        accept: str,
    ) -> AsyncIterator[tuple[int, list[tuple[bytes, bytes]], AsyncIterator[bytes], str]]:
        trusted = host_class in TRUSTED_HOST_CLASSES
        target = self._check_url(url, params, trusted=trusted)
        if trusted:
            self._hosts.raise_if_paused(target.origin)
        entry = self._origin(target, trusted=trusted)
        entry.users += 1
        try:
            await self._evict_idle()
            async with self._gate(target, entry):
                where = f"{target.origin}{target.path}"
                started = trio.current_time()
                status: int | None = None
                request = httpcore.Request(
                    b"GET",
                    target.url,
                    headers=[(b"Host", target.host), *self._headers, (b"Accept", accept.encode())],
                )
                try:
                    with trio.CancelScope(deadline=started + timeout) as scope:
                        try:
                            async with entry.pool.response(request) as response:
                                status = response.status
                                headers = list(response.headers)
                                self._observe(target, status, headers, where)
                                yield status, headers, response.aiter_stream(), where
                        except httpcore.TimeoutException as exc:
                            raise UpstreamTimeout(f"GET {where}: {type(exc).__name__}: {exc}") from exc
                        except (
                            httpcore.NetworkError,
                            httpcore.ProtocolError,
                            httpcore.UnsupportedProtocol,
                        ) as exc:
                            raise UpstreamConnectError(f"GET {where}: {type(exc).__name__}: {exc}") from exc
                    if scope.cancelled_caught:
                        raise UpstreamTimeout(f"GET {where}: no complete response within {timeout:g} s")
                finally:
                    if self._on_request is not None:
                        self._on_request(host_class, status, trio.current_time() - started)
        finally:
            entry.users -= 1

    def _check_url(
        self, url: str, params: Mapping[str, str | int | list[str]] | None, *, trusted: bool
    ) -> _Target:
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError, ValueError) as exc:
            raise BlockedAddress(f"not a usable URL: {url!r}", code=Code.INSECURE_URL) from exc
        if parsed.scheme not in ("http", "https") or not _usable_host(parsed):
            raise BlockedAddress(f"not an http(s) URL with a usable host: {url!r}", code=Code.INSECURE_URL)
        if not trusted and parsed.scheme != "https" and not self._network.allow_private_addresses:
            raise BlockedAddress(f"refusing non-https URL {url!r}", code=Code.INSECURE_URL)
        target = parsed.raw_path
        if params:
            query = urlencode(params, doseq=True).encode()
            target += (b"&" if b"?" in target else b"?") + query
        core = httpcore.URL(scheme=parsed.raw_scheme, host=parsed.raw_host, port=parsed.port, target=target)
        return _Target(core, parsed.netloc, _origin_of(parsed), parsed.path)

    def _gate(self, target: _Target, entry: _Origin) -> AbstractAsyncContextManager[None]:
        if entry.gate is None:
            return self._hosts.slot(target.origin, target.path)
        return self._trusted_slot(target.origin, entry.gate)

    @asynccontextmanager
    async def _trusted_slot(self, origin: str, gate: trio.Semaphore) -> AsyncIterator[None]:
        async with gate:
            self._hosts.raise_if_paused(origin)
            yield

    def _origin(self, target: _Target, *, trusted: bool) -> _Origin:
        key = (target.origin, trusted)
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
        pool = OriginPool(
            target.core_origin,
            ssl_context=self._ssl_context if target.url.scheme == b"https" else None,
            network_backend=self._guarded_backend if guarded else self._open_backend,
            local_address=self._local_address,
            keepalive_expiry=KEEPALIVE_EXPIRY,
            max_idle=in_flight,
        )
        entry = self._origins[key] = _Origin(pool, trio.Semaphore(in_flight) if trusted else None)
        return entry

    async def _evict_idle(self) -> None:
        excess = len(self._origins) - MAX_IDLE_POOLS
        if excess <= 0:
            return
        idle = [key for key, entry in self._origins.items() if entry.users == 0][:excess]
        evicted = [self._origins.pop(key) for key in idle]
        # Closing idle keep-alive sockets is quick; never let it hold up (or be cut short by) the request
        # that happened to trigger it.
        with trio.CancelScope(shield=True, deadline=trio.current_time() + 5.0):
            for entry in evicted:
                await entry.pool.aclose()

    def _observe(self, target: _Target, status: int, headers: list[tuple[bytes, bytes]], where: str) -> None:
        """Refuse redirects and 429s; let the host's pacing learn from the ``RateLimit-*`` headers."""
        names = _header_map(headers)
        now = self._wall_clock()
        self._hosts.observe(target.origin, target.path, names, now=now)
        if 300 <= status < 400:
            location = names.get("location", "")
            raise ProtocolViolation(
                f"GET {where}: HTTP {status} redirect to {location[:200]!r} not followed", code=Code.REDIRECT
            )
        if status == 429:
            resume_at = rate_limit_resume_at(names, now=now, default_pause=self._network.rate_limit_pause)
            self._hosts.pause(target.origin, resume_at)
            if self._on_pause is not None:
                self._on_pause()
            raise RateLimited(
                f"GET {where}: HTTP 429; {target.origin} paused until {resume_at:.0f}",
                host=target.origin,
                resume_at=resume_at,
            )


def _header_map(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """Header names in lower case; the first value of a repeated header wins."""
    names: dict[str, str] = {}
    for key, value in headers:
        names.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
    return names


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
