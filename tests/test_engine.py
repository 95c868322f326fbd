"""Engine tests with a test job handler, on trio's MockClock (autojump) so backoff costs no real time."""

from __future__ import annotations

import itertools
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio.testing

from daemon.engine.backoff import RetryPolicy
from daemon.engine.context import JobContext
from daemon.engine.outcome import MAX_RATE_LIMIT_WAITS
from daemon.engine.runner import Engine, EngineSettings
from daemon.errors import AccountUnavailable, JobDeferred, RateLimited, UpstreamTimeout
from daemon.metrics import Metrics
from daemon.store.database import Database
from daemon.store.models import Job
from daemon.store.sqlite import SqliteStore as Store

EPOCH = 1_700_000_000.0
COLL = "com.example.record"


def wall() -> float:
    return EPOCH + trio.current_time()


def dids(n: int) -> list[str]:
    return [f"did:plc:{'a' * 23}{'bcdefghijk'[i]}" for i in range(n)]


class InlineDatabase(Database):
    """Runs store calls on the trio thread, so MockClock's autojump never fires while SQLite works.

    (With the real thread hop, a task waiting on a thread counts as blocked and virtual time jumps ahead.)
    """

    async def run(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        await trio.lowlevel.checkpoint()
        return fn(*args, **kwargs)


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
) -> AsyncIterator[Engine]:
    db = InlineDatabase(Store.open(tmp_path / "db.sqlite3"))
    engine = Engine(
        db,
        settings=EngineSettings(
            workers=workers, max_records_queue=max_records_queue, per_host_jobs=per_host_jobs
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
    while True:
        jobs = await engine.db.run(engine.db.store.list_jobs, limit=1000)
        if predicate(jobs):
            return jobs
        await trio.sleep(1)


def all_final(jobs: list[Job]) -> bool:
    return bool(jobs) and all(j.state in ("done", "failed", "cancelled") for j in jobs)


async def test_successful_job_is_done(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    seen: list[int] = []

    async def handler(job: Job, ctx: JobContext) -> None:
        seen.append(job.id)

    async with running_engine(tmp_path, handler) as engine:
        await enqueue(engine, 3)
        jobs = await wait_for(engine, all_final)
    assert [j.state for j in jobs] == ["done"] * 3 and sorted(seen) == [j.id for j in jobs]
    assert all(j.attempts == 1 for j in jobs)


async def test_transient_errors_retry_on_the_full_jitter_schedule_then_fail(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    calls: list[float] = []

    async def handler(job: Job, ctx: JobContext) -> None:
        calls.append(ctx.now())
        raise UpstreamTimeout("page took too long")

    async with running_engine(tmp_path, handler, max_attempts=4, seed=11) as engine:
        await enqueue(engine)
        [job] = await wait_for(engine, all_final)
    assert job.state == "failed" and job.attempts == 4
    assert (job.error_code, job.last_error) == ("timeout", "page took too long")
    assert len(calls) == 4
    expected = RetryPolicy(max_attempts=4, base=5.0, cap=300.0, rng=random.Random(11))
    for attempt, (before, after) in enumerate(itertools.pairwise(calls), start=1):
        assert after - before >= expected.delay(attempt) - 1e-6


async def test_permanent_error_fails_at_once(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async def handler(job: Job, ctx: JobContext) -> None:
        raise AccountUnavailable("PDS says RepoTakendown", code="repo_takendown")

    async with running_engine(tmp_path, handler) as engine:
        await enqueue(engine)
        [job] = await wait_for(engine, all_final)
    assert (job.state, job.attempts, job.error_code) == ("failed", 1, "repo_takendown")


async def test_unexpected_exception_is_retried_as_internal_error(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async def handler(job: Job, ctx: JobContext) -> None:
        raise KeyError("bug")

    async with running_engine(tmp_path, handler, max_attempts=2) as engine:
        await enqueue(engine)
        [job] = await wait_for(engine, all_final)
    assert (job.state, job.attempts, job.error_code) == ("failed", 2, "internal_error")
    assert "KeyError" in (job.last_error or "")


async def test_a_failing_job_does_not_poison_others(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async def handler(job: Job, ctx: JobContext) -> None:
        if job.did == dids(2)[0]:
            raise AccountUnavailable("gone", code="repo_not_found")

    async with running_engine(tmp_path, handler) as engine:
        await enqueue(engine, 5)
        jobs = await wait_for(engine, all_final)
    assert sorted(j.state for j in jobs) == ["done"] * 4 + ["failed"]


async def test_dispatcher_wakes_on_enqueue_without_polling(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async def handler(job: Job, ctx: JobContext) -> None:
        pass

    async with running_engine(tmp_path, handler) as engine:
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


async def test_wakes_for_the_next_due_retry(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    calls: list[float] = []

    async def handler(job: Job, ctx: JobContext) -> None:
        calls.append(ctx.now())
        if len(calls) == 1:
            raise UpstreamTimeout("once")

    async with running_engine(tmp_path, handler) as engine:
        await enqueue(engine)
        [job] = await wait_for(engine, all_final)
    assert job.state == "done" and job.attempts == 2 and len(calls) == 2


async def test_backpressure_holds_backfill_jobs_until_acked(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    ran: list[str | None] = []

    async def handler(job: Job, ctx: JobContext) -> None:
        ran.append(job.did)
        store = ctx._engine.db.store  # the test handler writes records like the real one
        await ctx._engine.db.run(
            store.record_page,
            job_id=job.id,
            run_id=job.run_id,
            did=job.did or "",
            collection=job.collection,
            records=[(f"r{i}", f"c{i}") for i in range(5)],
            cursor=None,
            skipped=0,
            now=ctx.now(),
        )

    async with running_engine(tmp_path, handler, max_records_queue=3, workers=1) as engine:
        await enqueue(engine, 2)
        await trio.sleep(600)
        assert len(ran) == 1  # the first job pushed the queue over the limit; the second waits
        last = (await engine.db.run(engine.db.store.list_records, after=0, limit=100))[-1].id
        await engine.db.run(engine.db.store.ack_records, last)
        engine.notify()
        await wait_for(engine, all_final)
    assert len(ran) == 2


async def test_rate_limited_job_waits_without_spending_attempts(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    calls: list[float] = []

    async def handler(job: Job, ctx: JobContext) -> None:
        calls.append(ctx.now())
        if len(calls) <= 3:
            raise RateLimited("429", host="https://pds", resume_at=ctx.now() + 100)

    async with running_engine(tmp_path, handler, max_attempts=1) as engine:
        await enqueue(engine)
        [job] = await wait_for(engine, all_final)
    assert job.state == "done" and job.attempts == 1 and job.rate_limit_waits == 3
    assert all(b - a >= 100 for a, b in itertools.pairwise(calls))


async def test_too_many_rate_limit_waits_fail_with_their_own_code(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    calls = 0

    async def handler(job: Job, ctx: JobContext) -> None:
        nonlocal calls
        calls += 1
        raise RateLimited("429", host="https://pds", resume_at=ctx.now() + 10)

    async with running_engine(tmp_path, handler) as engine:
        await enqueue(engine)
        [job] = await wait_for(engine, all_final)
    assert job.state == "failed" and job.error_code == "rate_limit_exhausted"
    assert calls == MAX_RATE_LIMIT_WAITS + 1 and job.rate_limit_waits == MAX_RATE_LIMIT_WAITS


async def test_jobs_of_a_paused_host_are_not_claimed_and_others_flow(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    paused = {"https://slow": EPOCH + 500}
    ran: list[tuple[str | None, float]] = []

    async def handler(job: Job, ctx: JobContext) -> None:
        host = "https://slow" if job.did == dids(3)[0] else "https://fast"
        async with ctx.host_slot(host):
            ran.append((job.did, ctx.now()))

    async with running_engine(tmp_path, handler, workers=1, paused=paused) as engine:
        await enqueue(engine, 3)
        jobs = await wait_for(engine, all_final)
    assert all(j.state == "done" for j in jobs)
    slow = [t for d, t in ran if d == dids(3)[0]]
    fast = [t for d, t in ran if d != dids(3)[0]]
    assert slow[0] >= EPOCH + 500 and max(fast) < EPOCH + 500
    deferred = next(j for j in jobs if j.did == dids(3)[0])
    assert deferred.attempts == 1 and deferred.host == "https://slow"


async def test_saturated_host_defers_without_holding_a_worker(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
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

    async with running_engine(tmp_path, handler, workers=4, per_host_jobs=2) as engine:
        await enqueue(engine, 6)
        jobs = await wait_for(engine, all_final)
    assert all(j.state == "done" and j.attempts == 1 for j in jobs)
    assert peak == 2


async def test_job_deferred_costs_no_attempt(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    calls = 0

    async def handler(job: Job, ctx: JobContext) -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise JobDeferred(not_before=ctx.now() + 5, host=None)

    async with running_engine(tmp_path, handler, max_attempts=1) as engine:
        await enqueue(engine)
        [job] = await wait_for(engine, all_final)
    assert job.state == "done" and job.attempts == 1


async def test_jobs_left_running_by_a_dead_process_run_again(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    store = Store.open(tmp_path / "db.sqlite3")
    store.create_run(mode="explicit", collections=[COLL], dids=dids(2), now=EPOCH)
    store.claim_jobs(now=EPOCH, limit=2, owner="dead", max_records_queue=10)
    store.close()
    ran: list[int] = []

    async def handler(job: Job, ctx: JobContext) -> None:
        ran.append(job.id)

    async with running_engine(tmp_path, handler) as engine:
        jobs = await wait_for(engine, all_final)
    assert sorted(ran) == [j.id for j in jobs] and all(j.attempts == 1 for j in jobs)


async def test_stop_interrupts_between_pages_and_job_is_pending_again(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    pages = 0

    async def handler(job: Job, ctx: JobContext) -> None:
        nonlocal pages
        while True:
            ctx.check_interrupted()
            pages += 1
            await trio.sleep(1)

    async with running_engine(tmp_path, handler) as engine:
        await enqueue(engine)
        await trio.sleep(5)
        engine.stop()
        await trio.sleep(5)
        [job] = await engine.db.run(engine.db.store.list_jobs)
    assert job.state == "pending" and job.attempts == 0 and pages >= 5


async def test_cancelling_a_run_cancels_its_running_job(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async def handler(job: Job, ctx: JobContext) -> None:
        await trio.sleep_forever()

    async with running_engine(tmp_path, handler) as engine:
        run_id = await enqueue(engine)
        await trio.sleep(1)
        await engine.db.run(engine.db.store.cancel_run, run_id, wall())
        assert engine.cancel_run(run_id) == 1
        [job] = await wait_for(engine, all_final)
    assert job.state == "cancelled"


async def test_waits_for_a_pause_another_job_caused_cost_nothing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    calls = 0

    async def handler(job: Job, ctx: JobContext) -> None:
        nonlocal calls
        calls += 1
        if calls <= MAX_RATE_LIMIT_WAITS + 5:
            raise RateLimited("paused", host="https://pds", resume_at=ctx.now() + 1, received=False)

    async with running_engine(tmp_path, handler) as engine:
        await enqueue(engine)
        [job] = await wait_for(engine, all_final)
    assert (job.state, job.rate_limit_waits, job.attempts) == ("done", 0, 1)
