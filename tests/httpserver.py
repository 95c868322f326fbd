"""A tiny HTTP/1.1 test server on loopback, run in the test's own trio loop.

Handlers write raw bytes, so a test can hang, trickle, stream without end or break the protocol. The server
counts connections, requests and requests in flight, and notes when a client dropped a connection while
the server was still sending.
"""

from __future__ import annotations

import gzip
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from urllib.parse import parse_qsl, urlsplit

import trio

# A handler answers one request; it returns True to keep the connection open for the next one.
Handler = Callable[["ServerRequest", trio.SocketStream], Awaitable[bool]]


@dataclass(frozen=True, slots=True)
class ServerRequest:
    method: str
    target: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    at: float


def response_bytes(
    status: int, body: bytes = b"", headers: dict[str, str] | None = None, *, length: bool = True
) -> bytes:
    lines = [f"HTTP/1.1 {status} X"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def reply(status: int, body: bytes = b"{}", headers: dict[str, str] | None = None) -> Handler:
    """A handler that answers with a fixed response."""
    payload = response_bytes(status, body, {"Content-Type": "application/json", **(headers or {})})

    async def handler(request: ServerRequest, stream: trio.SocketStream) -> bool:
        await stream.send_all(payload)
        return True

    return handler


def reply_gzip(status: int, body: bytes) -> Handler:
    payload = response_bytes(
        status, gzip.compress(body), {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    )

    async def handler(request: ServerRequest, stream: trio.SocketStream) -> bool:
        await stream.send_all(payload)
        return True

    return handler


async def hang(request: ServerRequest, stream: trio.SocketStream) -> bool:
    await trio.sleep_forever()
    raise AssertionError("unreachable")


@dataclass
class HTTPServer:
    routes: dict[str, Handler] = field(default_factory=dict)
    requests: list[ServerRequest] = field(default_factory=list)
    connections: int = 0
    open_connections: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    port: int = 0
    bytes_streamed: int = 0
    dropped: trio.Event = field(default_factory=trio.Event)
    _unresponsive: socket.socket | None = None

    async def start(self, nursery: trio.Nursery) -> HTTPServer:
        listeners = await nursery.start(partial(trio.serve_tcp, self._connection, 0, host="127.0.0.1"))
        self.port = listeners[0].socket.getsockname()[1]
        return self

    def start_unresponsive(self) -> None:
        """Listen without accepting: once the tiny accept queue is full, connection attempts hang."""
        raw = socket.socket()
        raw.bind(("127.0.0.1", 0))
        raw.listen(0)
        self.port = raw.getsockname()[1]
        self._unresponsive = raw

    async def start_responding(self, nursery: trio.Nursery) -> None:
        """Accept (and serve) the connections of :meth:`start_unresponsive` from now on."""
        assert self._unresponsive is not None
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(self._unresponsive))
        nursery.start_soon(trio.serve_listeners, self._connection, [listener])

    def url(self, path: str, *, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def count(self, path: str) -> int:
        return sum(1 for r in self.requests if r.path == path)

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        self.open_connections += 1
        try:
            await self._serve(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.dropped.set()
        finally:
            self.open_connections -= 1
            await stream.aclose()

    async def _serve(self, stream: trio.SocketStream) -> None:
        buffer = b""
        while True:
            while b"\r\n\r\n" not in buffer:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
            head, buffer = buffer.split(b"\r\n\r\n", 1)
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, _ = request_line.split(" ", 2)
            headers = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            parts = urlsplit(target)
            request = ServerRequest(
                method, target, parts.path, dict(parse_qsl(parts.query)), headers, trio.current_time()
            )
            self.requests.append(request)
            handler = self.routes.get(parts.path, reply(404, b'{"error":"NotFound"}'))
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            try:
                keep_alive = await handler(request, stream)
            finally:
                self.in_flight -= 1
            if not keep_alive:
                return


def stream_forever(server: HTTPServer, total: int, *, declare_length: bool) -> Handler:
    """A handler sending ``total`` bytes of JSON-ish filler in 64 KiB chunks, counting what it sent."""
    chunk = b" " * 65536

    async def handler(request: ServerRequest, stream: trio.SocketStream) -> bool:
        headers = {"Content-Type": "application/json"}
        if declare_length:
            headers["Content-Length"] = str(total)
        else:
            headers["Connection"] = "close"
        await stream.send_all(response_bytes(200, b"", headers, length=False))
        sent = 0
        while sent < total:
            await stream.send_all(chunk)
            sent += len(chunk)
            server.bytes_streamed = sent
        return False

    return handler


def trickle(interval: float) -> Handler:
    """Headers at once, then one byte of a 1000-byte body every ``interval`` seconds."""

    async def handler(request: ServerRequest, stream: trio.SocketStream) -> bool:
        await stream.send_all(response_bytes(200, b"", {"Content-Length": "1000"}, length=False))
        for _ in range(1000):
            await trio.sleep(interval)
            await stream.send_all(b" ")
        return True

    return handler


def slow(seconds: float) -> Handler:
    async def handler(request: ServerRequest, stream: trio.SocketStream) -> bool:
        await trio.sleep(seconds)
        await stream.send_all(response_bytes(200, b"{}", {"Content-Type": "application/json"}))
        return True

    return handler
