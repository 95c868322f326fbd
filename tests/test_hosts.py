from __future__ import annotations

import pytest
import trio
import trio.testing

from daemon.errors import RateLimited
from daemon.net.hosts import HostLimiter, HostState

EPOCH = 1_700_000_000.0
HOST = "https://pds.example.com"


@pytest.fixture
def clock(mock_clock: trio.testing.MockClock) -> trio.testing.MockClock:
    mock_clock.autojump_threshold = 0
    return mock_clock


def wall() -> float:
    """Unix time that follows the mock clock."""
    return EPOCH + trio.current_time()


async def test_concurrency_is_capped_per_host(clock: trio.testing.MockClock) -> None:
    limiter = HostLimiter(per_host_concurrency=3, per_host_rate=0, now=wall)
    active = {"a": 0, "b": 0}
    peak = {"a": 0, "b": 0}

    async def request(host: str) -> None:
        async with limiter.slot(host):
            active[host] += 1
            peak[host] = max(peak[host], active[host])
            await trio.sleep(1)
            active[host] -= 1

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(request, "a")
            nursery.start_soon(request, "b")
    assert peak == {"a": 3, "b": 3}


async def test_rate_is_paced_on_the_trio_clock(clock: trio.testing.MockClock) -> None:
    limiter = HostLimiter(per_host_concurrency=2, per_host_rate=4.0, now=wall)
    started: list[float] = []

    async def request() -> None:
        async with limiter.slot(HOST):
            started.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(request)
    # No burst: one every 1/rate seconds from the first.
    assert sorted(started) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75])


async def test_rate_and_concurrency_together_never_exceed_either(clock: trio.testing.MockClock) -> None:
    limiter = HostLimiter(per_host_concurrency=3, per_host_rate=10.0, now=wall)
    started: list[float] = []
    active = 0
    peak = 0

    async def request(hold: float) -> None:
        nonlocal active, peak
        async with limiter.slot(HOST):
            started.append(trio.current_time())
            active += 1
            peak = max(peak, active)
            await trio.sleep(hold)
            active -= 1

    async with trio.open_nursery() as nursery:
        for i in range(60):
            nursery.start_soon(request, (i % 7) * 0.05)
    assert peak <= 3
    started.sort()
    for i, t in enumerate(started):
        assert sum(1 for u in started[i:] if u < t + 1.0) <= 10


async def test_unlimited_rate_does_not_wait(clock: trio.testing.MockClock) -> None:
    limiter = HostLimiter(per_host_concurrency=1, per_host_rate=0, now=wall)
    for _ in range(100):
        async with limiter.slot(HOST):
            pass
    assert trio.current_time() == 0.0


async def test_a_paused_host_refuses_at_once_until_the_pause_ends(clock: trio.testing.MockClock) -> None:
    limiter = HostLimiter(per_host_concurrency=2, per_host_rate=0, now=wall)
    limiter.pause(HOST, EPOCH + 30)
    assert limiter.paused_until(HOST) == EPOCH + 30
    assert limiter.paused_until("https://other.example") is None
    with pytest.raises(RateLimited) as caught:
        async with limiter.slot(HOST):
            raise AssertionError("must not get a slot")
    assert caught.value.host == HOST
    assert caught.value.resume_at == EPOCH + 30
    assert trio.current_time() == 0.0
    async with limiter.slot("https://other.example"):
        pass
    await trio.sleep(30)
    assert limiter.paused_until(HOST) is None
    async with limiter.slot(HOST):
        pass


async def test_a_later_pause_is_kept(clock: trio.testing.MockClock) -> None:
    limiter = HostLimiter(per_host_concurrency=1, per_host_rate=0, now=wall)
    limiter.pause(HOST, EPOCH + 100)
    limiter.pause(HOST, EPOCH + 10)
    assert limiter.paused_until(HOST) == EPOCH + 100
    limiter.pause(HOST, EPOCH + 200)
    assert limiter.paused_until(HOST) == EPOCH + 200


async def test_requests_waiting_for_a_slot_are_refused_when_the_host_gets_paused(
    clock: trio.testing.MockClock,
) -> None:
    limiter = HostLimiter(per_host_concurrency=1, per_host_rate=0, now=wall)
    outcomes: list[str] = []

    async def first() -> None:
        async with limiter.slot(HOST):
            await trio.sleep(1)
            limiter.pause(HOST, EPOCH + 60)  # this request got a 429
        outcomes.append("first done")

    async def second() -> None:
        await trio.sleep(0.5)
        try:
            async with limiter.slot(HOST):
                outcomes.append("second sent")
        except RateLimited:
            outcomes.append("second refused")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        nursery.start_soon(second)
    assert sorted(outcomes) == ["first done", "second refused"]


async def test_snapshot_shows_busy_waiting_and_paused_hosts(clock: trio.testing.MockClock) -> None:
    limiter = HostLimiter(per_host_concurrency=1, per_host_rate=0, now=wall)
    assert limiter.snapshot() == []
    limiter.pause("https://b.example", EPOCH + 5)
    seen: list[list[HostState]] = []

    async def hold() -> None:
        async with limiter.slot("https://a.example"):
            await trio.sleep(1)
            seen.append(limiter.snapshot())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold)
        nursery.start_soon(hold)
    assert seen[0] == [
        HostState("https://a.example", in_flight=1, paused_until=None, waiting=1),
        HostState("https://b.example", in_flight=0, paused_until=EPOCH + 5, waiting=0),
    ]
    await trio.sleep(10)
    assert limiter.snapshot() == []


async def test_cancelled_waiters_leave_no_trace(clock: trio.testing.MockClock) -> None:
    limiter = HostLimiter(per_host_concurrency=1, per_host_rate=1.0, now=wall)

    async def wait_for_slot() -> None:
        async with limiter.slot(HOST):
            await trio.sleep(10)

    with trio.move_on_after(1):
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(wait_for_slot)
    assert limiter.snapshot() == []
    async with limiter.slot(HOST):
        assert limiter.snapshot() == [HostState(HOST, in_flight=1, paused_until=None, waiting=0)]


async def test_idle_hosts_are_forgotten_without_loosening_the_rate(clock: trio.testing.MockClock) -> None:
    limiter = HostLimiter(per_host_concurrency=1, per_host_rate=1.0, now=wall)
    for i in range(1500):
        async with limiter.slot(f"https://old{i}.example"):
            pass
    # every old host's next start is due: those hosts are now indistinguishable from new ones
    await trio.sleep(2)
    for i in range(1500):
        async with limiter.slot(f"https://new{i}.example"):
            pass
    assert len(limiter._hosts) <= 1500
    # A host used just now still has its next start ahead: it is kept, and its next request waits.
    before = trio.current_time()
    async with limiter.slot("https://new1499.example"):
        assert trio.current_time() == pytest.approx(before + 1.0)
