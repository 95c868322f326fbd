"""The job engine: a dispatcher that claims due jobs and ``workers`` tasks that run them (SPEC 3).

The dispatcher claims only as many jobs as there are idle workers and hands them over a bounded memory
channel, so nothing about pending work lives only in memory. It sleeps until something can change what is
claimable: a new job, a finished job (a worker or a host slot freed), an ack (backpressure lifted), or the
next ``not_before`` coming due. There is no polling on SQLite; on PostgreSQL other daemons change the jobs
too, so the dispatcher also looks every :data:`CLUSTER_POLL` seconds.

A worker runs the job's handler, asks :func:`daemon.engine.outcome.decide` what the result means
(SPEC 6.1), and applies that outcome with one store write guarded by the job's lease.

The database may fail at any time (locked by an operator's shell, full, an I/O error): nothing here lets a
:class:`StoreError` out. The dispatcher backs off and claims again; a worker retries its outcome write
until the database answers (or the daemon stops: a job left running is recovered at the next start);
``/healthz`` answers 503 meanwhile.

Leases (PostgreSQL, ``lease_timeout`` set): every claim carries a lease that :meth:`Engine._keep_leases`
renews; a job whose lease could not be renewed is interrupted (another daemon may own it now), and leases
that expired anywhere in the cluster are recovered, so a dead daemon's jobs run again.
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
from daemon.engine.outcome import Abandon, Finish, Outcome, Reschedule, decide
from daemon.errors import Code, JobError, JobInterrupted, JobSignal, RateLimited, StoreError
from daemon.metrics import Metrics
from daemon.store.database import Database
from daemon.store.models import Job

log = structlog.get_logger("backfilld.engine")

JobHandler = Callable[[Job, JobContext], Awaitable[None]]

# How often the dispatcher looks for work that other daemons made claimable (PostgreSQL only).
CLUSTER_POLL = 1.0
# Backoff while the database fails: doubling from the first delay up to the cap.
DATABASE_RETRY_FIRST = 0.1
DATABASE_RETRY_CAP = 5.0


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """``lease_timeout`` is None on SQLite (one daemon: running jobs are recovered at start)."""

    workers: int
    max_records_queue: int
    per_host_jobs: int
    lease_timeout: float | None = None


class _Backoff:
    """Exponential waits while the database fails; reset once it answers."""

    def __init__(self) -> None:
        self._delay = DATABASE_RETRY_FIRST

    async def wait(self) -> None:
        await trio.sleep(self._delay)
        self._delay = min(self._delay * 2, DATABASE_RETRY_CAP)

    def reset(self) -> None:
        self._delay = DATABASE_RETRY_FIRST


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
        owner: str | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.handlers = dict(handlers)
        self.policy = policy
        self.metrics = metrics
        self.wall_clock = wall_clock
        self._paused_hosts = paused_hosts
        self.owner = owner or f"{os.uname().nodename}:{os.getpid()}"
        self.stopping = False
        self.host_jobs: dict[str, int] = {}
        self.cancelled_jobs: set[int] = set()
        self.finished_jobs: set[int] = set()  # done by their last page, their handler not yet returned
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
        if self.settings.lease_timeout is None:
            await self._recover(expired_only=False)
        self.metrics.workers_total.set(self.settings.workers)
        async with trio.open_nursery() as keeper:
            if self.settings.lease_timeout is not None:
                # renews leases until the last worker has drained, then goes with them
                keeper.start_soon(self._keep_leases, self.settings.lease_timeout)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._dispatch)
                for _ in range(self.settings.workers):
                    nursery.start_soon(self._work, self._receive.clone())
                self._receive.close()
                self.running = True
                task_status.started()
            keeper.cancel_scope.cancel()
        self.running = False

    async def _recover(self, *, expired_only: bool) -> None:
        backoff = _Backoff()
        while not self.stopping:
            try:
                recovered, failed = await self.db.run(
                    self.db.store.recover_jobs, self.wall_clock(), expired_only=expired_only
                )
            except StoreError as exc:
                log.warning("cannot recover interrupted jobs yet", error_code=exc.code, error=exc.message)
                await backoff.wait()
                continue
            if recovered or failed:
                log.info("recovered interrupted jobs", count=recovered, crash_loop=failed)
                self.notify()
            return

    async def _dispatch(self) -> None:
        backoff = _Backoff()
        async with self._send:
            while not self.stopping:
                self._wake = trio.Event()
                try:
                    wait = await self._claim_pass()
                except StoreError as exc:
                    log.warning("cannot claim jobs: database failing", error_code=exc.code, error=exc.message)
                    await backoff.wait()
                    continue
                backoff.reset()
                if self.settings.lease_timeout is not None:
                    wait = min(wait, CLUSTER_POLL)
                if wait > 0:
                    with trio.move_on_after(wait):
                        await self._wake.wait()

    async def _claim_pass(self) -> float:
        """Claim what idle workers can take; returns how long nothing can change without a wake-up."""
        if self._idle <= 0:
            return math.inf
        # a host that frees up or resumes meanwhile wakes the loop, so one look per pass will do
        excluded = self._excluded_hosts()
        now = self.wall_clock()
        lease = self.settings.lease_timeout
        jobs = await self.db.run(
            self.db.store.claim_jobs,
            now=now,
            limit=self._idle,
            owner=self.owner,
            max_records_queue=self.settings.max_records_queue,
            excluded_hosts=excluded,
            lease_until=None if lease is None else now + lease,
        )
        if jobs:
            self._idle -= len(jobs)
            for job in jobs:
                await self._send.send(job)
            return 0.0
        due = await self.db.run(
            self.db.store.next_due, max_records_queue=self.settings.max_records_queue, excluded_hosts=excluded
        )
        wait = math.inf if due is None else max(0.0, due - self.wall_clock())
        return min(wait, self._next_unpause())

    def _next_unpause(self) -> float:
        """Seconds until the earliest paused host resumes (its jobs become claimable without a write)."""
        now = self.wall_clock()
        ahead = [until - now for until in self._paused_hosts().values() if until > now]
        return min(ahead, default=math.inf)

    async def _keep_leases(self, lease_timeout: float) -> None:
        """Renew this daemon's leases; interrupt jobs whose lease is gone; recover expired ones anywhere."""
        while True:
            await trio.sleep(lease_timeout / 3)
            leases = [job.lease for job, _ in self._scopes.values() if job.id not in self.finished_jobs]
            try:
                held = await self.db.run(
                    self.db.store.renew_leases,
                    leases,
                    owner=self.owner,
                    until=self.wall_clock() + lease_timeout,
                )
            except StoreError as exc:
                log.warning("cannot renew leases: database failing", error_code=exc.code, error=exc.message)
                continue
            for lease in leases:
                if lease.job_id not in held and lease.job_id in self._scopes:
                    log.warning("lease lost; interrupting the job", job_id=lease.job_id)
                    self.cancelled_jobs.add(lease.job_id)
                    self._scopes[lease.job_id][1].cancel()
            if not self.stopping:
                await self._recover(expired_only=True)

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
                    self.finished_jobs.discard(job.id)
                    self.notify()

    async def _execute(self, job: Job) -> None:
        context = JobContext(self, job)
        started = trio.current_time()
        with structlog.contextvars.bound_contextvars(
            job_id=job.id, run_id=job.run_id, kind=job.kind, did=job.did, collection=job.collection
        ):
            error = await self._run_handler(job, context)
            if context.finished_job is not None:
                # done in the transaction of its last page: nothing that came after changes that
                self._report_finished(job, context.finished_job, trio.current_time() - started)
                return
            if isinstance(error, JobError | RateLimited):
                self.metrics.job_errors.labels(error.code).inc()
            elif isinstance(error, StoreError):
                log.warning("job stopped: database failing", error_code=error.code, error=error.message)
            elif error is not None and not isinstance(error, JobSignal):
                log.error("job handler raised unexpectedly", exc_info=error)
                self.metrics.job_errors.labels(Code.INTERNAL_ERROR).inc()
            outcome = decide(
                job,
                error,
                self.policy,
                now=self.wall_clock(),
                run_cancelled=job.id in self.cancelled_jobs,
                host=context.host,
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
        """Write the outcome, retrying while the database fails (until the daemon stops)."""
        if isinstance(outcome, Abandon):
            log.info("job dropped: no longer ours", reason=outcome.reason)
            return
        backoff = _Backoff()
        while True:
            try:
                if isinstance(outcome, Reschedule):
                    await self._reschedule(job, outcome)
                else:
                    await self._finish(job, outcome, elapsed)
                return
            except StoreError as exc:
                if self.stopping:
                    log.warning(
                        "outcome not written; the job is recovered at the next start", error=exc.message
                    )
                    return
                log.warning("cannot write the job's outcome yet", error_code=exc.code, error=exc.message)
                await backoff.wait()
            except JobSignal as exc:  # JobLost: cancelled or taken over meanwhile
                log.info("job dropped: no longer ours", reason=exc.message)
                return

    async def _reschedule(self, job: Job, outcome: Reschedule) -> None:
        now = self.wall_clock()
        await self.db.run(
            self.db.store.reschedule_job,
            job.lease,
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

    async def _finish(self, job: Job, outcome: Finish, elapsed: float) -> None:
        finished = await self.db.run(
            self.db.store.finish_job,
            job.lease,
            state=outcome.state,
            now=self.wall_clock(),
            error_code=outcome.error_code,
            last_error=outcome.last_error,
        )
        self._report_finished(job, finished, elapsed)

    def _report_finished(self, job: Job, finished: Job, elapsed: float) -> None:
        """Metrics and the one summary line of a job that reached a final state."""
        self.metrics.jobs_finished.labels(job.kind, finished.state).inc()
        self.metrics.job_duration.labels(job.kind).observe(elapsed)
        log.info(
            "job finished",
            state=finished.state,
            attempts=job.attempts,
            pages=finished.pages,
            records=finished.records_enqueued,
            skipped=finished.records_skipped,
            seconds=round(elapsed, 3),
            error_code=finished.error_code,
            error=finished.last_error,
        )
