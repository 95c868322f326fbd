"""Rate limits as the reference PDS applies them (rate-limiter-flexible fixed windows, per client IP).

Every limited response carries ``RateLimit-Limit``, ``RateLimit-Remaining``, ``RateLimit-Reset`` (unix
seconds, rounded down) and ``RateLimit-Policy: <limit>;w=<window>``; a request over the limit is answered
429 with those and ``Retry-After`` (seconds, rounded up). Each client's window starts at its first request
and lasts ``window`` seconds. getRepo counts in its own bucket, the other XRPC methods in the global one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Final

from daemon.simnet.actions import JSON, RATE_LIMITED_BODY, Headers, Reply

GET_REPO: Final = "/xrpc/com.atproto.sync.getRepo"


class FixedWindow:
    """One bucket: at most ``limit`` requests per client in each ``window`` seconds."""

    def __init__(self, limit: int, window: int, clock: Callable[[], float] = time.time) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._policy = f"{limit};w={window}".encode()
        self._windows: dict[str, tuple[float, int]] = {}

    def consume(self, client: str) -> tuple[bool, Headers]:
        """Count one request of ``client``: whether it is allowed, and the headers to send."""
        now = self._clock()
        start, used = self._windows.get(client, (now, 0))
        if now >= start + self.window:
            start, used = now, 0
        used += 1
        self._windows[client] = (start, used)
        end = start + self.window
        headers: Headers = (
            (b"ratelimit-limit", str(self.limit).encode()),
            (b"ratelimit-remaining", str(max(0, self.limit - used)).encode()),
            (b"ratelimit-reset", str(math.floor(end)).encode()),
            (b"ratelimit-policy", self._policy),
        )
        if used <= self.limit:
            return True, headers
        return False, (*headers, (b"retry-after", str(max(1, math.ceil(end - now))).encode()))

    def reset(self) -> None:
        """Forget every client's window."""
        self._windows.clear()


class HostRateLimits:
    """The buckets of one PDS host: ``general`` for every XRPC method but getRepo, ``repo`` for getRepo
    (either may be None: unlimited). ``on_limited`` is called for every 429 sent."""

    def __init__(
        self,
        general: tuple[int, int] | None,
        repo: tuple[int, int] | None,
        on_limited: Callable[[], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._general = None if general is None else FixedWindow(*general, clock=clock)
        self._repo = None if repo is None else FixedWindow(*repo, clock=clock)
        self._on_limited = on_limited

    def check(self, path: str, client: str) -> tuple[Headers, Reply | None]:
        """The rate-limit headers for a request of ``path`` from ``client``, and the 429 if it is over."""
        bucket = self._repo if path == GET_REPO else self._general
        if bucket is None:
            return (), None
        allowed, headers = bucket.consume(client)
        if allowed:
            return headers, None
        self._on_limited()
        return (), Reply(429, RATE_LIMITED_BODY, JSON, headers)

    def reset(self) -> None:
        """Forget every window."""
        for bucket in (self._general, self._repo):
            if bucket is not None:
                bucket.reset()
