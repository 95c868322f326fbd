"""Engine tests with a test job handler, on trio's MockClock (autojump) so backoff costs no real time.

Every test runs twice: with the store called inline on the trio thread, and through the real thread hop
(:class:`SerialDatabase`); there the clock jumps only after a real pause (:data:`THREAD_AUTOJUMP`), since a
task waiting for SQLite's thread looks idle to trio.
"""

from __future__ import annotations

import itertools
import random
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import outcome
import pytest
import trio
import trio.testing

from daemon.engine.backoff import RetryPolicy
from daemon.engine.context import JobContext
from daemon.engine.outcome import MAX_RATE_LIMIT_WAITS
from daemon.engine.runner import Engine, EngineSettings
from daemon.errors import AccountUnavailable, JobDeferred, RateLimited, UpstreamTimeout
from daemon.metrics import Metrics
from daemon.store.database import Database, SerialDatabase
from daemon.store.models import Job, ListedRecord
from daemon.store.sqlite import SqliteStore as Store
from daemon.store.sqlite import translate

EPOCH = 1_700_000_000.0
THREAD_AUTOJUMP = 0.2
COLL = "com.example.record"


def wall() -> float:
    return EPOCH + trio.current_time()


def dids(n: int) -> list[str]:
    return [f"did:plc:{'a' * 23}{'bcdefghijk'[i]}" for i in range(n)]


class InlineDatabase(Database):
    """Runs store calls on the trio thread, so MockClock's autojump never fires while SQLite works."""

    def __init__(self, store: Store) -> None:
        super().__init__()
        self.store = store

    async def run(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        await trio.lowlevel.checkpoint()
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            error = translate(exc)
            self._observe(outcome.Error(error))
            raise error from None
        self._observe(outcome.Value(result))
        return result

    async def aclose(self) -> None:
        self.store.close()


pytestmark = pytest.mark.parametrize("hop", ["inline", "thread"])


Handler = Callable[[Job, JobContext], Awaitable[None]]


@asynccontextmanager
async def running_engine(
    tmp_path: Path,
    handler: Handler,
    *,
    workers: int = 2,
    max_attempts: int = 4,
    max_records_queue: int = 1000,
    per_host_jobs: int = 4,
    paused: dict[str, float] | None = None,
    seed: int = 7,
    hop: str = "inline",
    lease_timeout: float | None = None,
    store: Store | None = None,
) -> AsyncIterator[Engine]:
    opened = store or Store.open(tmp_path / "db.sqlite3")
    db: Database = InlineDatabase(opened) if hop == "inline" else SerialDatabase(opened)
    clock = trio.lowlevel.current_clock()
    if hop == "thread" and isinstance(clock, trio.testing.MockClock):
        # A task waiting for the store's thread looks idle to trio: jump only after a real pause, so
        # virtual time does not run ahead of SQLite's work (it would only make waits end sooner).
        clock.autojump_threshold = THREAD_AUTOJUMP
    engine = Engine(
        db,
        settings=EngineSettings(
            workers=workers,
            max_records_queue=max_records_queue,
            per_host_jobs=per_host_jobs,
            lease_timeout=lease_timeout,
        ),
        handlers={"backfill": handler, "discover": handler},
        policy=RetryPolicy(max_attempts=max_attempts, base=5.0, cap=300.0, rng=random.Random(seed)),
        metrics=Metrics(),
        wall_clock=wall,
        paused_hosts=lambda: paused or {},
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            yield engine
            engine.stop()
    finally:
        await db.aclose()


async def enqueue(engine: Engine, n: int = 1) -> int:
    run_id, _ = await engine.db.run(
        engine.db.store.create_run, mode="explicit", collections=[COLL], dids=dids(n), now=wall()
    )
    engine.notify()
    return run_id


async def wait_for(engine: Engine, predicate: Callable[[list[Job]], bool]) -> list[Job]:
    # Long virtual sleeps between looks: with the thread hop, each jump of the clock costs real time.
    while True:
        jobs = await engine.db.run(engine.db.store.list_jobs, limit=1000)
        if predicate(jobs):
            return jobs
        await trio.sleep(30)


async def write_page(ctx: JobContext, job: Job, n: int, *, cursor: str | None = None) -> None:
    """What a real handler does per page: write records under the job's lease."""
    db = ctx._engine.db  # type: ignore[attr-defined]
    result = await db.run(
        db.store.apply_page,
        job.lease,
        did=job.did or "",
        collection=job.collection,
        records=[ListedRecord(f"r{i}", f"c{i}", "{}") for i in range(n)],
        cursor=cursor,
        skipped=0,
        complete=cursor is None,
        now=ctx.now(),
    )
    ctx.finished(result.finished)


def all_final(jobs: list[Job]) -> bool:
    return bool(jobs) and all(j.state in ("done", "failed", "cancelled") for j in jobs)


async def test_successful_job_is_done(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, hop: str
) -> None:
    seen: list[int] = []

    async def handler(job: Job, ctx: JobContext) -> None:
        seen.append(job.id)

    async with running_engine(tmp_path, handler, hop=hop) as engine:
        await enqueue(engine, 3)
        jobs = await wait_for(engine, all_final)
    assert [j.state for j in jobs] == ["done"] * 3 and sorted(seen) == [j.id for j in jobs]
    assert all(j.attempts == 1 for j in jobs)


async def test_transient_errors_retry_on_the_full_jitter_schedule_then_fail(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, hop: str
) -> None:
    calls: list[float] = []

    async def handler(job: Job, ctx: JobContext) -> None:
        calls.append(ctx.now())
        raise UpstreamTimeout("page took too long")

    async with running_engine(tmp_path, handler, max_attempts=4, seed=11, hop=hop) as engine:
        await enqueue(engine)
        [job] = await wait_for(engine, all_final)
    assert job.state == "failed" and job.attempts == 4
    assert (job.error_code, job.last_error) == ("timeout", "page took too long")
    assert len(calls) == 4
    expected = RetryPolicy(max_attempts=4, base=5.0, cap=300.0, rng=random.Random(11))
    for attempt, (before, after) in enumerate(itertools.pairwise(calls), start=1):
        assert after - before >= expected.delay(attempt) - 1e-6


async def test_permanent_error_fails_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, hop: str
) -> None:
    async def handler(job: Job, ctx: JobContext) -> None:
        raise AccountUnavailable("PDS says RepoTakendown", code="repo_takendown")

    async with running_engine(tmp_path, handler, hop=hop) as engine:
        await enqueue(engine)
        [job] = await wait_for(engine, all_final)
    assert (job.state, job.attempts, job.error_code) == ("failed", 1, "repo_takendown")


async def test_unexpected_exception_is_retried_as_internal_error(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, hop: str
) -> None:
    async def handler(job: Job, ctx: JobContext) -> None:
        raise KeyError("bug")

    async with running_engine(tmp_path, handler, max_attempts=2, hop=hop) as engine:
        await enqueue(engine)
        [job] = await wait_for(engine, all_final)
    assert (job.state, job.attempts, job.error_code) == ("failed", 2, "internal_error")
    assert "KeyError" in (job.last_error or "")


async def test_a_failing_job_does_not_poison_others(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, hop: str
) -> None:
    async def handler(job: Job, ctx: JobContext) -> None:
        if job.did == dids(2)[0]:
            raise AccountUnavailable("gone", code="repo_not_found")

    async with running_engine(tmp_path, handler, hop=hop) as engine:
        await enqueue(engine, 5)
        jobs = await wait_for(engine, all_final)
    assert sorted(j.state for j in jobs) == ["done"] * 4 + ["failed"]


async def test_dispatcher_wakes_on_enqueue_without_polling(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, hop: str
) -> None:
    async def handler(job: Job, ctx: JobContext) -> None:
        pass

    async with running_engine(tmp_path, handler, hop=hop) as engine:
        store = engine.db.store
        claims = 0
        original = store.claim_jobs

        def counting(**kw: object) -> list[Job]:
            nonlocal claims
            claims += 1
            return original(**kw)  # type: ignore[arg-type]

        store.claim_jobs = counting  # type: ignore[method-assign]
        await trio.sleep(3600)  # an idle hour of virtual time
        assert claims <= 1  # at most the start-up claim that may not have run before the patch
        await enqueue(engine)
        jobs = await wait_for(engine, all_final)
        assert jobs[0].state == "done"
        assert claims <= 4


async def test_wakes_for_the_next_due_retry(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, hop: str
) -> None:
    calls: list[float] = []

    async def handler(job: Job, ctx: JobContext) -> None:
        calls.append(ctx.now())
        if len(calls) == 1:
            raise UpstreamTimeout("once")

    async with running_engine(tmp_path, handler, hop=hop) as engine:
        await enqueue(engine)
        [job] = await wait_for(engine, all_final)
    assert job.state == "done" and job.attempts == 2 and len(calls) == 2


async def test_backpressure_holds_backfill_jobs_until_acked(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, hop: str
) -> None:
    ran: list[str | None] = []

    async def handler(job: Job, ctx: JobContext) -> None:
        ran.append(job.did)
        await write_page(ctx, job, 5)

    async with running_engine(tmp_path, handler, max_records_queue=3, workers=1, hop=hop) as engine:
        await enqueue(engine, 2)
        await trio.sleep(600)
        assert len(ran) == 1  # the first job pushed the queue over the limit; the second waits
        _, last = await engine.db.run(engine.db.store.list_records_json, after=0, limit=100)
        assert last is not None
        await engine.db.run(engine.db.store.ack_records, last)
        engine.notify()
        await wait_for(engine, all_final)
    assert len(ran) == 2


async def test_rate_limited_job_waits_without_spending_attempts(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, hop: str
) -> None:
    calls: list[float] = []

    async def handler(job: Job, ctx: JobContext) -> None:
        calls.append(ctx.now())
        if len(calls) <= 3:
            raise RateLimited("429", host="https://pds", resume_at=ctx.now() + 100)

    async with running_engine(tmp_path, handler, max_attempts=1, hop=hop) as engine:
        await enqueue(engine)
        [job] = await wait_for(engine, all_final)
    assert job.state == "done" and job.attempts == 1 and job.rate_limit_waits == 3
    assert all(b - a >= 100 for a, b in itertools.pairwise(calls))


async def test_too_many_rate_limit_waits_fail_with_their_own_code(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, hop: str
) -> None:
    calls = 0

    async def handler(job: Job, ctx: JobContext) -> None:
        nonlocal calls
        calls += 1
        raise RateLimited("429", host="https://pds", resume_at=ctx.now() + 10)

    async with running_engine(tmp_path, handler, hop=hop) as engine:
        await enqueue(engine)
        [job] = await wait_for(engine, all_final)
    assert job.state == "failed" and job.error_code == "rate_limit_exhausted"
    assert calls == MAX_RATE_LIMIT_WAITS + 1 and job.rate_limit_waits == MAX_RATE_LIMIT_WAITS


async def test_jobs_of_a_paused_host_are_not_claimed_and_others_flow(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, hop: str
) -> None:
    paused = {"https://slow": EPOCH + 500}
    ran: list[tuple[str | None, float]] = []

    async def handler(job: Job, ctx: JobContext) -> None:
        host = "https://slow" if job.did == dids(3)[0] else "https://fast"
        async with ctx.host_slot(host):
            ran.append((job.did, ctx.now()))

    async with running_engine(tmp_path, handler, workers=1, paused=paused, hop=hop) as engine:
        await enqueue(engine, 3)
        jobs = await wait_for(engine, all_final)
    assert all(j.state == "done" for j in jobs)
    slow = [t for d, t in ran if d == dids(3)[0]]
    fast = [t for d, t in ran if d != dids(3)[0]]
    assert slow[0] >= EPOCH + 500 and max(fast) < EPOCH + 500
    deferred = next(j for j in jobs if j.did == dids(3)[0])
    assert deferred.attempts == 1 and deferred.host == "https://slow"


async def test_saturated_host_defers_without_holding_a_worker(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, hop: str
) -> None:
    inside = 0
    peak = 0

    async def handler(job: Job, ctx: JobContext) -> None:
        nonlocal inside, peak
        async with ctx.host_slot("https://one"):
            inside += 1
            peak = max(peak, inside)
            await trio.sleep(10)
            inside -= 1

    async with running_engine(tmp_path, handler, workers=4, per_host_jobs=2, hop=hop) as engine:
        await enqueue(engine, 6)
        jobs = await wait_for(engine, all_final)
    assert all(j.state == "done" and j.attempts == 1 for j in jobs)
    assert peak == 2


async def test_job_deferred_costs_no_attempt(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, hop: str
) -> None:
    calls = 0

    async def handler(job: Job, ctx: JobContext) -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise JobDeferred(not_before=ctx.now() + 5, host=None)

    async with running_engine(tmp_path, handler, max_attempts=1, hop=hop) as engine:
        await enqueue(engine)
        [job] = await wait_for(engine, all_final)
    assert job.state == "done" and job.attempts == 1


async def test_jobs_left_running_by_a_dead_process_run_again(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, hop: str
) -> None:
    store = Store.open(tmp_path / "db.sqlite3")
    store.create_run(mode="explicit", collections=[COLL], dids=dids(2), now=EPOCH)
    store.claim_jobs(now=EPOCH, limit=2, owner="dead", max_records_queue=10)
    store.close()
    ran: list[int] = []

    async def handler(job: Job, ctx: JobContext) -> None:
        ran.append(job.id)

    async with running_engine(tmp_path, handler, hop=hop) as engine:
        jobs = await wait_for(engine, all_final)
    assert sorted(ran) == [j.id for j in jobs] and all(j.attempts == 1 for j in jobs)


async def test_stop_interrupts_between_pages_and_job_is_pending_again(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, hop: str
) -> None:
    pages = 0

    async def handler(job: Job, ctx: JobContext) -> None:
        nonlocal pages
        while True:
            ctx.check_interrupted()
            pages += 1
            await trio.sleep(1)

    async with running_engine(tmp_path, handler, hop=hop) as engine:
        await enqueue(engine)
        await trio.sleep(5)
        engine.stop()
        await trio.sleep(5)
        [job] = await engine.db.run(engine.db.store.list_jobs)
    assert job.state == "pending" and job.attempts == 0 and pages >= 5


async def test_cancelling_a_run_cancels_its_running_job(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, hop: str
) -> None:
    async def handler(job: Job, ctx: JobContext) -> None:
        await trio.sleep_forever()

    async with running_engine(tmp_path, handler, hop=hop) as engine:
        run_id = await enqueue(engine)
        await trio.sleep(1)
        await engine.db.run(engine.db.store.cancel_run, run_id, wall())
        assert engine.cancel_run(run_id) == 1
        [job] = await wait_for(engine, all_final)
    assert job.state == "cancelled"


async def test_a_job_its_last_page_finished_stays_done_whatever_comes_after(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, hop: str
) -> None:
    """The last page finishes the job in its own transaction: a cancel of the run that lands while the
    handler is still busy after it changes nothing, and no finish of its own is written."""
    last_page_written = trio.Event()

    async def handler(job: Job, ctx: JobContext) -> None:
        if job.did == dids(2)[0]:
            await write_page(ctx, job, 3)
            last_page_written.set()
        await trio.sleep_forever()  # cancelled with its run

    finishes: list[str] = []
    async with running_engine(tmp_path, handler, hop=hop) as engine:
        store = engine.db.store
        finish_job = store.finish_job

        def recording_finish_job(lease: Any, **kw: Any) -> Job:
            finishes.append(kw["state"])
            return finish_job(lease, **kw)

        store.finish_job = recording_finish_job  # type: ignore[method-assign]
        run_id = await enqueue(engine, 2)
        await last_page_written.wait()
        assert await engine.db.run(engine.db.store.cancel_run, run_id, wall()) is True
        assert engine.cancel_run(run_id) == 2
        finished, cancelled = await wait_for(engine, all_final)
        run = await engine.db.run(engine.db.store.get_run, run_id)
    assert finishes == [
        "cancelled"
    ]  # the other job's (refused: the cancel got there first); none for this one
    assert (finished.state, finished.pages, finished.records_enqueued) == ("done", 1, 3)
    assert cancelled.state == "cancelled"
    assert run is not None and run.state == "cancelled"
    assert run.jobs["done"] == run.jobs["cancelled"] == 1
    assert engine.metrics.jobs_finished.labels("backfill", "done")._value.get() == 1


async def test_waits_for_a_pause_another_job_caused_cost_nothing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, hop: str
) -> None:
    calls = 0

    async def handler(job: Job, ctx: JobContext) -> None:
        nonlocal calls
        calls += 1
        if calls <= MAX_RATE_LIMIT_WAITS + 5:
            raise RateLimited("paused", host="https://pds", resume_at=ctx.now() + 1, received=False)

    async with running_engine(tmp_path, handler, hop=hop) as engine:
        await enqueue(engine)
        [job] = await wait_for(engine, all_final)
    assert (job.state, job.rate_limit_waits, job.attempts) == ("done", 0, 1)


class FlakyStore(Store):
    """A store whose chosen methods fail with ``database_busy`` the first ``times`` calls."""

    failures: dict[str, int]

    def fail(self, method: str, times: int) -> None:
        self.failures = {**getattr(self, "failures", {}), method: times}

    def _maybe_fail(self, method: str) -> None:
        left = getattr(self, "failures", {}).get(method, 0)
        if left:
            self.failures[method] = left - 1
            raise sqlite3.OperationalError("database is locked")

    def claim_jobs(self, **kw: Any) -> list[Job]:  # type: ignore[override]
        self._maybe_fail("claim_jobs")
        return super().claim_jobs(**kw)

    def finish_job(self, *args: Any, **kw: Any) -> Job:  # type: ignore[override]
        self._maybe_fail("finish_job")
        return super().finish_job(*args, **kw)

    def apply_page(self, *args: Any, **kw: Any) -> Any:  # type: ignore[override]
        self._maybe_fail("apply_page")
        return super().apply_page(*args, **kw)


async def test_a_failing_database_never_stops_the_engine(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, hop: str
) -> None:
    store = FlakyStore.open(tmp_path / "db.sqlite3")
    store.fail("claim_jobs", 5)
    store.fail("apply_page", 2)
    store.fail("finish_job", 3)
    attempts: list[int] = []

    async def handler(job: Job, ctx: JobContext) -> None:
        attempts.append(job.attempts)
        await write_page(ctx, job, 3)

    async with running_engine(tmp_path, handler, hop=hop, store=store, max_attempts=1) as engine:
        await enqueue(engine)
        [job] = await wait_for(engine, all_final)
        assert engine.db.failing is None
    # the page write failed twice: each time the job waited for the database at no cost
    assert job.state == "done" and job.attempts == 1 and attempts == [1, 1, 1]
    assert job.records_enqueued == 3


async def test_a_job_running_at_three_deaths_fails_as_crash_loop(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, hop: str
) -> None:
    path = tmp_path / "db.sqlite3"
    store = Store.open(path)
    store.create_run(mode="explicit", collections=[COLL], dids=dids(1), now=EPOCH)
    store.close()
    for _ in range(3):  # three processes die while running the job
        store = Store.open(path)
        store.recover_jobs(EPOCH, expired_only=False)
        assert store.claim_jobs(now=EPOCH, limit=1, owner="dead", max_records_queue=10)
        store.close()
    ran: list[int] = []

    async def handler(job: Job, ctx: JobContext) -> None:
        ran.append(job.id)

    async with running_engine(tmp_path, handler, hop=hop) as engine:
        [job] = await wait_for(engine, all_final)
    assert ran == [] and (job.state, job.error_code) == ("failed", "crash_loop")


async def test_a_dead_daemons_expired_lease_is_taken_over(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, hop: str
) -> None:
    store = Store.open(tmp_path / "db.sqlite3")
    store.create_run(mode="explicit", collections=[COLL], dids=dids(1), now=EPOCH)
    [dead] = store.claim_jobs(now=EPOCH, limit=1, owner="dead", max_records_queue=10, lease_until=EPOCH + 3)
    took_over: list[float] = []

    async def handler(job: Job, ctx: JobContext) -> None:
        took_over.append(ctx.now())

    async with running_engine(tmp_path, handler, hop=hop, store=store, lease_timeout=3.0) as engine:
        [job] = await wait_for(engine, all_final)
    assert job.state == "done" and job.lease_token == dead.lease_token + 1
    assert EPOCH + 3 <= took_over[0] <= EPOCH + 3 + 3 + 1  # within one renewal round of the expiry


async def test_a_lost_lease_interrupts_the_job_and_writes_nothing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, hop: str
) -> None:
    store = Store.open(tmp_path / "db.sqlite3")
    started = trio.Event()

    async def handler(job: Job, ctx: JobContext) -> None:
        started.set()
        while True:
            await trio.sleep(1)
            await write_page(ctx, job, 1, cursor="more")

    async with running_engine(tmp_path, handler, hop=hop, store=store, lease_timeout=3.0) as engine:
        await enqueue(engine)
        await started.wait()

        # another daemon took the job over (its lease expired there): a new claim, a new token, in one
        # store call so that this engine's own dispatcher cannot claim it back in between
        now = wall()

        def take_over() -> list[Job]:
            store.recover_jobs(now + 1000, expired_only=True)
            return store.claim_jobs(
                now=now, limit=1, owner="other", max_records_queue=10, lease_until=now + 1e6
            )

        [other] = await engine.db.run(take_over)
        await trio.sleep(10)
        [job] = await engine.db.run(store.list_jobs)
    assert job.state == "running" and job.lease_token == other.lease_token
    assert engine.busy == 0  # interrupted here, and nothing this daemon wrote landed after the takeover
