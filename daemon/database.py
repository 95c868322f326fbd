"""The one serialised thread hop to the store: the daemon's only way to reach SQLite."""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, TypeVar

import trio

from daemon.store import Store

P = ParamSpec("P")
R = TypeVar("R")


class Database:
    """Runs :class:`Store` methods in a worker thread, one at a time (``CapacityLimiter(1)``).

    SQLite calls block; running them off the trio thread keeps the event loop (admin server, timeouts,
    other workers) responsive while a transaction commits.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._limiter = trio.CapacityLimiter(1)

    async def run(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call ``fn(*args, **kwargs)`` (a bound Store method) in the serialised thread."""
        return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs), limiter=self._limiter)

    async def aclose(self) -> None:
        """Checkpoint and close the store after every queued call has finished."""
        await self.run(self.store.close)
