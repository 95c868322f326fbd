"""What a running job's handler may ask of the engine: the clock, interruption, new work, host slots."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol

from daemon.errors import JobDeferred, JobInterrupted
from daemon.store.models import Job


class EngineView(Protocol):
    """The part of the engine a :class:`JobContext` reads and changes."""

    stopping: bool
    cancelled_jobs: set[int]
    finished_jobs: set[int]
    host_jobs: dict[str, int]

    @property
    def per_host_jobs(self) -> int: ...

    def wall_clock(self) -> float: ...

    def notify(self) -> None: ...

    def paused_until(self, host: str) -> float | None: ...


class JobContext:
    """Handed to a job's handler with its job."""

    def __init__(self, engine: EngineView, job: Job) -> None:
        self._engine = engine
        self.job = job
        self.host: str | None = None
        # The job as the store left it when its listing's last page also finished it (see finished()).
        self.finished_job: Job | None = None

    def now(self) -> float:
        """Wall-clock unix time (injected; tests drive it)."""
        return self._engine.wall_clock()

    @property
    def interrupted(self) -> bool:
        """True once the job should stop after its current page (shutdown, or its run was cancelled)."""
        return self._engine.stopping or self.job.id in self._engine.cancelled_jobs

    def finished(self, job: Job | None) -> None:
        """Tell the engine the store already finished the job (``done``, in the transaction of its last
        page): its outcome is written, whatever the handler does after. None: not finished."""
        if job is not None:
            self.finished_job = job
            self._engine.finished_jobs.add(job.id)  # its lease is released: nothing left to renew

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
        if engine.host_jobs.get(host, 0) >= engine.per_host_jobs:
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
