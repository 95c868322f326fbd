"""A small HTTP/1.1 server on trio and h11 that carries out the actions of :mod:`daemon.simnet.actions`.

One task per connection, keep-alive; a request body (the control endpoint's POSTs) is read up to
:data:`MAX_BODY` bytes (413 beyond). Every origin counts what it serves in an :class:`OriginStats`.
"""

from __future__ import annotations

import http
from collections import Counter
from dataclasses import dataclass
from typing import Final

import h11
import trio

from daemon.simnet.actions import (
    Action,
    Chunks,
    Disconnect,
    Handler,
    Hang,
    Reply,
    Request,
    Stream,
    error_reply,
)

RECEIVE_SIZE: Final = 65536
MAX_BODY: Final = 1_048_576
_REASONS: Final = {status.value: status.phrase.encode() for status in http.HTTPStatus}
_BAD_REQUEST: Final = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class OriginStats:
    """What one origin has served since it started or was last reset.

    ``seen`` holds ``(path, query)`` per request when the origin records requests, ``timestamps`` the
    ``trio.current_time()`` at which each request arrived, ``clients`` the requests per client address;
    ``in_flight`` counts requests received and not yet fully answered (or abandoned), ``peak_in_flight`` its
    maximum. ``rate_limited`` counts the 429s a
    host's own rate limit (``HostOptions.rate_limit``) sent, apart from those of the 429 hostile modes.
    """

    def __init__(self, record_requests: bool = True) -> None:
        self.record_requests = record_requests
        self.requests = 0
        self.seen: list[tuple[str, str]] = []
        self.timestamps: list[float] = []
        self.statuses: Counter[int] = Counter()
        self.in_flight = 0
        self.peak_in_flight = 0
        self.rate_limited = 0
        self.clients: Counter[str] = Counter()

    def reset(self) -> None:
        """Forget everything counted so far (requests still in flight stay counted as in flight)."""
        self.requests = 0
        self.seen = []
        self.timestamps = []
        self.statuses = Counter()
        self.peak_in_flight = self.in_flight
        self.rate_limited = 0
        self.clients = Counter()

    def count_rate_limited(self) -> None:
        """Count one 429 sent by the host's own rate limit."""
        self.rate_limited += 1

    def started(self, path: str, query: str, now: float, client: str = "") -> None:
        """Count a request that has just arrived (from the ``client`` address)."""
        self.requests += 1
        self.clients[client] += 1
        if self.record_requests:
            self.seen.append((path, query))
        self.timestamps.append(now)
        self.in_flight += 1
        if self.in_flight > self.peak_in_flight:
            self.peak_in_flight = self.in_flight

    def finished(self, status: int | None) -> None:
        """Count the end of a request; ``status`` is None when no status line was sent."""
        self.in_flight -= 1
        if status is not None:
            self.statuses[status] += 1

    def peak_rate(self, window: float = 1.0) -> int:
        """The largest number of requests that arrived within any ``window`` seconds."""
        best = 0
        first = 0
        times = self.timestamps
        for last, moment in enumerate(times):
            while moment - times[first] >= window:
                first += 1
            best = max(best, last - first + 1)
        return best

    def count(self, path: str | None = None) -> int:
        """Requests recorded for ``path`` (all recorded requests when None)."""
        return len(self.seen) if path is None else sum(1 for seen_path, _ in self.seen if seen_path == path)

    def snapshot(self, *, timestamps: bool = False) -> dict[str, object]:
        """The counters as a JSON-able mapping (the request timestamps only when asked)."""
        result: dict[str, object] = {
            "requests": self.requests,
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "peak_rate_1s": self.peak_rate(),
            "statuses": {str(status): count for status, count in sorted(self.statuses.items())},
            "rate_limited": self.rate_limited,
            "clients": dict(sorted(self.clients.items())),
        }
        if timestamps:
            result["timestamps"] = list(self.timestamps)
        return result


@dataclass(slots=True)
class Origin:
    """One listening service: its URL, what answers it, its added latency and its counters."""

    name: str
    url: str
    handler: Handler
    latency: float
    stats: OriginStats


async def serve_connection(origin: Origin, stream: trio.SocketStream) -> None:
    """Serve the requests of one client connection until it closes or an action ends it."""
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=RECEIVE_SIZE)
    try:
        client = str(stream.socket.getpeername()[0])
    except OSError:
        client = "unknown"
    try:
        while True:
            try:
                received = await _receive_request(connection, stream)
            except h11.RemoteProtocolError:
                await stream.send_all(_BAD_REQUEST)
                return
            if received is None:
                return
            method, target, body = received
            if not await _answer(origin, connection, stream, method, target, body, client):
                return
            if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                return
            connection.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        return
    finally:
        await trio.aclose_forcefully(stream)


async def _receive_request(
    connection: h11.Connection, stream: trio.SocketStream
) -> tuple[str, str, bytes | None] | None:
    """``(method, target, body)`` of the next request (body None: larger than :data:`MAX_BODY`)."""
    method = target = ""
    body: bytearray | None = bytearray()
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some(RECEIVE_SIZE))
        elif isinstance(event, h11.Request):
            method = event.method.decode("ascii", "replace")
            target = event.target.decode("ascii", "replace")
        elif isinstance(event, h11.Data):
            if body is not None:
                body += event.data
                if len(body) > MAX_BODY:
                    body = None
        elif isinstance(event, h11.EndOfMessage):
            return method, target, None if body is None else bytes(body)
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None


async def _answer(
    origin: Origin,
    connection: h11.Connection,
    stream: trio.SocketStream,
    method: str,
    target: str,
    body: bytes | None,
    client: str,
) -> bool:
    """Carry out the action for the request; False when the connection must close afterwards."""
    path, _, query = target.partition("?")
    stats = origin.stats
    stats.started(path, query, trio.current_time(), client)
    status: int | None = None
    try:
        action: Action
        if body is None:
            action = error_reply(413, "PayloadTooLarge", "request entity too large")
        else:
            action = origin.handler.handle(Request(path, query, method, body, client))
        if origin.latency > 0:
            await trio.sleep(origin.latency)
        if isinstance(action, Reply):
            status = action.status
            await _send_reply(connection, stream, action)
            return True
        if isinstance(action, Stream):
            status = 200
            await _send_stream(connection, stream, action)
            return True
        if isinstance(action, Chunks):
            status = 200
            await _send_chunks(connection, stream, action)
            return True
        if isinstance(action, Hang):
            # Hold the request until the client closes the connection (or the server stops).
            while await stream.receive_some(RECEIVE_SIZE):
                pass
            return False
        assert isinstance(action, Disconnect)
        return False
    finally:
        stats.finished(status)


async def _send_reply(connection: h11.Connection, stream: trio.SocketStream, reply: Reply) -> None:
    headers = [(b"content-type", reply.content_type), (b"content-length", str(len(reply.body)).encode())]
    headers += reply.headers
    response = h11.Response(status_code=reply.status, headers=headers, reason=_REASONS.get(reply.status, b""))
    data = _encode(connection, response)
    if reply.body:
        data += _encode(connection, h11.Data(data=reply.body))
    await stream.send_all(data + _encode(connection, h11.EndOfMessage()))


async def _send_stream(connection: h11.Connection, stream: trio.SocketStream, body: Stream) -> None:
    headers = [(b"content-type", body.content_type)]
    if body.declare_length:
        headers.append((b"content-length", str(body.size).encode()))
    headers += body.headers
    data = _encode(connection, h11.Response(status_code=200, headers=headers, reason=b"OK"))
    if body.head:
        data += _encode(connection, h11.Data(data=body.head))
    await stream.send_all(data)
    for _ in range(body.repeat):
        if body.interval > 0:
            await trio.sleep(body.interval)
        await stream.send_all(_encode(connection, h11.Data(data=body.filler)))
    data = _encode(connection, h11.Data(data=body.tail)) if body.tail else b""
    await stream.send_all(data + _encode(connection, h11.EndOfMessage()))


async def _send_chunks(connection: h11.Connection, stream: trio.SocketStream, body: Chunks) -> None:
    headers = [(b"content-type", body.content_type)]
    if body.size is not None:
        headers.append((b"content-length", str(body.size).encode()))
    headers += body.headers
    await stream.send_all(_encode(connection, h11.Response(status_code=200, headers=headers, reason=b"OK")))
    for chunk in body.chunks():
        if body.interval > 0:
            await trio.sleep(body.interval)
        if chunk:
            await stream.send_all(_encode(connection, h11.Data(data=chunk)))
    await stream.send_all(_encode(connection, h11.EndOfMessage()))


def _encode(connection: h11.Connection, event: h11.Response | h11.Data | h11.EndOfMessage) -> bytes:
    return connection.send(event) or b""
