"""Connections to one origin, reused most recently used first, on httpcore's HTTP/1.1 connections.

httpcore's ``AsyncConnectionPool`` walks its whole connection list on every request and asks each idle
connection whether the server closed it (a ``poll`` system call per idle connection): with 16 keep-alive
connections per origin that walk was the fetcher's largest cost. Here a request takes the most recently
used idle connection, checks only that one (expired, or closed by the server) and otherwise opens a new
one; requests never queue here, because the fetcher's per-host semaphore bounds how many run at once (so
the cancel-while-queued slot leak of encode/httpcore#1093 cannot happen either). A connection goes back
to the pool only once its response was read to the end and it is idle again; anything else is closed.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpcore
import trio

# A connection being closed gets this long, shielded, whatever cancelled the request that owned it.
CLOSE_DEADLINE = 5.0


class OriginPool:
    """Keep-alive connections to one origin; ``max_idle`` of them at most are kept."""

    def __init__(
        self,
        origin: httpcore.Origin,
        *,
        ssl_context: ssl.SSLContext | None,
        network_backend: httpcore.AsyncNetworkBackend,
        local_address: str | None,
        keepalive_expiry: float,
        max_idle: int,
    ) -> None:
        self._origin = origin
        self._ssl_context = ssl_context
        self._backend = network_backend
        self._local_address = local_address
        self._keepalive_expiry = keepalive_expiry
        self._max_idle = max_idle
        self._idle: list[httpcore.AsyncHTTPConnection] = []

    @asynccontextmanager
    async def response(self, request: httpcore.Request) -> AsyncIterator[httpcore.Response]:
        """Send ``request`` on a pooled (or new) connection; the response, closed when the ``with`` ends."""
        connection = await self._connection()
        try:
            response = await connection.handle_async_request(request)
        except BaseException:
            await _close(connection)
            raise
        try:
            yield response
        finally:
            # An unread body makes httpcore close the connection rather than drain it.
            with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_DEADLINE):
                await response.aclose()
            if connection.is_idle() and len(self._idle) < self._max_idle:
                self._idle.append(connection)
            else:
                await _close(connection)

    async def aclose(self) -> None:
        """Close every idle connection."""
        idle, self._idle = self._idle, []
        for connection in idle:
            await _close(connection)

    async def _connection(self) -> httpcore.AsyncHTTPConnection:
        while self._idle:
            connection = self._idle.pop()
            if not connection.has_expired():
                return connection
            await _close(connection)
        return httpcore.AsyncHTTPConnection(
            origin=self._origin,
            ssl_context=self._ssl_context,
            keepalive_expiry=self._keepalive_expiry,
            http1=True,
            http2=False,
            local_address=self._local_address,
            network_backend=self._backend,
        )


async def _close(connection: httpcore.AsyncHTTPConnection) -> None:
    with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_DEADLINE):
        try:
            await connection.aclose()
        except Exception:  # a broken connection may fail to close politely; it is gone either way
            return
