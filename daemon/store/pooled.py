"""The thread hop for the PostgreSQL store: each call in a worker thread, as many at once as the pool allows.

:class:`PooledDatabase` runs every store call with ``trio.to_thread.run_sync(..., abandon_on_cancel=False)``
behind a :class:`trio.CapacityLimiter` the size of the store's connection pool, so that a call never waits
inside a thread for a connection. A call can be cancelled while it waits for a thread, not once it has
started: a cancelled caller waits for its call's transaction to commit or roll back (one transaction per
call, bounded by the statement timeout), and the cancellation takes effect at its next checkpoint. So no
transaction is ever abandoned half-way, and "returned" (or "cancelled after starting") never hides work
that is still running. psycopg errors become :class:`~daemon.errors.StoreError` here (the edge's one
mapping), and ``failing`` follows them as with SQLite.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import outcome
import trio

from daemon.store.database import Database
from daemon.store.postgres import PostgresStore, translate

P = ParamSpec("P")
R = TypeVar("R")


class PooledDatabase(Database):
    """Runs :class:`PostgresStore` methods in worker threads, at most ``store.pool_size`` at once."""

    def __init__(self, store: PostgresStore) -> None:
        super().__init__()
        self.store: PostgresStore = store
        self._limiter = trio.CapacityLimiter(store.pool_size)

    async def run(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call ``fn(*args, **kwargs)`` (a bound Store method) in a worker thread."""
        call = functools.partial(fn, *args, **kwargs)
        result: outcome.Outcome[R] = await trio.to_thread.run_sync(
            outcome.capture, call, abandon_on_cancel=False, limiter=self._limiter
        )
        if isinstance(result, outcome.Error):
            result = outcome.Error(translate(result.error))
        self._observe(result)
        return result.unwrap()

    async def aclose(self) -> None:
        """Close the store's connections (a call still running closes its own when it ends)."""
        await trio.to_thread.run_sync(self.store.close)
