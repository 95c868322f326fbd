"""What happens to a job once its handler returned or raised (SPEC 6.1): one pure decision.

:func:`decide` maps ``(job, error, policy)`` to an :data:`Outcome`, with no I/O and no clock of its own
(``now`` is passed in), so the whole table of SPEC 6.1 is tested as a table, like procrastinate's
``RetryStrategy.get_retry_decision``. The engine then applies the outcome with one guarded store write.

=============================================  ====================================================
handler result                                 outcome
=============================================  ====================================================
returned                                       ``Finish("done")``
:class:`PermanentJobError`                     ``Finish("failed", code)``
:class:`TransientJobError`, unexpected error   ``Reschedule`` after backoff (the attempt is spent) while
                                               ``policy.should_retry``; then ``Finish("failed")``
:class:`RateLimited`                           ``Reschedule`` at the host's resume time, attempt
                                               refunded; ``Finish("failed", rate_limit_exhausted)``
                                               past :data:`MAX_RATE_LIMIT_WAITS` waits of its own
:class:`JobDeferred`                           ``Reschedule`` at ``not_before``, attempt refunded
:class:`JobInterrupted`, run cancelled         ``Finish("cancelled")``
:class:`JobInterrupted`, shutdown              ``Reschedule`` as it was (attempt refunded)
:class:`StoreError` (the database failed)       ``Reschedule`` after backoff, attempt refunded (the page
                                               it was writing rolled back; it is fetched again)
:class:`JobLost` (cancelled, or taken over)    ``Abandon``: nothing more is written for it
=============================================  ====================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from daemon.engine.backoff import RetryPolicy
from daemon.errors import (
    Code,
    JobDeferred,
    JobError,
    JobInterrupted,
    JobLost,
    PermanentJobError,
    RateLimited,
    StoreError,
)
from daemon.store.models import Job

# SPEC 6.1: a job waits for at most this many 429s it received itself, then fails.
MAX_RATE_LIMIT_WAITS = 20
# Database failures that say nothing about the job (it waits for the database at no cost); any other
# database error is the job's own and spends an attempt like an unexpected error.
DATABASE_UNAVAILABLE = frozenset({Code.DATABASE_BUSY, Code.DATABASE_FULL, Code.DATABASE_IO})


@dataclass(frozen=True, slots=True)
class Finish:
    """The job ends in ``state`` (done, failed or cancelled)."""

    state: str
    error_code: str | None = None
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class Reschedule:
    """The job goes back to ``pending`` until ``not_before``.

    ``refund_attempt`` undoes the claim's attempt (waits that are not the job's fault); ``rate_limit_wait``
    counts one more wait for a 429 the job received; ``host`` records the PDS host the job talks to so the
    dispatcher can skip it while that host is paused or saturated. ``reason`` names why, for the log.
    """

    not_before: float
    reason: str
    refund_attempt: bool = False
    rate_limit_wait: bool = False
    error_code: str | None = None
    last_error: str | None = None
    host: str | None = None


@dataclass(frozen=True, slots=True)
class Abandon:
    """The job is no longer this daemon's (its run was cancelled, or another daemon took it over)."""

    reason: str


Outcome: TypeAlias = Finish | Reschedule | Abandon


def decide(
    job: Job,
    error: BaseException | None,
    policy: RetryPolicy,
    *,
    now: float,
    run_cancelled: bool,
    host: str | None = None,
) -> Outcome:
    """The outcome of ``job`` whose handler ended with ``error`` (None: it returned normally).

    ``run_cancelled`` says whether the job's run was cancelled (only consulted for an interruption);
    ``host`` is the PDS host the job held a slot of, if any.
    """
    if error is None:
        return Finish("done")
    if isinstance(error, JobLost):
        return Abandon(error.message)
    if isinstance(error, StoreError) and error.code in DATABASE_UNAVAILABLE:
        return Reschedule(
            now + policy.delay(1),
            "database",
            refund_attempt=True,
            error_code=error.code,
            last_error=error.message,
        )
    if isinstance(error, JobDeferred):
        return Reschedule(error.not_before, "deferred", refund_attempt=True, host=error.host)
    if isinstance(error, JobInterrupted):
        if run_cancelled:
            return Finish("cancelled")
        return Reschedule(job.not_before, "interrupted", refund_attempt=True)
    if isinstance(error, RateLimited):
        if error.received and job.rate_limit_waits + 1 > MAX_RATE_LIMIT_WAITS:
            return Finish(
                "failed",
                Code.RATE_LIMIT_EXHAUSTED,
                f"rate limited {MAX_RATE_LIMIT_WAITS} times; giving up: {error.message}",
            )
        return Reschedule(
            error.resume_at,
            "rate_limited",
            refund_attempt=True,
            rate_limit_wait=error.received,
            error_code=error.code,
            last_error=error.message,
            host=host,
        )
    if isinstance(error, PermanentJobError):
        return Finish("failed", error.code, error.message)
    if isinstance(error, JobError | StoreError):
        code, message = error.code, error.message
    else:
        code, message = Code.INTERNAL_ERROR, f"{type(error).__name__}: {error}"
    if not policy.should_retry(job.attempts):
        return Finish("failed", code, message)
    return Reschedule(now + policy.delay(job.attempts), "retry", error_code=code, last_error=message)
