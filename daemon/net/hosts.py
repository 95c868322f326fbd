"""Per-host politeness shared by all workers: a concurrency cap, a request rate and 429 pauses.

One :class:`HostLimiter` serves the whole process; hosts are keyed by origin (``https://pds.example.com``,
with the port when it is not the default). Two clocks are involved, on purpose:

- pacing (request starts spaced `1 / rate` apart) runs on ``trio.current_time()`` and waits with ``trio.sleep``, so a test with
  ``trio.testing.MockClock(autojump_threshold=0)`` drives it deterministically;
- pauses are unix times (``resume_at`` of a 429, shown on ``/_admin/status``) read through the injected
  ``now`` callable. A test that wants pauses to follow the mock clock passes
  ``now=lambda: EPOCH + trio.current_time()``.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from daemon.errors import RateLimited
from daemon.net.ratelimit import RateLimitWindow, pacing_interval, rate_limit_window, window_delay

# Forget idle hosts once this many are known, so that a long backfill over many PDSes does not keep an
# entry per host it ever touched.
_SWEEP_THRESHOLD = 1024


@dataclass(frozen=True, slots=True)
class HostState:
    """One host as ``/_admin/status`` shows it. ``paused_until`` is a unix time or None."""

    host: str
    in_flight: int
    paused_until: float | None
    waiting: int


class _Window:
    """One limit a host announced (``RateLimit-Policy``): its last known state and our requests under it."""

    __slots__ = ("in_flight", "next_start", "window")

    def __init__(self, window: RateLimitWindow) -> None:
        self.window = window
        self.in_flight = 0
        self.next_start = -math.inf


class _Host:
    __slots__ = (
        "default_policy",
        "in_flight",
        "next_start",
        "pace",
        "paths",
        "paused_until",
        "semaphore",
        "waiting",
        "windows",
    )

    def __init__(self, concurrency: int) -> None:
        self.semaphore = trio.Semaphore(concurrency)
        # Pacing is by actual start times, taken one at a time in FIFO order: a reservation scheme lets
        # requests that woke late (a busy loop) go out back to back, which a per-second counter sees.
        self.pace = trio.Lock()
        self.next_start = -math.inf
        self.in_flight = 0
        self.waiting = 0
        self.paused_until: float | None = None
        # the limits the host announced, and which limit each endpoint path answered under
        self.windows: dict[str, _Window] = {}
        self.paths: dict[str, str] = {}
        self.default_policy: str | None = None


class HostLimiter:
    """Caps in-flight requests and request rate per host, and remembers which hosts asked for a pause.

    ``per_host_rate`` is requests per second (0 = unlimited) with no burst: request starts are spaced at least
    ``1 / per_host_rate`` apart, so no one-second window ever holds more than ``per_host_rate`` of them
    (a PDS that counts requests per second never sees the limit exceeded).
    """

    def __init__(
        self,
        *,
        per_host_concurrency: int,
        per_host_rate: float,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._concurrency = max(1, per_host_concurrency)
        self._interval = pacing_interval(per_host_rate)
        self._now = now
        self._hosts: dict[str, _Host] = {}
        self._paused: dict[str, float] = {}
        self._sweep_at = _SWEEP_THRESHOLD

    @property
    def per_host_concurrency(self) -> int:
        """The most requests one host has in flight at once."""
        return self._concurrency

    @asynccontextmanager
    async def slot(self, host: str, path: str = "") -> AsyncIterator[None]:
        """Hold one of ``host``'s concurrency slots, paced by its rate, for the body of the ``with``.

        Raises :class:`RateLimited` without waiting when the host is paused, and again after the wait if it
        was paused meanwhile (another worker got a 429), so nothing is sent to a paused host. Requests to
        ``path`` are also paced by the limit the host said applies to it (``RateLimit-*`` headers), so that
        limit is never reached.
        """
        self.raise_if_paused(host)
        entry = self._entry(host)
        entry.waiting += 1
        try:
            await entry.semaphore.acquire()
        finally:
            entry.waiting -= 1
        entry.in_flight += 1
        policy = entry.paths.get(path, entry.default_policy)
        window = entry.windows.get(policy) if policy is not None else None
        try:
            if self._interval or window is not None:
                async with entry.pace:
                    delay = entry.next_start - trio.current_time()
                    if delay > 0:
                        await trio.sleep(delay)
                    entry.next_start = trio.current_time() + self._interval
                    if window is not None:
                        await self._pace_window(host, window)
            self.raise_if_paused(host)
            if window is not None:
                window.in_flight += 1
            try:
                yield
            finally:
                if window is not None:
                    window.in_flight -= 1
        finally:
            entry.in_flight -= 1
            entry.semaphore.release()

    async def _pace_window(self, host: str, window: _Window) -> None:
        if window.window.remaining - window.in_flight <= 0 and window.window.reset_at > self._now():
            # Nothing left until the window resets: pause the host rather than hold a worker that long.
            self.pause(host, window.window.reset_at)
            self.raise_if_paused(host)
        spacing = window_delay(window.window, now=self._now(), in_flight=window.in_flight)
        delay = window.next_start - trio.current_time()
        if delay > 0:
            await trio.sleep(delay)
        window.next_start = trio.current_time() + spacing

    def observe(self, host: str, path: str, headers: Mapping[str, str], *, now: float) -> None:
        """Learn from a response's ``RateLimit-*`` headers which limit ``path`` is under and what is left."""
        window = rate_limit_window(headers, now=now)
        if window is None:
            return
        entry = self._entry(host)
        entry.paths[path] = window.policy
        if entry.default_policy is None:
            entry.default_policy = window.policy
        known = entry.windows.get(window.policy)
        if known is None:
            entry.windows[window.policy] = _Window(window)
        else:
            known.window = window

    def raise_if_paused(self, host: str) -> None:
        """Raise :class:`RateLimited` when ``host`` is paused."""
        until = self.paused_until(host)
        if until is not None:
            raise RateLimited(
                f"{host} is rate limited; paused until {until:.0f}",
                host=host,
                resume_at=until,
                received=False,
            )

    def pause(self, host: str, until: float) -> None:
        """Pause ``host`` until the unix time ``until``; an existing later pause is kept."""
        entry = self._entry(host)
        if entry.paused_until is None or until > entry.paused_until:
            entry.paused_until = until
            self._paused[host] = until

    def paused(self) -> dict[str, float]:
        """The hosts paused now and until when (cheap: the dispatcher asks on every pass)."""
        now = self._now()
        for host in [h for h, until in self._paused.items() if until <= now]:
            del self._paused[host]
        return dict(self._paused)

    def paused_until(self, host: str) -> float | None:
        """The unix time at which ``host``'s pause ends, or None when it is not paused."""
        entry = self._hosts.get(host)
        if entry is None or entry.paused_until is None:
            return None
        if entry.paused_until <= self._now():
            entry.paused_until = None
            return None
        return entry.paused_until

    def snapshot(self) -> list[HostState]:
        """Every host with requests in flight or waiting, or paused; sorted by host."""
        self._sweep()
        states = [
            HostState(host, entry.in_flight, self.paused_until(host), entry.waiting)
            for host, entry in sorted(self._hosts.items())
        ]
        return [s for s in states if s.in_flight or s.waiting or s.paused_until is not None]

    def _entry(self, host: str) -> _Host:
        entry = self._hosts.get(host)
        if entry is None:
            if len(self._hosts) >= self._sweep_at:
                self._sweep()
                self._sweep_at = max(_SWEEP_THRESHOLD, 2 * len(self._hosts))
            entry = self._hosts[host] = _Host(self._concurrency)
        return entry

    def _sweep(self) -> None:
        # An idle host whose next start is due is indistinguishable from a new entry, so dropping it
        # cannot loosen the rate limit.
        now = trio.current_time()
        idle = [
            host
            for host, entry in self._hosts.items()
            if not entry.in_flight
            and not entry.waiting
            and self.paused_until(host) is None
            and entry.next_start <= now
        ]
        for host in idle:
            del self._hosts[host]
