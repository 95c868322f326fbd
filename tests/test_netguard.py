from __future__ import annotations

import socket
import ssl
from collections.abc import Iterable

import httpcore
import pytest
import trio

from daemon.errors import BlockedAddress
from daemon.net.guard import GuardedNetworkBackend, SystemResolver, is_global_address

PUBLIC_V4 = "93.184.216.34"
PUBLIC_V6 = "2606:2800:220:1:248:1893:25c8:1946"


@pytest.mark.parametrize(
    "ip",
    [
        "127.0.0.1",
        "127.8.9.10",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.1.1",
        "100.127.255.254",
        "0.0.0.0",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "192.0.2.1",
        "198.18.0.1",
        "::1",
        "::",
        "fe80::1",
        "fe80::1%eth0",
        "fc00::1",
        "fd12:3456::1",
        "fec0::1",
        "ff02::1",
        "ff0e::1",
        "2001:db8::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "::127.0.0.1",
        "2002:7f00:1::1",
        "2002:a9fe:a9fe::1",
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",
        "64:ff9b::7f00:1",
        "64:ff9b::a00:1",
        "64:ff9b:1::808:808",
        "not an address",
        "",
        "localhost",
    ],
)
def test_non_global_addresses_are_refused(ip: str) -> None:
    assert not is_global_address(ip)


@pytest.mark.parametrize(
    "ip",
    [PUBLIC_V4, "8.8.8.8", "1.1.1.1", PUBLIC_V6, "::ffff:8.8.8.8", "2002:808:808::1", "64:ff9b::808:808"],
)
def test_global_addresses_are_allowed(ip: str) -> None:
    assert is_global_address(ip)


class FakeResolver:
    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def resolve(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.answers[host]


class FakeStream(httpcore.AsyncNetworkStream):
    """Pretends to be connected to ``peer``; answers every request with a canned 200."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.tls_hostname: str | None = None
        self.written = b""
        self.closed = False
        self._answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        answer, self._answer = self._answer, b""
        return answer

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.written += buffer

    async def aclose(self) -> None:
        self.closed = True

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        self.tls_hostname = server_hostname
        return self

    def get_extra_info(self, info: str) -> object:
        if info == "server_addr":
            return (self.peer, 443)
        return None


class FakeInner(httpcore.AsyncNetworkBackend):
    """Connects instantly; ``peers`` overrides the peer a connection reports (a rebinding middlebox),
    ``hang`` addresses never answer and ``refuse`` addresses fail."""

    def __init__(
        self, *, peers: dict[str, str] | None = None, hang: Iterable[str] = (), refuse: Iterable[str] = ()
    ) -> None:
        self.peers = peers or {}
        self.hang = set(hang)
        self.refuse = set(refuse)
        self.attempts: list[str] = []
        self.streams: list[FakeStream] = []

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.attempts.append(host)
        if host in self.hang:
            await trio.sleep_forever()
        if host in self.refuse:
            raise httpcore.ConnectError(f"connection to {host} refused")
        stream = FakeStream(self.peers.get(host, host))
        self.streams.append(stream)
        return stream


async def test_connects_to_the_vetted_ip_literal_and_keeps_the_hostname_for_tls() -> None:
    resolver = FakeResolver({"pds.example.test": [PUBLIC_V4]})
    inner = FakeInner()
    backend = GuardedNetworkBackend(resolver=resolver, inner=inner)
    async with httpcore.AsyncConnectionPool(network_backend=backend) as pool:
        response = await pool.request("GET", "https://pds.example.test/xrpc/_health")
    assert response.status == 200
    assert resolver.asked == ["pds.example.test"]
    assert inner.attempts == [PUBLIC_V4]
    assert inner.streams[0].tls_hostname == "pds.example.test"
    assert b"Host: pds.example.test" in inner.streams[0].written


@pytest.mark.parametrize(
    "bad", ["127.0.0.1", "::1", "10.1.2.3", "169.254.169.254", "100.64.1.1", "::ffff:127.0.0.1", "fd00::1"]
)
async def test_a_name_resolving_to_a_non_global_address_is_refused_before_connecting(bad: str) -> None:
    inner = FakeInner()
    backend = GuardedNetworkBackend(resolver=FakeResolver({"evil.test": [bad]}), inner=inner)
    with pytest.raises(BlockedAddress) as caught:
        await backend.connect_tcp("evil.test", 443)
    assert caught.value.code == "blocked_address"
    assert "evil.test" in caught.value.message and bad in caught.value.message
    assert inner.attempts == []


async def test_one_non_global_answer_among_global_ones_refuses_the_host() -> None:
    inner = FakeInner()
    resolver = FakeResolver({"mixed.test": [PUBLIC_V4, "127.0.0.1"]})
    with pytest.raises(BlockedAddress):
        await GuardedNetworkBackend(resolver=resolver, inner=inner).connect_tcp("mixed.test", 443)
    assert inner.attempts == []


async def test_ip_literals_are_checked_without_resolving() -> None:
    resolver = FakeResolver({})
    inner = FakeInner()
    backend = GuardedNetworkBackend(resolver=resolver, inner=inner)
    with pytest.raises(BlockedAddress):
        await backend.connect_tcp("169.254.169.254", 80)
    stream = await backend.connect_tcp(PUBLIC_V4, 443)
    assert stream.get_extra_info("server_addr") == (PUBLIC_V4, 443)
    assert resolver.asked == []


async def test_the_connected_peer_is_checked_again() -> None:
    # The resolver said "public", but the socket ended up somewhere private.
    inner = FakeInner(peers={PUBLIC_V4: "10.0.0.7"})
    backend = GuardedNetworkBackend(resolver=FakeResolver({"rebind.test": [PUBLIC_V4]}), inner=inner)
    with pytest.raises(BlockedAddress) as caught:
        await backend.connect_tcp("rebind.test", 443)
    assert "10.0.0.7" in caught.value.message
    assert inner.streams[0].closed
    assert inner.streams[0].written == b""


async def test_a_peer_that_cannot_be_verified_is_refused() -> None:
    class Anonymous(FakeStream):
        def get_extra_info(self, info: str) -> object:
            return None

    class Inner(FakeInner):
        async def connect_tcp(
            self,
            host: str,
            port: int,
            timeout: float | None = None,
            local_address: str | None = None,
            socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
        ) -> httpcore.AsyncNetworkStream:
            return Anonymous(host)

    backend = GuardedNetworkBackend(resolver=FakeResolver({"x.test": [PUBLIC_V4]}), inner=Inner())
    with pytest.raises(BlockedAddress):
        await backend.connect_tcp("x.test", 443)


async def test_unresolvable_and_empty_names_are_connect_errors() -> None:
    backend = GuardedNetworkBackend(resolver=FakeResolver({"empty.test": []}), inner=FakeInner())
    with pytest.raises(httpcore.ConnectError):
        await backend.connect_tcp("nowhere.test", 443)
    with pytest.raises(httpcore.ConnectError):
        await backend.connect_tcp("empty.test", 443)


async def test_unix_sockets_are_refused() -> None:
    with pytest.raises(BlockedAddress):
        await GuardedNetworkBackend(inner=FakeInner()).connect_unix_socket("/run/docker.sock")


async def test_a_hanging_first_address_falls_back_to_the_other_family(
    mock_clock: trio.testing.MockClock,
) -> None:
    mock_clock.autojump_threshold = 0
    inner = FakeInner(hang=[PUBLIC_V6])
    resolver = FakeResolver({"dual.test": [PUBLIC_V6, "2606:4700::1111", PUBLIC_V4]})
    stream = await GuardedNetworkBackend(resolver=resolver, inner=inner).connect_tcp("dual.test", 443)
    assert stream.get_extra_info("server_addr") == (PUBLIC_V4, 443)
    # RFC 8305 interleaving: the IPv4 address is tried second, not after every IPv6 address.
    assert inner.attempts == [PUBLIC_V6, PUBLIC_V4]


async def test_a_refused_address_moves_on_at_once_and_all_refused_is_a_connect_error() -> None:
    inner = FakeInner(refuse=["1.1.1.1"])
    resolver = FakeResolver({"a.test": ["1.1.1.1", "8.8.8.8"], "b.test": ["1.1.1.1"]})
    backend = GuardedNetworkBackend(resolver=resolver, inner=inner)
    stream = await backend.connect_tcp("a.test", 443)
    assert stream.get_extra_info("server_addr") == ("8.8.8.8", 443)
    with pytest.raises(httpcore.ConnectError):
        await backend.connect_tcp("b.test", 443)


async def test_system_resolver_answers_localhost() -> None:
    addresses = await SystemResolver().resolve("localhost", 80)
    assert addresses
    assert not any(is_global_address(a) for a in addresses)
