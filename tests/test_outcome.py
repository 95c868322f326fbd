"""SPEC 6.1 as a table: daemon.engine.outcome.decide(job, error, policy) for every kind of handler result."""

from __future__ import annotations

import dataclasses
import random

import pytest

from daemon.engine.backoff import RetryPolicy
from daemon.engine.outcome import MAX_RATE_LIMIT_WAITS, Abandon, Finish, Outcome, Reschedule, decide
from daemon.errors import (
    AccountUnavailable,
    BlockedAddress,
    Code,
    IdentityError,
    JobDeferred,
    JobInterrupted,
    JobLost,
    LimitExceeded,
    ProtocolViolation,
    RateLimited,
    StoreError,
    UpstreamConnectError,
    UpstreamHTTPError,
    UpstreamTimeout,
)
from daemon.store.models import Job

NOW = 1_700_000_000.0
HOST = "https://pds.example.com"


def job(**changes: object) -> Job:
    base = Job(
        id=1,
        run_id=1,
        kind="backfill",
        did="did:plc:aaaaaaaaaaaaaaaaaaaaaaaa",
        collection="com.example.record",
        state="running",
        attempts=1,
        not_before=NOW - 10,
        error_code=None,
        last_error=None,
        cursor=None,
        pages=0,
        records_enqueued=0,
        records_skipped=0,
        rate_limit_waits=0,
        host=None,
        created_at=NOW - 100,
        updated_at=NOW - 10,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


class FixedDelay(random.Random):
    """uniform(a, b) always answers b: the backoff's upper bound, so the table can name it."""

    def uniform(self, a: float, b: float) -> float:
        return b


POLICY = RetryPolicy(max_attempts=4, base=5.0, cap=300.0, rng=FixedDelay())
RATE_LIMITED = RateLimited("429", host=HOST, resume_at=NOW + 30)
NOT_OURS = RateLimited("paused", host=HOST, resume_at=NOW + 30, received=False)

TABLE: list[tuple[str, Job, BaseException | None, bool, Outcome]] = [
    ("returned", job(), None, False, Finish("done")),
    (
        "permanent identity",
        job(),
        IdentityError("gone", code=Code.DID_NOT_FOUND),
        False,
        Finish("failed", "did_not_found", "gone"),
    ),
    (
        "permanent account",
        job(),
        AccountUnavailable("x", code=Code.REPO_TAKENDOWN),
        False,
        Finish("failed", "repo_takendown", "x"),
    ),
    ("permanent address", job(), BlockedAddress("x"), False, Finish("failed", "blocked_address", "x")),
    ("page cap", job(attempts=1), LimitExceeded("cap"), False, Finish("failed", "too_many_pages", "cap")),
    (
        "timeout, first try",
        job(attempts=1),
        UpstreamTimeout("slow"),
        False,
        Reschedule(NOW + 10.0, "retry", error_code="timeout", last_error="slow"),
    ),
    (
        "5xx, third try",
        job(attempts=3),
        UpstreamHTTPError("500", status=500),
        False,
        Reschedule(NOW + 40.0, "retry", error_code="http_status", last_error="500"),
    ),
    (
        "connect error, last try",
        job(attempts=4),
        UpstreamConnectError("refused"),
        False,
        Finish("failed", "connect_error", "refused"),
    ),
    (
        "protocol violation, last try",
        job(attempts=4),
        ProtocolViolation("bad", code=Code.REPEATED_CURSOR),
        False,
        Finish("failed", "repeated_cursor", "bad"),
    ),
    (
        "unexpected exception",
        job(attempts=2),
        KeyError("boom"),
        False,
        Reschedule(NOW + 20.0, "retry", error_code="internal_error", last_error="KeyError: 'boom'"),
    ),
    (
        "unexpected exception, last try",
        job(attempts=4),
        ValueError("x"),
        False,
        Finish("failed", "internal_error", "ValueError: x"),
    ),
    (
        "429 received",
        job(rate_limit_waits=3),
        RATE_LIMITED,
        False,
        Reschedule(
            NOW + 30,
            "rate_limited",
            refund_attempt=True,
            rate_limit_wait=True,
            error_code="rate_limited",
            last_error="429",
            host=HOST,
        ),
    ),
    (
        "429 received, waits exhausted",
        job(rate_limit_waits=MAX_RATE_LIMIT_WAITS),
        RATE_LIMITED,
        False,
        Finish(
            "failed",
            "rate_limit_exhausted",
            f"rate limited {MAX_RATE_LIMIT_WAITS} times; giving up: 429",
        ),
    ),
    (
        "another job's pause costs nothing, even past the cap",
        job(rate_limit_waits=MAX_RATE_LIMIT_WAITS),
        NOT_OURS,
        False,
        Reschedule(
            NOW + 30,
            "rate_limited",
            refund_attempt=True,
            rate_limit_wait=False,
            error_code="rate_limited",
            last_error="paused",
            host=HOST,
        ),
    ),
    (
        "deferred (host busy)",
        job(),
        JobDeferred(not_before=NOW + 1, host=HOST),
        False,
        Reschedule(NOW + 1, "deferred", refund_attempt=True, host=HOST),
    ),
    (
        "interrupted by shutdown",
        job(),
        JobInterrupted(),
        False,
        Reschedule(NOW - 10, "interrupted", refund_attempt=True),
    ),
    ("interrupted, run cancelled", job(), JobInterrupted(), True, Finish("cancelled")),
    ("lost (cancelled or taken over)", job(), JobLost("gone"), False, Abandon("gone")),
    (
        "database locked: waits at no cost",
        job(attempts=4),
        StoreError("locked", code=Code.DATABASE_BUSY),
        False,
        Reschedule(
            NOW + 10.0, "database", refund_attempt=True, error_code="database_busy", last_error="locked"
        ),
    ),
    (
        "database full: waits at no cost",
        job(attempts=1),
        StoreError("full", code=Code.DATABASE_FULL),
        False,
        Reschedule(
            NOW + 10.0, "database", refund_attempt=True, error_code="database_full", last_error="full"
        ),
    ),
    (
        "another database error is the job's own",
        job(attempts=4),
        StoreError("constraint", code=Code.DATABASE_ERROR),
        False,
        Finish("failed", "database_error", "constraint"),
    ),
    ("a cancelled run does not change an error's outcome", job(), None, True, Finish("done")),
]


@pytest.mark.parametrize(
    ("job_", "error", "cancelled", "expected"), [row[1:] for row in TABLE], ids=[r[0] for r in TABLE]
)
def test_decide(job_: Job, error: BaseException | None, cancelled: bool, expected: Outcome) -> None:
    host = HOST if isinstance(error, RateLimited) else None
    assert decide(job_, error, POLICY, now=NOW, run_cancelled=cancelled, host=host) == expected


def test_backoff_is_capped() -> None:
    policy = RetryPolicy(max_attempts=100, base=5.0, cap=300.0, rng=FixedDelay())
    outcome = decide(job(attempts=20), UpstreamTimeout("x"), policy, now=NOW, run_cancelled=False)
    assert isinstance(outcome, Reschedule) and outcome.not_before == NOW + 300.0


def test_backoff_is_jittered_within_bounds() -> None:
    policy = RetryPolicy(max_attempts=100, base=5.0, cap=300.0, rng=random.Random(1))
    delays = set()
    for _ in range(50):
        outcome = decide(job(attempts=2), UpstreamTimeout("x"), policy, now=NOW, run_cancelled=False)
        assert isinstance(outcome, Reschedule)
        assert NOW <= outcome.not_before <= NOW + 20.0
        delays.add(outcome.not_before)
    assert len(delays) > 40
