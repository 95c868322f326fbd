"""The job engine: a dispatcher that claims due jobs and ``workers`` tasks that run them (SPEC 3).

The dispatcher claims only as many jobs as there are idle workers and hands them over a bounded memory
channel, so nothing about pending work lives only in memory. It sleeps until something can change what is
claimable: a new job, a finished job (a worker or a host slot freed), an ack (backpressure lifted), or the
next ``not_before`` coming due. There is no polling.

Outcomes (SPEC 6.1) are decided here from the exception a handler raises:

- returns normally: ``done``;
- :class:`PermanentJobError`: ``failed`` at once;
- :class:`TransientJobError` (or an unexpected exception, as ``internal_error``): retried after
  full-jitter backoff until ``max_attempts`` tries, then ``failed``;
- :class:`RateLimited`: back to ``pending`` until the host's resume time, the attempt refunded; at most
  :data:`MAX_RATE_LIMIT_WAITS` waits for 429s the job itself received (waits for a pause another job's
  429 caused cost nothing);
- :class:`JobDeferred` (its host is paused or saturated): back to ``pending`` at no cost, without holding
  a worker;
- :class:`JobInterrupted` (shutdown or a cancelled run between pages): pending again, or ``cancelled``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import structlog
import trio

from daemon.engine.backoff import RetryPolicy
from daemon.errors import (
    INTERNAL_ERROR,
    RATE_LIMIT_EXHAUSTED,
    JobError,
    PermanentJobError,
    RateLimited,
    TransientJobError,
)
from daemon.metrics import Metrics
from daemon.store.database import Database
from daemon.store.sqlite import Job

MAX_RATE_LIMIT_WAITS = 20

log = structlog.get_logger("backfilld.engine")


class JobDeferred(Exception):
    """Raised by a handler whose job cannot proceed now (its host is paused or full); costs no attempt."""

    def __init__(self, *, not_before: float, host: str | None) -> None:
        super().__init__(f"deferred until {not_before}")
        self.not_before = not_before
        self.host = host


class JobInterrupted(Exception):
    """Raised by a handler that stopped between pages because the daemon stops or its run was cancelled."""


JobHandler = Callable[[Job, "JobContext"], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class EngineSettings:
    workers: int
    max_records_queue: int
    per_host_jobs: int


class JobContext:
    """What a running job may ask of the engine."""

    def __init__(self, engine: Engine, job: Job) -> None:
        self._engine = engine
        self.job = job
        self.host: str | None = None

    def now(self) -> float:
        """Wall-clock unix time (injected; tests drive it)."""
        return self._engine.wall_clock()

    @property
    def interrupted(self) -> bool:
        """True once the job should stop after its current page (shutdown, or its run was cancelled)."""
        return self._engine.stopping or self.job.id in self._engine.cancelled_jobs

    def notify_new_work(self) -> None:
        """Tell the dispatcher the job queued new jobs."""
        self._engine.notify()

    def check_interrupted(self) -> None:
        """Raise :class:`JobInterrupted` when the job should stop now (called between pages)."""
        if self.interrupted:
            raise JobInterrupted()

    @asynccontextmanager
    async def host_slot(self, host: str) -> AsyncIterator[None]:
        """Hold one of ``host``'s job slots; defer the job when the host is paused or saturated."""
        engine = self._engine
        paused = engine.paused_until(host)
        now = self.now()
        if paused is not None and paused > now:
            raise JobDeferred(not_before=paused, host=host)
        if engine.host_jobs.get(host, 0) >= engine.settings.per_host_jobs:
            raise JobDeferred(not_before=now, host=host)
        engine.host_jobs[host] = engine.host_jobs.get(host, 0) + 1
        self.host = host
        try:
            yield
        finally:
            left = engine.host_jobs[host] - 1
            if left:
                engine.host_jobs[host] = left
            else:
                del engine.host_jobs[host]
            engine.notify()


class Engine:
    """Dispatcher plus workers. Start with ``await nursery.start(engine.run)``."""

    def __init__(
        self,
        db: Database,
        *,
        settings: EngineSettings,
        handlers: Mapping[str, JobHandler],
        policy: RetryPolicy,
        metrics: Metrics,
        wall_clock: Callable[[], float] = time.time,
        paused_hosts: Callable[[], Mapping[str, float]] = dict,
    ) -> None:
        self.db = db
        self.settings = settings
        self.handlers = dict(handlers)
        self.policy = policy
        self.metrics = metrics
        self.wall_clock = wall_clock
        self._paused_hosts = paused_hosts
        self.owner = f"{os.uname().nodename}:{os.getpid()}"
        self.stopping = False
        self.host_jobs: dict[str, int] = {}
        self.cancelled_jobs: set[int] = set()
        self.busy = 0
        self.running = False
        self._idle = settings.workers
        self._wake = trio.Event()
        self._scopes: dict[int, tuple[Job, trio.CancelScope]] = {}
        self._send, self._receive = trio.open_memory_channel[Job](settings.workers)

    # -- control ------------------------------------------------------------------------------------

    def notify(self) -> None:
        """Wake the dispatcher: something claimable may have changed."""
        self._wake.set()

    def stop(self) -> None:
        """Stop claiming; running jobs stop after their current page; workers then exit."""
        self.stopping = True
        self.notify()

    def paused_until(self, host: str) -> float | None:
        return self._paused_hosts().get(host)

    def cancel_run(self, run_id: int) -> int:
        """Interrupt this run's running jobs (their current request is abandoned); returns how many."""
        hit = 0
        for job, scope in list(self._scopes.values()):
            if job.run_id == run_id:
                self.cancelled_jobs.add(job.id)
                scope.cancel()
                hit += 1
        return hit

    def _excluded_hosts(self) -> list[str]:
        now = self.wall_clock()
        full = [h for h, n in self.host_jobs.items() if n >= self.settings.per_host_jobs]
        paused = [h for h, until in self._paused_hosts().items() if until > now]
        return sorted(set(full) | set(paused))

    # -- tasks --------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Recover interrupted jobs, then dispatch and work until :meth:`stop` and the workers drain."""
        recovered = await self.db.run(self.db.store.recover_interrupted, self.wall_clock())
        if recovered:
            log.info("recovered interrupted jobs", count=recovered)
        self.metrics.workers_total.set(self.settings.workers)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._dispatch)
            for _ in range(self.settings.workers):
                nursery.start_soon(self._work, self._receive.clone())
            self._receive.close()
            self.running = True
            task_status.started()
        self.running = False

    async def _dispatch(self) -> None:
        async with self._send:
            while not self.stopping:
                self._wake = trio.Event()
                if self._idle > 0:
                    # a host that frees up or resumes meanwhile wakes the loop, so one look per pass will do
                    excluded = self._excluded_hosts()
                    jobs = await self.db.run(
                        self.db.store.claim_jobs,
                        now=self.wall_clock(),
                        limit=self._idle,
                        owner=self.owner,
                        max_records_queue=self.settings.max_records_queue,
                        excluded_hosts=excluded,
                    )
                    if jobs:
                        self._idle -= len(jobs)
                        for job in jobs:
                            await self._send.send(job)
                        continue
                    due = await self.db.run(
                        self.db.store.next_due,
                        max_records_queue=self.settings.max_records_queue,
                        excluded_hosts=excluded,
                    )
                    wait = math.inf if due is None else max(0.0, due - self.wall_clock())
                    wait = min(wait, self._next_unpause())
                else:
                    wait = math.inf
                if wait > 0:
                    with trio.move_on_after(wait):
                        await self._wake.wait()

    def _next_unpause(self) -> float:
        """Seconds until the earliest paused host resumes (its jobs become claimable without a write)."""
        now = self.wall_clock()
        ahead = [until - now for until in self._paused_hosts().values() if until > now]
        return min(ahead, default=math.inf)

    async def _work(self, receive: trio.MemoryReceiveChannel[Job]) -> None:
        async with receive:
            async for job in receive:
                if self.stopping:
                    await self._release(job)
                    continue
                self.busy += 1
                self.metrics.workers_busy.set(self.busy)
                try:
                    await self._execute(job)
                finally:
                    self.busy -= 1
                    self.metrics.workers_busy.set(self.busy)
                    self._idle += 1
                    self.cancelled_jobs.discard(job.id)
                    self.notify()

    async def _release(self, job: Job) -> None:
        await self.db.run(
            self.db.store.reschedule_job,
            job.id,
            not_before=job.not_before,
            now=self.wall_clock(),
            refund_attempt=True,
        )

    async def _execute(self, job: Job) -> None:
        handler = self.handlers[job.kind]
        context = JobContext(self, job)
        started = trio.current_time()
        store = self.db.store
        scope = trio.CancelScope()
        self._scopes[job.id] = (job, scope)
        outcome: tuple[str, str | None, str | None]
        with structlog.contextvars.bound_contextvars(
            job_id=job.id, run_id=job.run_id, kind=job.kind, did=job.did, collection=job.collection
        ):
            try:
                try:
                    with scope:
                        await handler(job, context)
                finally:
                    del self._scopes[job.id]
                if scope.cancelled_caught:
                    raise JobInterrupted()
            except JobDeferred as deferred:
                await self.db.run(
                    store.reschedule_job,
                    job.id,
                    not_before=deferred.not_before,
                    now=self.wall_clock(),
                    refund_attempt=True,
                    host=deferred.host,
                )
                return
            except JobInterrupted:
                if job.id in self.cancelled_jobs or (
                    job.run_id is not None and await self.db.run(store.run_cancelled, job.run_id)
                ):
                    outcome = ("cancelled", None, None)
                else:
                    await self._release(job)
                    log.info("job interrupted by shutdown; pending again")
                    return
            except RateLimited as exc:
                self.metrics.job_errors.labels(exc.code).inc()
                if exc.received and job.rate_limit_waits + 1 > MAX_RATE_LIMIT_WAITS:
                    outcome = (
                        "failed",
                        RATE_LIMIT_EXHAUSTED,
                        f"rate limited {MAX_RATE_LIMIT_WAITS} times; giving up: {exc.message}",
                    )
                else:
                    await self.db.run(
                        store.reschedule_job,
                        job.id,
                        not_before=exc.resume_at,
                        now=self.wall_clock(),
                        refund_attempt=True,
                        rate_limit_wait=exc.received,
                        error_code=exc.code,
                        last_error=exc.message,
                        host=context.host,
                    )
                    log.info("job waits for rate limit", host=exc.host, resume_at=exc.resume_at)
                    return
            except PermanentJobError as exc:
                self.metrics.job_errors.labels(exc.code).inc()
                outcome = ("failed", exc.code, exc.message)
            except (TransientJobError, JobError) as exc:
                self.metrics.job_errors.labels(exc.code).inc()
                if await self._retry_later(job, exc.code, exc.message):
                    return
                outcome = ("failed", exc.code, exc.message)
            except Exception as exc:
                log.exception("job handler raised unexpectedly")
                self.metrics.job_errors.labels(INTERNAL_ERROR).inc()
                detail = f"{type(exc).__name__}: {exc}"
                if await self._retry_later(job, INTERNAL_ERROR, detail):
                    return
                outcome = ("failed", INTERNAL_ERROR, detail)
            else:
                outcome = ("done", None, None)
            state, code, message = outcome
            finished = await self.db.run(
                store.finish_job,
                job.id,
                state=state,
                now=self.wall_clock(),
                error_code=code,
                last_error=message,
            )
            elapsed = trio.current_time() - started
            self.metrics.jobs_finished.labels(job.kind, state).inc()
            self.metrics.job_duration.labels(job.kind).observe(elapsed)
            log.info(
                "job finished",
                state=state,
                attempts=job.attempts,
                pages=finished.pages if finished else None,
                records=finished.records_enqueued if finished else None,
                skipped=finished.records_skipped if finished else None,
                seconds=round(elapsed, 3),
                error_code=code,
                error=message,
            )

    async def _retry_later(self, job: Job, code: str, message: str) -> bool:
        if not self.policy.should_retry(job.attempts):
            return False
        delay = self.policy.delay(job.attempts)
        await self.db.run(
            self.db.store.reschedule_job,
            job.id,
            not_before=self.wall_clock() + delay,
            now=self.wall_clock(),
            refund_attempt=False,
            error_code=code,
            last_error=message,
        )
        log.info(
            "job will retry", attempts=job.attempts, delay=round(delay, 3), error_code=code, error=message
        )
        return True
