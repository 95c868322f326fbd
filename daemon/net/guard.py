"""SSRF guard: connections to attacker-chosen hosts may only reach globally routable addresses (SPEC 7).

PDS and did:web URLs come from DID documents, which anyone can write. Without this guard a hostile document
could point the daemon at ``127.0.0.1``, the cloud metadata service at ``169.254.169.254`` or a host on the
operator's LAN. The guard lives in the connection layer (an httpcore network backend) rather than in URL
validation, because only there can it see the address that is actually connected to:

1. the host name is resolved once, through an injectable :class:`AddressResolver`;
2. if *any* resolved address is not global the connection is refused. A real PDS never publishes a private
   address, and a mix of public and private answers is the classic way to win a race against a checker;
3. the connection is made to the vetted IP literals only, so nothing re-resolves the name (DNS rebinding
   between check and use cannot happen);
4. the peer address of the connected socket is checked again before a single byte is sent.

TLS is unaffected: httpcore passes the URL's host name as ``server_hostname`` to ``start_tls``, so SNI and
certificate verification use the name while the TCP connection goes to the IP literal.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Iterable
from typing import Protocol

import httpcore
import trio

from daemon.errors import BlockedAddress, Code

# RFC 6052 well-known NAT64 prefix: the last 32 bits are an IPv4 address, and a DNS64 resolver on an
# IPv6-only host hands these out for every IPv4-only server. Allowed when the embedded address is global,
# so that an IPv6-only deployment can still reach IPv4-only PDSes.
_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")

# RFC 8305: wait this long for one address before also trying the next (the value trio uses).
HAPPY_EYEBALLS_DELAY = 0.25


def is_global_address(ip: str) -> bool:
    """True when ``ip`` (an IPv4 or IPv6 literal) is a publicly routable unicast address.

    Refused: anything that does not parse; loopback, private (RFC 1918, ULA), link-local, CGNAT
    (100.64.0.0/10), multicast, reserved, unspecified, site-local and documentation ranges; IPv4-mapped IPv6
    (``::ffff:127.0.0.1``) and 6to4 (``2002::/16``) addresses whose embedded IPv4 address is not global;
    Teredo (``2001::/32``, its client address is obfuscated and no PDS is reached that way); NAT64 outside the
    well-known prefix. The well-known NAT64 prefix ``64:ff9b::/96`` is allowed exactly when its embedded IPv4
    address is global.
    """
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return _is_global(address.ipv4_mapped)
        if address in _NAT64_WELL_KNOWN:
            return _is_global(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        if address.teredo is not None:
            return False
        if address.sixtofour is not None and not _is_global(address.sixtofour):
            return False
    return _is_global(address)


def _is_global(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    # is_global alone is not enough: the stdlib calls multicast (224.0.0.0/4, ff0e::/16) and the
    # deprecated site-local range global.
    site_local = isinstance(address, ipaddress.IPv6Address) and address.is_site_local
    return address.is_global and not (
        address.is_multicast
        or address.is_private
        or address.is_reserved
        or address.is_loopback
        or address.is_link_local
        or address.is_unspecified
        or site_local
    )


class AddressResolver(Protocol):
    """Resolves a host name to IP address literals, in the order they should be tried."""

    async def resolve(self, host: str, port: int) -> list[str]:
        """Return the addresses of ``host``; raise OSError when it cannot be resolved."""
        ...


class SystemResolver:
    """The operating system's resolver (getaddrinfo, run in a thread by trio)."""

    async def resolve(self, host: str, port: int) -> list[str]:
        """Return the TCP addresses of ``host`` in getaddrinfo's (RFC 6724) order."""
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return [str(sockaddr[0]) for *_, sockaddr in infos]


def _blocked(host: str, address: str) -> BlockedAddress:
    if host == address:
        message = f"refusing to connect to non-global address {address}"
    else:
        message = f"refusing to connect to {host}: it resolves to non-global address {address}"
    return BlockedAddress(message, code=Code.BLOCKED_ADDRESS)


def _interleave_families(addresses: list[str]) -> list[str]:
    # RFC 8305 section 4: the second attempt uses the other address family, so that a broken IPv6 route
    # costs one happy-eyeballs delay rather than one delay per IPv6 address.
    if not addresses:
        return addresses
    first_is_v6 = ":" in addresses[0]
    for index, address in enumerate(addresses[1:], start=1):
        if (":" in address) != first_is_v6:
            return [addresses[0], address, *addresses[1:index], *addresses[index + 1 :]]
    return addresses


class GuardedNetworkBackend(httpcore.AsyncNetworkBackend):
    """An httpcore network backend that only connects to global addresses (see the module docstring).

    ``inner`` makes the actual connections (default: httpcore's trio backend); it is always given IP
    literals. Unix sockets are refused outright.
    """

    def __init__(
        self,
        *,
        resolver: AddressResolver | None = None,
        inner: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self._resolver: AddressResolver = resolver if resolver is not None else SystemResolver()
        self._inner: httpcore.AsyncNetworkBackend = inner if inner is not None else httpcore.TrioBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Resolve ``host``, vet every address, connect to a vetted one and vet the peer again."""
        addresses = await self._vetted_addresses(host, port)
        failures: list[Exception] = []
        blocked: list[BlockedAddress] = []
        connected: list[httpcore.AsyncNetworkStream] = []

        async def attempt(address: str, failed: trio.Event, done: trio.CancelScope) -> None:
            # Never raise: a nursery would wrap the error in an ExceptionGroup.
            try:
                stream = await self._inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except Exception as exc:
                failures.append(exc)
                failed.set()
                return
            connected.append(stream)
            try:
                self._check_peer(host, stream)
            except BlockedAddress as exc:
                blocked.append(exc)
            done.cancel()

        try:
            async with trio.open_nursery() as nursery:
                for address in addresses:
                    failed = trio.Event()
                    nursery.start_soon(attempt, address, failed, nursery.cancel_scope)
                    with trio.move_on_after(HAPPY_EYEBALLS_DELAY):
                        await failed.wait()
        except BaseException:
            for stream in connected:
                await _close_quietly(stream)
            raise
        # Two attempts can both succeed before the first one's cancel lands; keep one.
        for stream in connected[1:] if not blocked else connected:
            await _close_quietly(stream)
        if blocked:
            raise blocked[0]
        if connected:
            return connected[0]
        if failures:
            raise failures[-1]
        raise httpcore.ConnectError(f"could not connect to {host}")

    async def _vetted_addresses(self, host: str, port: int) -> list[str]:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            if not is_global_address(host):
                raise _blocked(host, host)
            return [host]
        try:
            resolved = await self._resolver.resolve(host, port)
        except (OSError, UnicodeError) as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        addresses = list(dict.fromkeys(resolved))
        if not addresses:
            raise httpcore.ConnectError(f"{host} has no addresses")
        for address in addresses:
            if not is_global_address(address):
                raise _blocked(host, address)
        return _interleave_families(addresses)

    @staticmethod
    def _check_peer(host: str, stream: httpcore.AsyncNetworkStream) -> None:
        peer = stream.get_extra_info("server_addr")
        address = str(peer[0]) if isinstance(peer, tuple) and peer else None
        if address is None:
            raise BlockedAddress(f"cannot verify the peer address of {host}", code=Code.BLOCKED_ADDRESS)
        if not is_global_address(address):
            raise _blocked(host, address)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Unix sockets are never a legitimate destination for an untrusted URL."""
        raise BlockedAddress(f"refusing to connect to unix socket {path}", code=Code.BLOCKED_ADDRESS)

    async def sleep(self, seconds: float) -> None:
        """Sleep on trio's clock (httpcore uses this for retry back-off)."""
        await trio.sleep(seconds)


async def _close_quietly(stream: httpcore.AsyncNetworkStream) -> None:
    # A stream that lost the race or failed the peer check is useless either way; a failure to close it
    # politely must not replace the real outcome.
    closing = trio.CancelScope(shield=True, deadline=trio.current_time() + 1.0)
    quietly = contextlib.suppress(
        OSError, trio.BrokenResourceError, trio.ClosedResourceError, httpcore.NetworkError
    )
    with closing, quietly:
        await stream.aclose()
