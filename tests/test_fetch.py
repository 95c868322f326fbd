from __future__ import annotations

import email.utils
import gzip
import random
import resource
import socket
import sys
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio
import trio.testing

from daemon.config import NetworkConfig
from daemon.errors import (
    BlockedAddress,
    Code,
    ProtocolViolation,
    RateLimited,
    UpstreamConnectError,
    UpstreamTimeout,
)
from daemon.net import fetch
from daemon.net.budget import MemoryBudget
from daemon.net.fetch import Fetcher, Response, origin_key
from daemon.net.hosts import HostLimiter
from tests.httpserver import (
    HTTPServer,
    ServerRequest,
    hang,
    reply,
    reply_gzip,
    response_bytes,
    slow,
    stream_forever,
    trickle,
)

NOW = 1_700_000_000.0
MIB = 1024 * 1024

Factory = Callable[..., tuple[Fetcher, HostLimiter]]


@pytest.fixture
async def server(nursery: trio.Nursery) -> HTTPServer:
    return await HTTPServer().start(nursery)


@pytest.fixture
async def make() -> AsyncIterator[Factory]:
    made: list[Fetcher] = []

    def factory(
        *,
        concurrency: int = 4,
        rate: float = 0.0,
        allow_private: bool = True,
        pause: float = 60.0,
        max_bytes: int = MIB,
        trusted_pool_size: int = 4,
        local_address: str = "",
        **kwargs: Any,
    ) -> tuple[Fetcher, HostLimiter]:
        network = NetworkConfig(
            per_host_concurrency=concurrency,
            per_host_rate=rate,
            rate_limit_pause=pause,
            allow_private_addresses=allow_private,
            user_agent="backfilld-test/1.0",
            local_address=local_address,
        )
        hosts = HostLimiter(per_host_concurrency=concurrency, per_host_rate=rate, now=lambda: NOW)
        fetcher = Fetcher(
            network=network,
            max_response_bytes=max_bytes,
            hosts=hosts,
            trusted_pool_size=trusted_pool_size,
            wall_clock=lambda: NOW,
            **kwargs,
        )
        made.append(fetcher)
        return fetcher, hosts

    yield factory
    for fetcher in made:
        await fetcher.aclose()


# --- the ordinary path -------------------------------------------------------------------------------


async def test_get_json_returns_status_headers_and_body(server: HTTPServer, make: Factory) -> None:
    server.routes["/xrpc/com.atproto.repo.listRecords"] = reply(200, b'{"records": []}', {"X-Thing": "1"})
    fetcher, _ = make()
    response = await fetcher.get_json(
        server.url("/xrpc/com.atproto.repo.listRecords"),
        params={"repo": "did:plc:abc", "limit": 100},
        timeout=5,
        host_class="pds",
    )
    assert response.status == 200
    assert response.headers["x-thing"] == "1"
    assert response.json() == {"records": []}
    [request] = server.requests
    assert request.query == {"repo": "did:plc:abc", "limit": "100"}
    assert request.headers["user-agent"] == "backfilld-test/1.0"
    assert request.headers["accept-encoding"] == "gzip"


@pytest.mark.parametrize("status", [400, 404, 410, 500, 502, 503])
async def test_other_statuses_are_returned(server: HTTPServer, make: Factory, status: int) -> None:
    server.routes["/x"] = reply(status, b'{"error":"RepoNotFound"}')
    fetcher, _ = make()
    response = await fetcher.get_json(server.url("/x"), timeout=5, host_class="pds")
    assert response.status == status
    assert response.json() == {"error": "RepoNotFound"}


async def test_connections_are_reused(server: HTTPServer, make: Factory) -> None:
    server.routes["/x"] = reply(200)
    fetcher, _ = make()
    for _ in range(5):
        await fetcher.get_json(server.url("/x"), timeout=5, host_class="pds")
    assert server.connections == 1


async def test_gzip_bodies_are_decoded(server: HTTPServer, make: Factory) -> None:
    server.routes["/x"] = reply_gzip(200, b'{"a": "' + b"x" * 10000 + b'"}')
    fetcher, _ = make()
    response = await fetcher.get_json(server.url("/x"), timeout=5, host_class="pds")
    assert response.json() == {"a": "x" * 10000}


@pytest.mark.parametrize(
    ("body", "encoding"),
    [
        (b"not gzip at all", "gzip"),
        (gzip.compress(b'{"a": 1}')[:-10], "gzip"),
        (b"{}", "br"),
        (b"{}", "gzip, gzip"),
    ],
)
async def test_undecodable_bodies_are_bad_responses(
    server: HTTPServer, make: Factory, body: bytes, encoding: str
) -> None:
    server.routes["/x"] = reply(200, body, {"Content-Encoding": encoding})
    fetcher, _ = make()
    with pytest.raises(ProtocolViolation) as caught:
        await fetcher.get_json(server.url("/x"), timeout=5, host_class="pds")
    assert caught.value.code == "bad_response"


@pytest.mark.parametrize(
    "body", [b"", b"{", b"<html>rate limited</html>", b'{"a": NaN}', b"[" * 100_000, b'"\xff"']
)
def test_json_refuses_what_is_not_strict_json(body: bytes) -> None:
    with pytest.raises(ProtocolViolation) as caught:
        Response(status=200, headers={}, body=body).json()
    assert caught.value.code == "bad_response"


def test_origin_key_normalises() -> None:
    assert origin_key("https://PDS.Example.com:443/xrpc/x?y=1") == "https://pds.example.com"
    assert origin_key("http://user:pw@[::1]:8080/") == "http://[::1]:8080"
    with pytest.raises(BlockedAddress):
        origin_key("https://h:abc/")


async def test_on_request_hook_sees_every_attempt(server: HTTPServer, make: Factory) -> None:
    server.routes["/ok"] = reply(200)
    server.routes["/gone"] = reply(404)
    server.routes["/hang"] = hang
    seen: list[tuple[str, int | None]] = []
    fetcher, _ = make(on_request=lambda cls, status, seconds: seen.append((cls, status)))
    await fetcher.get_json(server.url("/ok"), timeout=5, host_class="relay")
    await fetcher.get_json(server.url("/gone"), timeout=5, host_class="plc")
    with pytest.raises(UpstreamTimeout):
        await fetcher.get_json(server.url("/hang"), timeout=0.1, host_class="pds")
    assert seen == [("relay", 200), ("plc", 404), ("pds", None)]


# --- timeouts -----------------------------------------------------------------------------------------


async def test_headers_that_never_come_time_out(server: HTTPServer, make: Factory) -> None:
    server.routes["/hang"] = hang
    fetcher, _ = make()
    with pytest.raises(UpstreamTimeout) as caught:
        await fetcher.get_json(server.url("/hang"), timeout=0.2, host_class="pds")
    assert caught.value.code == "timeout"


async def test_a_trickling_body_is_bounded_by_the_same_timeout(server: HTTPServer, make: Factory) -> None:
    # Every byte arrives well within any per-read timeout; only a deadline on the whole page stops it.
    server.routes["/trickle"] = trickle(0.02)
    fetcher, _ = make()
    with pytest.raises(UpstreamTimeout):
        await fetcher.get_json(server.url("/trickle"), timeout=0.3, host_class="pds")
    assert server.count("/trickle") == 1


async def test_connection_refused_is_a_connect_error(make: Factory) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fetcher, _ = make()
    with pytest.raises(UpstreamConnectError) as caught:
        await fetcher.get_json(f"http://127.0.0.1:{port}/", timeout=5, host_class="pds")
    assert caught.value.code == "connect_error"


async def hang_up(request: ServerRequest, stream: trio.SocketStream) -> bool:
    return False


async def garbage(request: ServerRequest, stream: trio.SocketStream) -> bool:
    await stream.send_all(b"SPDY/9 banana\r\n\r\n")
    return False


@pytest.mark.parametrize("handler", [hang_up, garbage])
async def test_broken_servers_are_connect_errors(server: HTTPServer, make: Factory, handler: Any) -> None:
    server.routes["/x"] = handler
    fetcher, _ = make()
    with pytest.raises(UpstreamConnectError):
        await fetcher.get_json(server.url("/x"), timeout=5, host_class="pds")


async def test_unresolvable_names_are_connect_errors(make: Factory) -> None:
    class NoDNS:
        async def resolve(self, host: str, port: int) -> list[str]:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    fetcher, _ = make(allow_private=False, resolver=NoDNS())
    with pytest.raises(UpstreamConnectError):
        await fetcher.get_json("https://nowhere.invalid/", timeout=5, host_class="pds")


# --- size cap -----------------------------------------------------------------------------------------


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.mark.parametrize("declare_length", [False, True])
async def test_a_64_mib_body_is_cut_off_while_streaming(
    server: HTTPServer, make: Factory, declare_length: bool
) -> None:
    server.routes["/small"] = reply(200)
    server.routes["/huge"] = stream_forever(server, 64 * MIB, declare_length=declare_length)
    fetcher, _ = make(max_bytes=MIB)
    await fetcher.get_json(server.url("/small"), timeout=5, host_class="pds")
    rss_before = peak_rss()
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolViolation) as caught:
            await fetcher.get_json(server.url("/huge"), timeout=30, host_class="pds")
        _, python_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.code == "response_too_large"
    assert python_peak < 8 * MIB
    assert peak_rss() - rss_before < 32 * MIB
    # The connection was dropped, not drained: the server's sends failed long before 64 MiB.
    with trio.fail_after(10):
        await server.dropped.wait()
    assert server.bytes_streamed < 32 * MIB
    # The host is still usable.
    assert (await fetcher.get_json(server.url("/small"), timeout=5, host_class="pds")).status == 200


def gzip_bomb(size: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = b" " * MIB
    parts = [packer.compress(block) for _ in range(size // MIB)]
    parts.append(packer.flush())
    return b"".join(parts)


async def test_a_gzip_bomb_is_cut_off_without_inflating_it(server: HTTPServer, make: Factory) -> None:
    bomb = gzip_bomb(64 * MIB)
    server.routes["/bomb"] = reply(200, bomb, {"Content-Encoding": "gzip"})
    fetcher, _ = make(max_bytes=MIB)
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolViolation) as caught:
            await fetcher.get_json(server.url("/bomb"), timeout=30, host_class="pds")
        _, python_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.code == "response_too_large"
    assert len(bomb) < MIB
    assert python_peak < 8 * MIB


async def test_a_body_at_the_limit_is_accepted(server: HTTPServer, make: Factory) -> None:
    body = b'"' + b"x" * 998 + b'"'
    server.routes["/exact"] = reply(200, body)
    server.routes["/exact-gz"] = reply_gzip(200, body)
    fetcher, _ = make(max_bytes=1000)
    assert (await fetcher.get_json(server.url("/exact"), timeout=5, host_class="pds")).body == body
    assert (await fetcher.get_json(server.url("/exact-gz"), timeout=5, host_class="pds")).body == body
    server.routes["/over"] = reply(200, body + b" ")
    with pytest.raises(ProtocolViolation):
        await fetcher.get_json(server.url("/over"), timeout=5, host_class="pds")


# --- redirects ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("host_class", ["pds", "didweb", "plc", "relay"])
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_redirects_are_never_followed(
    server: HTTPServer, make: Factory, host_class: str, status: int
) -> None:
    server.routes["/start"] = reply(status, b"", {"Location": server.url("/target")})
    server.routes["/target"] = reply(200)
    fetcher, _ = make()
    with pytest.raises(ProtocolViolation) as caught:
        await fetcher.get_json(server.url("/start"), timeout=5, host_class=host_class)
    assert caught.value.code == "redirect"
    assert server.count("/start") == 1
    assert server.count("/target") == 0


# --- 429 ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "body", "resume_at"),
    [
        # the reference PDS rounds its unix RateLimit-Reset down: a second is added
        (
            {"RateLimit-Reset": str(int(NOW) + 30), "RateLimit-Remaining": "0"},
            b'{"error":"RateLimitExceeded"}',
            NOW + 31,
        ),
        # the later of RateLimit-Reset and Retry-After
        ({"RateLimit-Reset": str(int(NOW) + 30), "Retry-After": "100"}, b"{}", NOW + 100),
        ({"RateLimit-Reset": str(int(NOW) + 100), "Retry-After": "30"}, b"{}", NOW + 101),
        # at least a second
        ({"Retry-After": "0"}, b"{}", NOW + 1),
        ({"RateLimit-Reset": str(int(NOW) - 50)}, b"{}", NOW + 1),
        ({"Retry-After": "45"}, b'{"error":"RateLimitExceeded"}', NOW + 45),
        ({"Retry-After": email.utils.formatdate(NOW + 120, usegmt=True)}, b"{}", NOW + 120),
        ({"Content-Type": "text/html"}, b"<html><body>Too Many Requests</body></html>", NOW + 60),
        ({}, b"<!doctype html>slow down", NOW + 60),
        ({}, b'{"error":"RateLimitExceeded"}', NOW + 60),
        ({"Retry-After": "86400"}, b"{}", NOW + 900),
        ({"RateLimit-Reset": "whenever"}, b"{}", NOW + 60),
    ],
)
async def test_429_pauses_the_host_and_nothing_more_is_sent(
    server: HTTPServer, make: Factory, headers: dict[str, str], body: bytes, resume_at: float
) -> None:
    server.routes["/x"] = reply(429, body, headers)
    pauses: list[None] = []
    fetcher, hosts = make(pause=60.0, on_pause=lambda: pauses.append(None))
    origin = f"http://127.0.0.1:{server.port}"
    with pytest.raises(RateLimited) as caught:
        await fetcher.get_json(server.url("/x"), timeout=5, host_class="pds")
    assert caught.value.host == origin
    assert caught.value.resume_at == resume_at
    assert hosts.paused_until(origin) == resume_at
    assert len(pauses) == 1
    with pytest.raises(RateLimited) as again:
        await fetcher.get_json(server.url("/other"), timeout=5, host_class="didweb")
    assert again.value.resume_at == resume_at
    assert len(server.requests) == 1


async def test_429_from_a_trusted_host_pauses_it_too(server: HTTPServer, make: Factory) -> None:
    server.routes["/x"] = reply(429, b"{}", {"Retry-After": "10"})
    fetcher, _ = make()
    for _ in range(2):
        with pytest.raises(RateLimited) as caught:
            await fetcher.get_json(server.url("/x"), timeout=5, host_class="relay")
        assert caught.value.resume_at == NOW + 10
    assert len(server.requests) == 1


async def test_a_pause_does_not_spill_over_to_other_hosts(server: HTTPServer, make: Factory) -> None:
    server.routes["/x"] = reply(200)
    fetcher, hosts = make()
    hosts.pause("http://127.0.0.2:1", NOW + 100)
    assert (await fetcher.get_json(server.url("/x"), timeout=5, host_class="pds")).status == 200


# --- SSRF guard and URL policy ------------------------------------------------------------------------


class FakeResolver:
    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses

    async def resolve(self, host: str, port: int) -> list[str]:
        return self.addresses


@pytest.mark.parametrize(
    "address", ["127.0.0.1", "::1", "10.1.2.3", "169.254.169.254", "100.64.1.1", "::ffff:127.0.0.1"]
)
@pytest.mark.parametrize("host_class", ["pds", "didweb"])
async def test_untrusted_names_resolving_to_non_global_addresses_are_blocked(
    server: HTTPServer, make: Factory, address: str, host_class: str
) -> None:
    seen: list[int | None] = []
    fetcher, _ = make(
        allow_private=False,
        resolver=FakeResolver([address]),
        on_request=lambda cls, status, seconds: seen.append(status),
    )
    with pytest.raises(BlockedAddress) as caught:
        await fetcher.get_json(f"https://evil.example:{server.port}/x", timeout=5, host_class=host_class)
    assert caught.value.code == "blocked_address"
    assert address in caught.value.message
    assert server.connections == 0
    assert seen == [None]


@pytest.mark.parametrize(
    "url",
    [
        "https://localhost:{port}/x",
        "https://127.0.0.1:{port}/x",
        "https://[::ffff:127.0.0.1]:{port}/x",
        "https://[::1]:{port}/x",
        "https://0.0.0.0:{port}/x",
    ],
)
async def test_loopback_names_and_literals_are_blocked(server: HTTPServer, make: Factory, url: str) -> None:
    fetcher, _ = make(allow_private=False)
    with pytest.raises(BlockedAddress) as caught:
        await fetcher.get_json(url.format(port=server.port), timeout=5, host_class="pds")
    assert caught.value.code == "blocked_address"
    assert server.connections == 0


@pytest.mark.parametrize("host_class", ["pds", "didweb"])
async def test_plain_http_is_refused_for_untrusted_hosts(
    server: HTTPServer, make: Factory, host_class: str
) -> None:
    fetcher, _ = make(allow_private=False, resolver=FakeResolver(["93.184.216.34"]))
    for url in (server.url("/x"), "http://pds.example.com/x"):
        with pytest.raises(BlockedAddress) as caught:
            await fetcher.get_json(url, timeout=5, host_class=host_class)
        assert caught.value.code == "insecure_url"
    assert server.connections == 0


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/x",
        "file:///etc/passwd",
        "not a url",
        "https://",
        "https://exa mple.com/",
        "https://example.com:99999/",
        "https://h:abc/",
        "https://[::1/",
    ],
)
@pytest.mark.parametrize("host_class", ["pds", "relay"])
async def test_unusable_urls_are_refused(make: Factory, url: str, host_class: str) -> None:
    fetcher, _ = make(allow_private=False)
    with pytest.raises(BlockedAddress) as caught:
        await fetcher.get_json(url, timeout=5, host_class=host_class)
    assert caught.value.code == "insecure_url"


@pytest.mark.parametrize("host_class", ["relay", "plc"])
async def test_trusted_hosts_may_be_plain_http_on_loopback(
    server: HTTPServer, make: Factory, host_class: str
) -> None:
    server.routes["/x"] = reply(200)
    fetcher, _ = make(allow_private=False)
    assert (await fetcher.get_json(server.url("/x"), timeout=5, host_class=host_class)).status == 200


# --- politeness ---------------------------------------------------------------------------------------


async def test_per_host_concurrency_holds_against_many_workers(server: HTTPServer, make: Factory) -> None:
    server.routes["/slow"] = slow(0.03)
    fetcher, _ = make(concurrency=3)
    async with trio.open_nursery() as nursery:
        for _ in range(24):
            nursery.start_soon(lambda: fetcher.get_json(server.url("/slow"), timeout=10, host_class="pds"))
    assert server.count("/slow") == 24
    assert 1 <= server.peak_in_flight <= 3


async def test_trusted_hosts_are_capped_by_trusted_pool_size(server: HTTPServer, make: Factory) -> None:
    server.routes["/slow"] = slow(0.03)
    fetcher, _ = make(trusted_pool_size=2)
    async with trio.open_nursery() as nursery:
        for _ in range(12):
            nursery.start_soon(lambda: fetcher.get_json(server.url("/slow"), timeout=10, host_class="relay"))
    assert server.count("/slow") == 12
    assert server.peak_in_flight <= 2


async def test_per_host_rate_holds_over_any_one_second_window(server: HTTPServer, make: Factory) -> None:
    server.routes["/ok"] = reply(200)
    rate, burst = 25.0, 2
    fetcher, _ = make(concurrency=burst, rate=rate)
    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(lambda: fetcher.get_json(server.url("/ok"), timeout=10, host_class="pds"))
    arrivals = sorted(r.at for r in server.requests)
    assert len(arrivals) == 50
    # The precise schedule is tested on a mock clock (test_hosts.py); on real sockets allow a little
    # bunching from scheduling delays.
    for i, start in enumerate(arrivals):
        assert sum(1 for t in arrivals[i:] if t < start + 1.0) <= rate + burst + 5


# --- the httpcore cancellation hazard -----------------------------------------------------------------


@pytest.mark.parametrize("host_class", ["pds", "relay"])
async def test_many_timeouts_in_a_row_do_not_leak_pool_slots(
    server: HTTPServer, make: Factory, host_class: str
) -> None:
    server.routes["/hang"] = hang
    server.routes["/ok"] = reply(200)
    fetcher, _ = make(concurrency=2, trusted_pool_size=2)
    pool_size = 2 * 2 + 2
    timeouts = 0

    async def doomed() -> None:
        nonlocal timeouts
        try:
            await fetcher.get_json(server.url("/hang"), timeout=0.1, host_class=host_class)
        except UpstreamTimeout:
            timeouts += 1

    async with trio.open_nursery() as nursery:
        for _ in range(3 * pool_size):
            nursery.start_soon(doomed)
    assert timeouts == 3 * pool_size
    for _ in range(pool_size + 1):
        response = await fetcher.get_json(server.url("/ok"), timeout=5, host_class=host_class)
        assert response.status == 200


@pytest.mark.parametrize("host_class", ["pds", "relay"])
async def test_timeouts_while_connecting_do_not_leak_pool_slots(
    nursery: trio.Nursery, make: Factory, host_class: str
) -> None:
    # encode/httpcore#1093: a request that waits for a pool connection and is cancelled just as the pool
    # hands it a new one leaves that connection in the pool for good. Staggered timeouts against a host
    # whose connects hang trigger it within a few rounds when the pool is smaller than the concurrency.
    server = HTTPServer()
    server.start_unresponsive()
    server.routes["/ok"] = reply(200)
    fetcher, _ = make(concurrency=4, trusted_pool_size=4)
    pool_size = 2 * 4 + 2
    rng = random.Random(1093)
    timeouts = 0

    async def doomed() -> None:
        nonlocal timeouts
        try:
            await fetcher.get_json(
                server.url("/hang"), timeout=rng.uniform(0.005, 0.04), host_class=host_class
            )
        except UpstreamTimeout:
            timeouts += 1

    for _ in range(5):
        async with trio.open_nursery() as wave:
            for _ in range(3 * pool_size):
                wave.start_soon(doomed)
    assert timeouts == 15 * pool_size
    await server.start_responding(nursery)
    for _ in range(pool_size + 1):
        response = await fetcher.get_json(server.url("/ok"), timeout=5, host_class=host_class)
        assert response.status == 200


async def test_callers_cancelling_at_any_moment_do_not_break_the_pool(
    server: HTTPServer, make: Factory
) -> None:
    server.routes["/slow"] = slow(0.02)
    server.routes["/ok"] = reply(200)
    fetcher, _ = make(concurrency=2)
    rng = random.Random(7)

    async def impatient(patience: float) -> None:
        with trio.move_on_after(patience):
            await fetcher.get_json(server.url("/slow"), timeout=5, host_class="pds")

    async with trio.open_nursery() as nursery:
        for _ in range(40):
            nursery.start_soon(impatient, rng.uniform(0, 0.05))
    for _ in range(8):
        assert (await fetcher.get_json(server.url("/ok"), timeout=5, host_class="pds")).status == 200


# --- client lifecycle ---------------------------------------------------------------------------------


async def test_idle_clients_beyond_the_limit_are_closed(
    nursery: trio.Nursery, make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetch, "MAX_IDLE_POOLS", 2)
    servers = [await HTTPServer().start(nursery) for _ in range(4)]
    fetcher, _ = make()
    for s in servers:
        s.routes["/x"] = reply(200)
        await fetcher.get_json(s.url("/x"), timeout=5, host_class="pds")
    with trio.fail_after(5):
        while servers[0].open_connections or servers[1].open_connections:
            await trio.sleep(0.01)
    assert servers[3].open_connections == 1
    # An evicted origin simply gets a new client.
    await fetcher.get_json(servers[0].url("/x"), timeout=5, host_class="pds")
    assert servers[0].connections == 2
    await fetcher.aclose()
    with trio.fail_after(5):
        while any(s.open_connections for s in servers):
            await trio.sleep(0.01)


async def test_busy_clients_and_the_one_in_use_are_never_evicted(
    nursery: trio.Nursery, make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetch, "MAX_IDLE_POOLS", 1)
    busy, other = HTTPServer(), HTTPServer()
    await busy.start(nursery)
    await other.start(nursery)
    busy.routes["/slow"] = slow(0.2)
    other.routes["/x"] = reply(200)
    fetcher, _ = make()
    async with trio.open_nursery() as inner:
        inner.start_soon(lambda: fetcher.get_json(busy.url("/slow"), timeout=5, host_class="pds"))
        with trio.fail_after(5):
            while not busy.in_flight:
                await trio.sleep(0.01)
        assert (await fetcher.get_json(other.url("/x"), timeout=5, host_class="pds")).status == 200
    assert busy.count("/slow") == 1


# --- the API: request() holds the body in the budget, get_json() detaches it, stream() streams -----------


async def test_request_holds_the_body_against_the_budget_until_the_context_ends(
    server: HTTPServer, make: Factory
) -> None:
    body = b'{"records": [' + b'{"a": 1},' * 99 + b'{"a": 1}]}'
    server.routes["/x"] = reply(200, body, {"X-Thing": "yes"})
    budget = MemoryBudget(total=100_000)
    fetcher, hosts = make(budget=budget, concurrency=1)
    origin = f"http://127.0.0.1:{server.port}"
    async with fetcher.request(server.url("/x"), params={"a": "b"}, timeout=5, host_class="pds") as response:
        assert (response.status, response.headers["x-thing"], bytes(response.body)) == (200, "yes", body)
        assert budget.held == len(body)
        # a decode reserves its worst case on top, until the context ends
        await response.reserve(3)
        assert budget.held == 4 * len(body)
        await response.reserve_bytes(10)
        assert budget.held == 4 * len(body) + 10
        assert response.json() == {"records": [{"a": 1}] * 100}
        # the host slot was given back before the body was handed over
        assert not [h for h in hosts.snapshot() if h.host == origin and h.in_flight]
    assert budget.held == 0
    assert budget.peak == 4 * len(body) + 10
    [request] = server.requests
    assert request.query == {"a": "b"}
    assert request.headers["accept"] == "application/json"


async def test_request_releases_the_budget_when_the_caller_raises(server: HTTPServer, make: Factory) -> None:
    server.routes["/x"] = reply(200, b"x" * 5000)
    budget = MemoryBudget(total=100_000)
    fetcher, _ = make(budget=budget)
    with pytest.raises(KeyError):
        async with fetcher.request(server.url("/x"), timeout=5, host_class="pds") as response:
            assert budget.held == len(response.body) == 5000
            raise KeyError("the caller's own failure")
    assert budget.held == 0


async def test_get_json_returns_a_detached_response(server: HTTPServer, make: Factory) -> None:
    server.routes["/x"] = reply(200, b'{"ok": true}')
    budget = MemoryBudget(total=100_000)
    fetcher, _ = make(budget=budget)
    response = await fetcher.get_json(server.url("/x"), timeout=5, host_class="plc")
    assert budget.held == 0 and budget.peak == len(b'{"ok": true}')
    assert response.holder is None
    await response.reserve(100)  # nothing to hold it against any more: a no-op
    assert budget.held == 0
    assert response.json() == {"ok": True}


def chunked(pieces: list[bytes], headers: dict[str, str] | None = None) -> Any:
    """A handler answering with a chunked body, one piece per chunk."""

    async def handler(request: ServerRequest, stream: trio.SocketStream) -> bool:
        head = {"Content-Type": "application/vnd.ipld.car", "Transfer-Encoding": "chunked", **(headers or {})}
        await stream.send_all(response_bytes(200, b"", head, length=False))
        for piece in pieces:
            await stream.send_all(b"%x\r\n%s\r\n" % (len(piece), piece))
        await stream.send_all(b"0\r\n\r\n")
        return True

    return handler


async def test_stream_hands_over_the_body_as_it_arrives(server: HTTPServer, make: Factory) -> None:
    pieces = [bytes([n]) * 1000 for n in range(10)]
    server.routes["/car"] = chunked(pieces)
    budget = MemoryBudget(total=100_000)
    fetcher, hosts = make(budget=budget, concurrency=1)
    origin = f"http://127.0.0.1:{server.port}"
    received = bytearray()
    async with fetcher.stream(
        server.url("/car"), params={"cids": ["a", "b"]}, timeout=5, host_class="pds", max_bytes=20_000
    ) as streamed:
        assert streamed.status == 200
        assert streamed.headers["content-type"] == "application/vnd.ipld.car"
        # the host slot (and the deadline) cover the whole stream
        assert [h.in_flight for h in hosts.snapshot() if h.host == origin] == [1]
        async for chunk in streamed.chunks:
            received += chunk
    assert bytes(received) == b"".join(pieces)
    assert budget.peak == 0  # what a streamed body holds is its consumer's business
    assert not hosts.snapshot()
    [request] = server.requests
    assert request.target.endswith("?cids=a&cids=b")  # a list parameter repeats, as XRPC arrays do
    assert request.headers["accept"] == "application/vnd.ipld.car"


@pytest.mark.parametrize("gzipped", [False, True])
async def test_stream_refuses_a_body_over_its_own_cap_with_its_code(
    server: HTTPServer, make: Factory, gzipped: bool
) -> None:
    if gzipped:
        server.routes["/car"] = chunked([gzip.compress(b"c" * 50_000)], {"Content-Encoding": "gzip"})
    else:
        server.routes["/car"] = chunked([b"c" * 10_000] * 5)
    fetcher, _ = make(max_bytes=MIB)
    with pytest.raises(ProtocolViolation) as caught:
        async with fetcher.stream(
            server.url("/car"),
            timeout=5,
            host_class="pds",
            max_bytes=20_000,
            too_large_code=Code.CAR_TOO_LARGE,
        ) as streamed:
            async for _ in streamed.chunks:
                pass
    assert caught.value.code == "car_too_large"


async def test_a_stream_that_stalls_times_out(server: HTTPServer, make: Factory) -> None:
    server.routes["/car"] = trickle(0.05)
    fetcher, _ = make()
    with pytest.raises(UpstreamTimeout):
        async with fetcher.stream(
            server.url("/car"), timeout=0.3, host_class="pds", max_bytes=MIB
        ) as streamed:
            async for _ in streamed.chunks:
                pass


# --- a per-request max_bytes cap --------------------------------------------------------------------------


async def test_max_bytes_caps_one_request_below_max_response_bytes(server: HTTPServer, make: Factory) -> None:
    body = b'"' + b"x" * 998 + b'"'
    server.routes["/doc"] = reply(200, body)
    server.routes["/doc-chunked"] = chunked([body[:500], body[500:]])
    server.routes["/doc-gz"] = reply_gzip(200, body)
    fetcher, _ = make(max_bytes=MIB)
    for path in ("/doc", "/doc-chunked", "/doc-gz"):
        assert (
            await fetcher.get_json(server.url(path), timeout=5, host_class="pds", max_bytes=1000)
        ).body == body
        with pytest.raises(ProtocolViolation) as caught:
            await fetcher.get_json(server.url(path), timeout=5, host_class="plc", max_bytes=999)
        assert caught.value.code == "response_too_large"
        with pytest.raises(ProtocolViolation):
            async with fetcher.request(server.url(path), timeout=5, host_class="pds", max_bytes=999):
                raise AssertionError("never handed over")
    # without max_bytes, max_response_bytes applies
    assert (await fetcher.get_json(server.url("/doc"), timeout=5, host_class="pds")).body == body


# --- the memory budget ------------------------------------------------------------------------------------


async def test_a_response_that_needs_more_than_the_whole_budget_is_refused_at_once(
    server: HTTPServer, make: Factory
) -> None:
    server.routes["/small"] = reply(200, b"s" * 600)
    server.routes["/big"] = reply(200, b"b" * 1500)
    budget = MemoryBudget(total=1000)
    fetcher, _ = make(budget=budget, max_bytes=MIB)
    with pytest.raises(ProtocolViolation) as caught:
        await fetcher.get_json(server.url("/big"), timeout=5, host_class="pds")
    assert caught.value.code == "response_too_large"
    assert "budget" in caught.value.message
    assert budget.held == 0
    # refused at once even while the budget is partly held by another response (no waiting for it)
    async with fetcher.request(server.url("/small"), timeout=5, host_class="pds"):
        with trio.fail_after(5), pytest.raises(ProtocolViolation):
            await fetcher.get_json(server.url("/big"), timeout=5, host_class="pds")
        assert budget.held == 600
    # a decode's reservation counts too: a body that fits, whose decode would not, is refused
    async with fetcher.request(server.url("/small"), timeout=5, host_class="pds") as response:
        with pytest.raises(ProtocolViolation) as caught:
            await response.reserve(1)
        assert caught.value.code == "response_too_large"
    assert budget.held == 0 and budget.peak <= 1000


async def test_a_second_response_waits_until_the_first_is_released(server: HTTPServer, make: Factory) -> None:
    server.routes["/first"] = reply(200, b"1" * 600)
    server.routes["/second"] = reply(200, b"2" * 600)
    budget = MemoryBudget(total=1000)
    fetcher, _ = make(budget=budget, max_bytes=MIB)
    events: list[str] = []

    async def second() -> None:
        response = await fetcher.get_json(server.url("/second"), timeout=30, host_class="pds")
        assert response.body == b"2" * 600
        events.append("second done")

    async with trio.open_nursery() as nursery:
        async with fetcher.request(server.url("/first"), timeout=5, host_class="pds") as first:
            assert budget.held == 600
            nursery.start_soon(second)
            # the second request is sent and answered in full; its body cannot fit beside the first
            with trio.fail_after(10):
                while server.count("/second") < 1 or server.in_flight:
                    await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked()
            assert events == [] and budget.held == 600
            events.append("first released")
            assert first.body == b"1" * 600
    assert events == ["first released", "second done"]
    assert budget.peak == 600  # never both at once
    assert budget.held == 0


# --- cookies and the source address --------------------------------------------------------------------


def setting_cookies(seen: list[ServerRequest]) -> Any:
    async def handler(request: ServerRequest, stream: trio.SocketStream) -> bool:
        seen.append(request)
        headers = {
            "Content-Type": "application/json",
            "Set-Cookie": "session=abc123; Path=/; HttpOnly",
        }
        await stream.send_all(response_bytes(200, b"{}", headers))
        return True

    return handler


@pytest.mark.parametrize("host_class", ["pds", "relay"])
async def test_cookies_are_never_stored_or_sent(server: HTTPServer, make: Factory, host_class: str) -> None:
    seen: list[ServerRequest] = []
    server.routes["/login"] = setting_cookies(seen)
    server.routes["/again"] = setting_cookies(seen)
    fetcher, _ = make()
    for path in ("/login", "/again", "/login"):
        response = await fetcher.get_json(server.url(path), timeout=5, host_class=host_class)
        assert response.headers["set-cookie"].startswith("session=abc123")
    async with fetcher.stream(server.url("/again"), timeout=5, host_class=host_class, max_bytes=MIB) as s:
        async for _ in s.chunks:
            pass
    assert len(seen) == 4
    assert server.connections == 1  # the same connection all along, and still no cookie
    assert not [r for r in seen if "cookie" in r.headers]


def peer_recording(peers: list[str]) -> Any:
    async def handler(request: ServerRequest, stream: trio.SocketStream) -> bool:
        peers.append(stream.socket.getpeername()[0])
        await stream.send_all(response_bytes(200, b"{}", {"Content-Type": "application/json"}))
        return True

    return handler


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="127.0.0.0/8 is all loopback on Linux only")
@pytest.mark.parametrize("host_class", ["pds", "plc"])
async def test_local_address_binds_the_source_address(
    server: HTTPServer, make: Factory, host_class: str
) -> None:
    peers: list[str] = []
    server.routes["/who"] = peer_recording(peers)
    bound, _ = make(local_address="127.0.0.2")
    default, _ = make()
    await bound.get_json(server.url("/who"), timeout=5, host_class=host_class)
    async with bound.stream(server.url("/who"), timeout=5, host_class=host_class, max_bytes=MIB) as s:
        async for _ in s.chunks:
            pass
    await default.get_json(server.url("/who"), timeout=5, host_class=host_class)
    assert peers == ["127.0.0.2", "127.0.0.2", "127.0.0.1"]


async def test_server_helper_sanity() -> None:
    assert response_bytes(200, b"{}").startswith(b"HTTP/1.1 200 X\r\n")
