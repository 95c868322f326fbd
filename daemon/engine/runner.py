"""The job engine: a dispatcher that claims due jobs and ``workers`` tasks that run them (SPEC 3).

The dispatcher claims only as many jobs as there are idle workers and hands them over a bounded memory
channel, so nothing about pending work lives only in memory. It sleeps until something can change what is
claimable: a new job, a finished job (a worker or a host slot freed), an ack (backpressure lifted), or the
next ``not_before`` coming due. There is no polling.

A worker runs the job's handler, asks :func:`daemon.engine.outcome.decide` what the result means
(SPEC 6.1), and applies that outcome with one store write.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import structlog
import trio

from daemon.engine.backoff import RetryPolicy
from daemon.engine.context import JobContext
from daemon.engine.outcome import Finish, Outcome, Reschedule, decide
from daemon.errors import Code, JobError, JobInterrupted, JobSignal, RateLimited
from daemon.metrics import Metrics
from daemon.store.database import Database
from daemon.store.models import Job

log = structlog.get_logger("backfilld.engine")

JobHandler = Callable[[Job, JobContext], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class EngineSettings:
    workers: int
    max_records_queue: int
    per_host_jobs: int


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

    @property
    def per_host_jobs(self) -> int:
        """How many jobs may hold one PDS host at once."""
        return self.settings.per_host_jobs

    def notify(self) -> None:
        """Wake the dispatcher: something claimable may have changed."""
        self._wake.set()

    def stop(self) -> None:
        """Stop claiming; running jobs stop after their current page; workers then exit."""
        self.stopping = True
        self.notify()

    def paused_until(self, host: str) -> float | None:
        """The unix time until which ``host`` is paused (a 429), or None."""
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
                self.busy += 1
                self.metrics.workers_busy.set(self.busy)
                try:
                    if self.stopping:
                        # claimed just before the stop: back to pending as it was
                        outcome = decide(
                            job, JobInterrupted(), self.policy, now=self.wall_clock(), run_cancelled=False
                        )
                        await self._apply(job, outcome)
                    else:
                        await self._execute(job)
                finally:
                    self.busy -= 1
                    self.metrics.workers_busy.set(self.busy)
                    self._idle += 1
                    self.cancelled_jobs.discard(job.id)
                    self.notify()

    async def _execute(self, job: Job) -> None:
        context = JobContext(self, job)
        started = trio.current_time()
        with structlog.contextvars.bound_contextvars(
            job_id=job.id, run_id=job.run_id, kind=job.kind, did=job.did, collection=job.collection
        ):
            error = await self._run_handler(job, context)
            run_cancelled = isinstance(error, JobInterrupted) and (
                job.id in self.cancelled_jobs
                or (job.run_id is not None and await self.db.run(self.db.store.run_cancelled, job.run_id))
            )
            if isinstance(error, JobError | RateLimited):
                self.metrics.job_errors.labels(error.code).inc()
            elif error is not None and not isinstance(error, JobSignal):
                log.error("job handler raised unexpectedly", exc_info=error)
                self.metrics.job_errors.labels(Code.INTERNAL_ERROR).inc()
            outcome = decide(
                job, error, self.policy, now=self.wall_clock(), run_cancelled=run_cancelled, host=context.host
            )
            await self._apply(job, outcome, elapsed=trio.current_time() - started)

    async def _run_handler(self, job: Job, context: JobContext) -> BaseException | None:
        """Run the job's handler; returns what it raised (None when it returned), cancellation included."""
        scope = trio.CancelScope()
        self._scopes[job.id] = (job, scope)
        try:
            with scope:
                await self.handlers[job.kind](job, context)
        except Exception as exc:
            return exc
        finally:
            del self._scopes[job.id]
        if scope.cancelled_caught:
            return JobInterrupted("the job's run was cancelled")
        return None

    async def _apply(self, job: Job, outcome: Outcome, *, elapsed: float = 0.0) -> None:
        store = self.db.store
        now = self.wall_clock()
        if isinstance(outcome, Reschedule):
            await self.db.run(
                store.reschedule_job,
                job.id,
                not_before=outcome.not_before,
                now=now,
                refund_attempt=outcome.refund_attempt,
                rate_limit_wait=outcome.rate_limit_wait,
                error_code=outcome.error_code,
                last_error=outcome.last_error,
                host=outcome.host,
            )
            if outcome.reason == "retry":
                log.info(
                    "job will retry",
                    attempts=job.attempts,
                    delay=round(outcome.not_before - now, 3),
                    error_code=outcome.error_code,
                    error=outcome.last_error,
                )
            elif outcome.reason == "rate_limited":
                log.info("job waits for rate limit", host=outcome.host, resume_at=outcome.not_before)
            elif outcome.reason == "interrupted":
                log.info("job interrupted by shutdown; pending again")
            return
        assert isinstance(outcome, Finish)
        finished = await self.db.run(
            store.finish_job,
            job.id,
            state=outcome.state,
            now=now,
            error_code=outcome.error_code,
            last_error=outcome.last_error,
        )
        self.metrics.jobs_finished.labels(job.kind, outcome.state).inc()
        self.metrics.job_duration.labels(job.kind).observe(elapsed)
        log.info(
            "job finished",
            state=outcome.state,
            attempts=job.attempts,
            pages=finished.pages if finished else None,
            records=finished.records_enqueued if finished else None,
            skipped=finished.records_skipped if finished else None,
            seconds=round(elapsed, 3),
            error_code=outcome.error_code,
            error=outcome.last_error,
        )
