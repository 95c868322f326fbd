"""The one thread hop to the store: how the daemon calls the (blocking) store from trio.

:class:`Database` is the interface every backend's hop has: ``await db.run(store.method, ...)`` runs the
call off the trio thread and returns its result or raises its error, foreign database errors already
mapped to :class:`~daemon.errors.StoreError` (the edge's one mapping). ``db.failing`` is the last database
error while the database fails, None once a call succeeds again (``/healthz`` reads it).

:class:`SerialDatabase` (SQLite): one long-lived thread runs every store call, one at a time, in the order
they were made; the calling trio task sleeps until its call is done. Compared with
``trio.to_thread.run_sync`` behind a ``CapacityLimiter(1)``, the next call starts the moment the previous
one returns rather than once its caller has been rescheduled on the (busy) trio loop. A posted call
(:meth:`Database.post`) is queued the same way, and nobody waits for it.

Group commit: the calls that queued up while the thread was busy run together in one transaction, each as
a savepoint, so a call that fails on its own rolls back alone. Every caller is answered only after the
group has committed, so "returned" still means "durable". If the group's transaction fails as a whole (an
error that may have ended it, or the COMMIT itself), it is rolled back and its calls run again one by one,
each in its own transaction, so every caller gets the answer its call would have had alone.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import outcome
import structlog
import trio

from daemon.errors import StoreError
from daemon.store.sqlite import GroupAborted, SqliteStore, translate
from daemon.store.store import Store

log = structlog.get_logger("backfilld.store")

P = ParamSpec("P")
R = TypeVar("R")

_QUEUED, _STARTED, _ABANDONED = 0, 1, 2


class Database:
    """The interface of a store's thread hop (see the module docstring)."""

    store: Store

    def __init__(self) -> None:
        self.failing: StoreError | None = None

    async def run(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call ``fn(*args, **kwargs)`` (a bound Store method) off the trio thread."""
        raise NotImplementedError

    async def post(self, fn: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> None:
        """Call ``fn(*args, **kwargs)`` for its effect only: where the backend can, without waiting for it
        (calls still run in the order they were made, so a later :meth:`run` sees its effect). Its failure
        is logged, never raised. For writes nobody waits on (the DID cache)."""
        try:
            await self.run(fn, *args, **kwargs)
        except StoreError as exc:
            log.warning("a store write failed", call=getattr(fn, "__name__", "?"), error=exc.message)

    async def aclose(self) -> None:
        """Finish the queued calls, close the store."""
        raise NotImplementedError

    def _observe(self, result: outcome.Outcome[Any]) -> None:
        if isinstance(result, outcome.Error) and isinstance(result.error, StoreError):
            self.failing = result.error
        elif self.failing is not None and isinstance(result, outcome.Value):
            self.failing = None


class _Call:
    """One store call on its way through the thread; ``state`` changes under ``lock`` only."""

    __slots__ = ("alone", "fn", "lock", "name", "state", "task", "token")

    def __init__(
        self,
        fn: Callable[[], Any],
        task: trio.lowlevel.Task | None,
        token: trio.lowlevel.TrioToken,
        *,
        alone: bool,
    ) -> None:
        self.fn = fn
        self.task = task
        self.token = token
        self.alone = alone
        self.lock = threading.Lock()
        self.state = _QUEUED
        self.name = ""  # a posted call's store method, for the log line of its failure

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


class SerialDatabase(Database):
    """Runs :class:`SqliteStore` methods in one dedicated thread, one at a time, group-committed.

    A call can be cancelled while it waits for its turn, not once the thread has started it.
    ``groups`` and ``grouped_calls`` count committed groups of two or more calls and the calls in them.
    """

    def __init__(self, store: SqliteStore) -> None:
        super().__init__()
        self.store: SqliteStore = store
        self.groups = 0
        self.grouped_calls = 0
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    async def run(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call ``fn(*args, **kwargs)`` (a bound Store method) in the store's thread."""
        result: R = await self._submit(lambda: fn(*args, **kwargs), alone=False)
        return result

    async def post(self, fn: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> None:
        """Queue the call and return at once (see :meth:`Database.post`); it joins the next group.
        Once the database is closed, the call is dropped (and logged)."""
        if self._closed:
            log.warning("a store write after close was dropped", call=getattr(fn, "__name__", "?"))
            return
        self._start_thread()
        call = _Call(lambda: fn(*args, **kwargs), None, trio.lowlevel.current_trio_token(), alone=False)
        call.name = getattr(fn, "__name__", "?")
        self._calls.put(call)

    async def aclose(self) -> None:
        """Checkpoint and close the store after every queued call has finished; stop the thread."""
        self._closed = True
        try:
            await self._submit(self.store.close, alone=True)
        finally:
            if self._thread is not None:
                self._calls.put(None)
                thread, self._thread = self._thread, None
                await trio.to_thread.run_sync(thread.join)

    def _start_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="backfilld-sqlite", daemon=True)
            self._thread.start()

    async def _submit(self, fn: Callable[[], Any], *, alone: bool) -> Any:
        self._start_thread()
        call = _Call(fn, trio.lowlevel.current_task(), trio.lowlevel.current_trio_token(), alone=alone)

        def abort(_: object) -> trio.lowlevel.Abort:
            return trio.lowlevel.Abort.SUCCEEDED if call.abandon() else trio.lowlevel.Abort.FAILED

        self._calls.put(call)
        return await trio.lowlevel.wait_task_rescheduled(abort)

    def _deliver(self, answers: list[tuple[_Call, outcome.Outcome[Any]]]) -> None:
        """Hand results back to their tasks: one wake-up of the trio loop for a whole group."""
        if answers:
            answers[0][0].token.run_sync_soon(self._resume, answers)

    def _resume(self, answers: list[tuple[_Call, outcome.Outcome[Any]]]) -> None:
        for call, result in answers:
            self._observe(result)
            if call.task is not None:
                trio.lowlevel.reschedule(call.task, result)
            elif isinstance(result, outcome.Error):
                log.warning("a store write failed", call=call.name, error=str(result.error))

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
                        self._run_alone(call)
                elif call.start():
                    group.append(call)
            self._run_group(group)

    def _run_alone(self, call: _Call) -> None:
        self._deliver([(call, self._alone(call))])

    @staticmethod
    def _alone(call: _Call) -> outcome.Outcome[Any]:
        result: outcome.Outcome[Any] = outcome.capture(call.fn)
        if isinstance(result, outcome.Error):
            result = outcome.Error(translate(result.error))
        return result

    def _run_group(self, calls: list[_Call]) -> None:
        if len(calls) <= 1:
            for call in calls:
                self._run_alone(call)
            return
        store = self.store
        try:
            store.begin_group()
        except Exception as exc:
            # Nothing has run, and alone each call would meet the same lock or failure.
            store.abort_group()
            error = translate(exc)
            self._deliver([(call, outcome.Error(error)) for call in calls])
            return
        results: list[outcome.Outcome[Any]] = []
        try:
            for call in calls:
                result = outcome.capture(call.fn)
                if isinstance(result, outcome.Error) and isinstance(result.error, GroupAborted):
                    raise result.error
                results.append(result)
            store.commit_group()
        except Exception:
            store.abort_group()
            self._deliver([(call, self._alone(call)) for call in calls])
            return
        self.groups += 1
        self.grouped_calls += len(calls)
        self._deliver(
            [
                (
                    call,
                    outcome.Error(translate(result.error)) if isinstance(result, outcome.Error) else result,
                )
                for call, result in zip(calls, results, strict=True)
            ]
        )
