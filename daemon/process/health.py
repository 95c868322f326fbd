"""Does the database answer? A ping nobody waits on for longer than a second (``/healthz``, SPEC 5 and 7).

A store call waits its turn behind the one running in the database's thread, and that one may wait for an
operator's write lock for the whole busy timeout (30 s), or hang on a failing disk. A waiting call can be
cancelled while it is queued, but not once the thread has taken it: a ping that was taken into a group
commit waits with the group. So the ping runs in a task of its own, and askers wait for its answer at most
``timeout`` seconds: no answer in time counts as "not answering". At most one ping is in flight, however
many ask (a load balancer polling ``/healthz`` while the database hangs does not pile up pings).
"""

from __future__ import annotations

import structlog
import trio

from daemon.errors import StoreError
from daemon.store.database import Database

log = structlog.get_logger("backfilld.health")

PING_TIMEOUT = 1.0


class _Ping:
    __slots__ = ("answered", "done")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.answered = False


class DatabaseProbe:
    """Pings the database from a background task; :meth:`answers` waits for the answer a bounded time."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._nursery: trio.Nursery | None = None
        self._pending: _Ping | None = None

    def attach(self, nursery: trio.Nursery | None) -> None:
        """Run pings in ``nursery`` (the daemon's root nursery) from now on; None: inline again."""
        self._nursery = nursery

    async def answers(self, timeout: float = PING_TIMEOUT) -> bool:
        """True when the database answered a ping within ``timeout`` seconds."""
        ping = self._pending
        if ping is None:
            ping = _Ping()
            if self._nursery is None:
                # not attached (not running yet, or a test): ping inline; a queued ping is cancellable
                with trio.move_on_after(timeout):
                    await self._ping(ping)
                return ping.done.is_set() and ping.answered
            self._pending = ping
            self._nursery.start_soon(self._ping, ping)
        with trio.move_on_after(timeout):
            await ping.done.wait()
        return ping.done.is_set() and ping.answered

    async def _ping(self, ping: _Ping) -> None:
        try:
            ping.answered = await self._db.run(self._db.store.ping)
        except StoreError:
            ping.answered = False
        except Exception:  # a health check never takes the process down
            log.exception("database ping failed")
            ping.answered = False
        finally:
            if self._pending is ping:
                self._pending = None
            ping.done.set()
