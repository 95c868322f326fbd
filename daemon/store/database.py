"""The one serialised thread to the store: the daemon's only way to reach SQLite.

One long-lived thread runs every store call, one at a time, in the order they were made; the calling trio
task sleeps until its call is done. Compared with ``trio.to_thread.run_sync`` behind a
``CapacityLimiter(1)``, the next call starts the moment the previous one returns rather than once its
caller has been rescheduled on the (busy) trio loop and has released the limiter, and no thread is handed
a job per call. Under load that hand-over, not SQLite, was what serialised the workers.

Group commit: the calls that queued up while the thread was busy run together in one transaction
(:meth:`Store.group`), each call's own transaction becoming a savepoint of it, so a call that fails rolls
back alone. Every caller is answered only after the group has committed, so "returned" still means
"durable"; if the commit itself fails, every call of the group gets that error. A burst of pages, job
updates and claims from many workers thus costs one commit instead of one each.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import outcome
import trio

from daemon.store.sqlite import Store

P = ParamSpec("P")
R = TypeVar("R")

_QUEUED, _STARTED, _ABANDONED = 0, 1, 2


class _Call:
    """One store call on its way through the thread; ``state`` changes under ``lock`` only."""

    __slots__ = ("alone", "deliver", "fn", "lock", "state")

    def __init__(
        self, fn: Callable[[], Any], deliver: Callable[[outcome.Outcome[Any]], object], *, alone: bool
    ) -> None:
        self.fn = fn
        self.deliver = deliver
        self.alone = alone
        self.lock = threading.Lock()
        self.state = _QUEUED

    def start(self) -> bool:
        """Claim the call for the thread; False when its caller was cancelled while it waited."""
        with self.lock:
            if self.state == _ABANDONED:
                return False
            self.state = _STARTED
            return True

    def abandon(self) -> bool:
        """Withdraw a call that has not started; False once the thread has it (it then runs to the end)."""
        with self.lock:
            if self.state != _QUEUED:
                return False
            self.state = _ABANDONED
            return True


class Database:
    """Runs :class:`Store` methods in one dedicated thread, one at a time, group-committed.

    SQLite calls block; running them off the trio thread keeps the event loop (admin server, timeouts,
    other workers) responsive while a transaction commits. A call can be cancelled while it waits for its
    turn, not once the thread has started it.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    async def run(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call ``fn(*args, **kwargs)`` (a bound Store method) in the store's thread."""
        result: R = await self._submit(lambda: fn(*args, **kwargs), alone=False)
        return result

    async def aclose(self) -> None:
        """Checkpoint and close the store after every queued call has finished; stop the thread."""
        try:
            await self._submit(self.store.close, alone=True)
        finally:
            if self._thread is not None:
                self._calls.put(None)
                thread, self._thread = self._thread, None
                await trio.to_thread.run_sync(thread.join)

    async def _submit(self, fn: Callable[[], Any], *, alone: bool) -> Any:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="backfilld-sqlite", daemon=True)
            self._thread.start()
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()
        call = _Call(
            fn, lambda result: token.run_sync_soon(trio.lowlevel.reschedule, task, result), alone=alone
        )

        def abort(_: object) -> trio.lowlevel.Abort:
            return trio.lowlevel.Abort.SUCCEEDED if call.abandon() else trio.lowlevel.Abort.FAILED

        self._calls.put(call)
        return await trio.lowlevel.wait_task_rescheduled(abort)

    def _serve(self) -> None:
        while True:
            batch = [self._calls.get()]
            while True:
                try:
                    batch.append(self._calls.get_nowait())
                except queue.Empty:
                    break
            group: list[_Call] = []
            for call in batch:
                if call is None or call.alone:
                    self._run_group(group)
                    group = []
                    if call is None:
                        return
                    if call.start():
                        call.deliver(outcome.capture(call.fn))
                elif call.start():
                    group.append(call)
            self._run_group(group)

    def _run_group(self, calls: list[_Call]) -> None:
        if len(calls) == 1:
            calls[0].deliver(outcome.capture(calls[0].fn))
            return
        if not calls:
            return
        results: list[outcome.Outcome[Any]] = []
        try:
            with self.store.group():
                results = [outcome.capture(call.fn) for call in calls]
        except Exception as exc:
            # The group's COMMIT failed: nothing of it is durable, so no call may report success.
            for call in calls:
                call.deliver(outcome.Error(exc))
            return
        for call, result in zip(calls, results, strict=True):
            call.deliver(result)
