"""The memory budget (daemon/net/budget.py): its decode factors against measured expansions, and its waits.

The factors are checked against what decoding really builds, measured with tracemalloc on the hostile body
shapes (8 MiB bodies, just under ``max_response_bytes``): every factor times the body's size must cover the
traced peak with :data:`MARGIN` to spare, since the process's RSS grows a little more than the traced peak
(pymalloc pools and arenas; measured: minimal records 7.5 traced / 8.7 RSS bytes per byte, ``[{},{},...]``
through json.loads 25.2 / 25.1, ``[{"a":0},...]`` 25.0 / 26.1). No timing is asserted anywhere.

The waits run on trio's MockClock (autojump): a wait that never ends would jump straight to its
``fail_after`` deadline and fail the test.
"""

from __future__ import annotations

import gc
import random
import tracemalloc
import weakref
from collections.abc import Callable

import msgspec
import pytest
import trio
import trio.testing

from daemon.atproto.car import MAX_BLOCK_SIZE
from daemon.atproto.cbor import decode_record, encode_dag_cbor
from daemon.atproto.pages import parse_list_records_page
from daemon.errors import JobDeferred, ProtocolViolation
from daemon.net.budget import (
    CBOR_DECODE_FACTOR,
    DEFAULT_BUDGET_BYTES,
    DEFER_SECONDS,
    GENERIC_DECODE_FACTOR,
    TYPED_DECODE_FACTOR,
    BudgetHolder,
    MemoryBudget,
    without_frames,
)
from daemon.net.fetch import Response

MIB = 1024 * 1024
BODY = 8 * MIB - 4096  # just under the default max_response_bytes
MARGIN = 1.1
DID = "did:plc:" + "a" * 24
COLLECTION = "com.example.record"


def filled(head: bytes, unit: bytes, tail: bytes, size: int = BODY) -> bytes:
    """``head``, then ``unit`` repeated (comma-separated) as often as fits in ``size`` bytes, then ``tail``."""
    count = (size - len(head) - len(tail) + 1) // (len(unit) + 1)
    return head + (unit + b",") * (count - 1) + unit + tail


def nested(depth: int, head: bytes = b"", tail: bytes = b"") -> bytes:
    return head + b"[" * depth + b"]" * depth + tail


def many_keys(head: bytes = b"", tail: bytes = b"", size: int = BODY) -> bytes:
    keys: list[bytes] = []
    length = len(head) + len(tail) + 2
    index = 0
    while length < size - 16:
        key = b'"k%d":0' % index
        keys.append(key)
        length += len(key) + 1
        index += 1
    return head + b"{" + b",".join(keys) + b"}" + tail


def traced_peak(decode: Callable[[bytes], object], body: bytes) -> int:
    """The most memory ``decode(body)`` had allocated at once (what it built, kept or not)."""
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        try:
            result = decode(body)
        except (ProtocolViolation, RecursionError, ValueError, msgspec.DecodeError):
            result = None
        peak = tracemalloc.get_traced_memory()[1]
        del result
    finally:
        tracemalloc.stop()
    return peak


def typed(body: bytes) -> object:
    return parse_list_records_page(body, did=DID, collection=COLLECTION, page_size=100)


def generic(body: bytes) -> object:
    """What Response.json does (json.loads, strict)."""
    return Response(200, {}, body).json()


# listRecords bodies the typed decoder reads: the shapes that build the most objects per byte (built when a
# test needs one: they are 8 MiB each).
TYPED_SHAPES: dict[str, Callable[[], bytes]] = {
    "minimal records": lambda: filled(b'{"records":[', b'{"uri":"a","cid":"b"}', b"]}"),
    "empty records": lambda: filled(b'{"records":[', b"{}", b"]}"),
    "records with raw values": lambda: filled(b'{"records":[', b'{"uri":"a","cid":"b","value":0}', b"]}"),
    "a value of empty objects": lambda: filled(b'{"records":[{"uri":"a","cid":"b","value":[', b"{}", b"]}]}"),
    "a deeply nested value": lambda: nested(
        BODY // 2 - 40, b'{"records":[{"uri":"a","cid":"b","value":', b"}]}"
    ),
    "a long string": lambda: b'{"records":[{"uri":"' + b"a" * (BODY - 40) + b'","cid":"b"}]}',
    "unicode escapes": lambda: b'{"records":[{"uri":"' + b"\\u00e9" * ((BODY - 40) // 6) + b'","cid":"b"}]}',
    "surrogate pairs": lambda: (
        b'{"records":[{"uri":"' + b"\\ud83d\\ude00" * ((BODY - 40) // 12) + b'","cid":"b"}]}'
    ),
    "many keys": lambda: many_keys(b'{"records":[', b"]}"),
}

# Bodies a generic decode (json.loads, msgspec without a type) may meet: relay pages, record values.
GENERIC_SHAPES: dict[str, Callable[[], bytes]] = {
    "empty objects": lambda: filled(b"[", b"{}", b"]"),
    "records of empty objects": lambda: filled(b'{"records":[', b"{}", b"]}"),
    "empty arrays": lambda: filled(b"[", b"[]", b"]"),
    "one-key objects": lambda: filled(b"[", b'{"a":0}', b"]"),
    "relay junk entries": lambda: filled(b'{"repos":[', b'{"did":{}}', b"]}"),
    "relay entries with numbers": lambda: filled(b'{"repos":[', b'{"did":0}', b"]}"),
    "minimal records": lambda: filled(b'{"records":[', b'{"uri":"a","cid":"b"}', b"]}"),
    "zeros": lambda: filled(b"[", b"0", b"]"),
    "floats": lambda: filled(b"[", b"1.5", b"]"),
    "big integers": lambda: filled(b"[", b"1" * 18, b"]"),
    "one-character strings": lambda: filled(b"[", b'"a"', b"]"),
    "deep nesting": lambda: nested(BODY // 2),
    "a long string": lambda: b'"' + b"a" * (BODY - 2) + b'"',
    "BMP escapes": lambda: b'"' + b"\\u4e00" * ((BODY - 2) // 6) + b'"',
    "surrogate pair escapes": lambda: b'"' + b"\\ud83d\\ude00" * ((BODY - 2) // 12) + b'"',
    "4-byte UTF-8": lambda: b'"' + "\U0001f600".encode() * ((BODY - 2) // 4) + b'"',
    "many keys": lambda: many_keys(),
}


@pytest.mark.parametrize("shape", list(TYPED_SHAPES))
def test_the_typed_factor_covers_the_typed_listrecords_decode(shape: str) -> None:
    body = TYPED_SHAPES[shape]()
    assert BODY - 64 <= len(body) <= BODY
    peak = traced_peak(typed, body)
    assert TYPED_DECODE_FACTOR * len(body) >= MARGIN * peak, f"{shape}: {peak / len(body):.2f} per byte"


# msgspec's generic decoder builds a little less than json.loads on every shape; the object-heavy ones.
MSGSPEC_SHAPES = ("empty objects", "empty arrays", "one-key objects", "relay junk entries", "minimal records")
GENERIC_CASES = [("json.loads", shape) for shape in GENERIC_SHAPES] + [("msgspec", s) for s in MSGSPEC_SHAPES]


@pytest.mark.parametrize(("decoder", "shape"), GENERIC_CASES)
def test_the_generic_factor_covers_a_generic_json_decode(decoder: str, shape: str) -> None:
    body = GENERIC_SHAPES[shape]()
    assert BODY - 64 <= len(body) <= BODY
    peak = traced_peak(generic if decoder == "json.loads" else msgspec.json.decode, body)
    assert GENERIC_DECODE_FACTOR * len(body) >= MARGIN * peak, f"{shape}: {peak / len(body):.2f} per byte"


def test_the_worst_shapes_are_what_the_factors_are_sized_for() -> None:
    """The factors are not loose: the worst shapes come within the margin (so a cheaper decoder, or a
    factor raised without need, shows up here)."""
    typed_worst = traced_peak(typed, TYPED_SHAPES["minimal records"]()) / BODY
    generic_worst = traced_peak(generic, GENERIC_SHAPES["empty objects"]()) / BODY
    assert 6 < typed_worst <= TYPED_DECODE_FACTOR / MARGIN
    assert 22 < generic_worst <= GENERIC_DECODE_FACTOR / MARGIN


def cbor_record(element: bytes, size: int) -> bytes:
    """A record block ``{"v": [element, element, ...], "$type": ...}`` of about ``size`` bytes."""
    tail = encode_dag_cbor("$type") + encode_dag_cbor(COLLECTION)
    count = (size - len(tail) - 8) // len(element)
    return b"\xa2" + encode_dag_cbor("v") + b"\x9a" + count.to_bytes(4, "big") + element * count + tail


@pytest.mark.parametrize(("shape", "element"), [("empty maps", b"\xa0"), ("empty arrays", b"\x80")])
def test_the_cbor_factor_covers_a_record_block_decode(shape: str, element: bytes) -> None:
    """Verified mode decodes record blocks (up to MAX_BLOCK_SIZE) with cbrrr: one byte is an empty map."""
    block = cbor_record(element, MAX_BLOCK_SIZE // 4)
    assert isinstance(decode_record(block), dict)
    peak = traced_peak(decode_record, block)
    assert CBOR_DECODE_FACTOR * len(block) >= MARGIN * peak, f"{shape}: {peak / len(block):.2f} per byte"
    # one such block at the largest size allowed is most of the budget
    assert CBOR_DECODE_FACTOR * MAX_BLOCK_SIZE > DEFAULT_BUDGET_BYTES


def test_the_hostile_typed_shapes_are_refused_as_the_daemon_reports_them() -> None:
    for shape, code in (("minimal records", "page_too_large"), ("empty records", "bad_response")):
        with pytest.raises(ProtocolViolation) as caught:
            typed(TYPED_SHAPES[shape]())
        assert caught.value.code == code


def test_a_deeply_nested_value_is_a_bad_response() -> None:
    with pytest.raises(ProtocolViolation) as caught:
        typed(TYPED_SHAPES["a deeply nested value"]())
    assert caught.value.code == "bad_response"


# --- MemoryBudget on the MockClock ------------------------------------------------------------------------


async def test_takes_within_the_budget_do_not_wait(autojump_clock: trio.testing.MockClock) -> None:
    budget = MemoryBudget(total=100)
    first, second = budget.holder(), budget.holder()
    start = trio.current_time()
    await first.take(60)
    await second.take(40)
    assert trio.current_time() == start
    assert (budget.held, budget.peak, first.held, second.held) == (100, 100, 60, 40)
    first.give(10)
    assert (budget.held, first.held) == (90, 50)
    first.give(1000)  # never more than it holds
    second.release()
    assert (budget.held, budget.peak, first.held, second.held) == (0, 100, 0, 0)
    await first.take(0)
    await first.take(-5)
    assert budget.held == 0


async def test_a_take_waits_until_others_release(autojump_clock: trio.testing.MockClock) -> None:
    budget = MemoryBudget(total=100)
    owner, waiter = budget.holder(), budget.holder()
    await owner.take(80)
    got_it_at: list[float] = []

    async def wants_more() -> None:
        await waiter.take(50)
        got_it_at.append(trio.current_time())

    async def releases_in_steps() -> None:
        await trio.sleep(5)
        owner.give(20)  # 60 held: 50 more still does not fit
        await trio.sleep(5)
        owner.give(20)  # 40 held: now it fits
        await trio.sleep(5)
        owner.release()

    start = trio.current_time()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wants_more)
            nursery.start_soon(releases_in_steps)
            await trio.testing.wait_all_tasks_blocked()
            assert budget.waiting == 1 and budget.held == 80
    assert got_it_at == [start + 10]
    assert (budget.held, budget.peak, waiter.held, budget.refused, budget.waiting) == (50, 90, 50, 0, 0)


async def test_more_than_the_whole_budget_is_refused_at_once(autojump_clock: trio.testing.MockClock) -> None:
    budget = MemoryBudget(total=100)
    other, greedy = budget.holder(), budget.holder()
    await other.take(90)
    await greedy.take(5)
    start = trio.current_time()
    with pytest.raises(ProtocolViolation) as caught:
        await greedy.take(96, "a test body")  # 5 + 96 > 100, whatever the others hold
    assert caught.value.code == "response_too_large"
    assert "a test body" in caught.value.message
    assert trio.current_time() == start
    assert (budget.held, greedy.held, budget.refused, budget.waiting) == (95, 5, 1, 0)
    with pytest.raises(ProtocolViolation):
        await budget.holder().take(101)
    assert budget.held == 95


async def test_a_cancelled_wait_leaves_the_budget_consistent(autojump_clock: trio.testing.MockClock) -> None:
    budget = MemoryBudget(total=100)
    owner, waiter = budget.holder(), budget.holder()
    await owner.take(70)
    await waiter.take(20)
    with trio.move_on_after(5) as scope:
        await waiter.take(40)  # 90 + 40 > 100: waits, then the deadline cancels it
    assert scope.cancelled_caught
    assert (budget.held, waiter.held, budget.waiting, budget.refused) == (90, 20, 0, 0)
    waiter.release()
    owner.release()
    assert budget.held == 0
    everything = budget.holder()
    with trio.fail_after(1):
        await everything.take(100)
    assert budget.held == 100 and budget.peak == 100


async def test_cancelling_one_waiter_wakes_no_one_wrongly(autojump_clock: trio.testing.MockClock) -> None:
    """Two waiters; one is cancelled; the other still gets its memory once the owner gives it back."""
    budget = MemoryBudget(total=100)
    owner = budget.holder()
    await owner.take(100)
    served: list[str] = []

    async def wait_for(name: str, amount: int, holder: BudgetHolder) -> None:
        await holder.take(amount)
        served.append(name)

    async with trio.open_nursery() as nursery:
        cancelled = trio.CancelScope()

        async def cancellable() -> None:
            with cancelled:
                await wait_for("cancelled", 60, budget.holder())

        nursery.start_soon(cancellable)
        nursery.start_soon(wait_for, "patient", 60, budget.holder())
        await trio.testing.wait_all_tasks_blocked()
        assert budget.waiting == 2
        cancelled.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert budget.waiting == 1 and budget.held == 100
        owner.release()
    assert served == ["patient"]
    assert (budget.held, budget.waiting, budget.refused) == (60, 0, 0)


async def test_holders_that_all_wait_for_each_other_do_not_deadlock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Sixteen 8 MiB bodies held, each then reserving its typed decode: every byte held belongs to a waiter
    and none fits. One waiter at a time is refused (its job deferred at no cost) and gives its memory back;
    the others go on."""
    budget = MemoryBudget(wall_clock=lambda: 1000.0)
    body = 8 * MIB
    outcomes: list[str] = []

    async def response() -> None:
        holder = budget.holder()
        try:
            await holder.take(body, "a body")
            await trio.sleep(1)  # every body is in before any decode reserves
            try:
                await holder.take(TYPED_DECODE_FACTOR * body, "decoding a response")
            except JobDeferred as deferred:
                assert deferred.not_before == 1000.0 + DEFER_SECONDS and deferred.host is None
                outcomes.append("deferred")
                return
            assert budget.held <= budget.total
            await trio.sleep(1)  # decoding
            outcomes.append("decoded")
        finally:
            holder.release()

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            for _ in range(16):
                nursery.start_soon(response)
    assert len(outcomes) == 16 and "decoded" in outcomes
    assert outcomes.count("deferred") == budget.deferred > 0 and budget.refused == 0
    assert (budget.held, budget.waiting) == (0, 0)
    assert budget.peak <= budget.total


async def test_the_refused_waiter_is_the_youngest(autojump_clock: trio.testing.MockClock) -> None:
    """The oldest holder is never the one refused (so it always gets to its end), whatever it asks."""
    budget = MemoryBudget(total=100)
    old, young = budget.holder(), budget.holder()
    await old.take(50)
    await young.take(10)
    results: dict[str, str] = {}

    async def ask(name: str, holder: BudgetHolder, amount: int) -> None:
        try:
            await holder.take(amount)
            results[name] = "granted"
        except JobDeferred:
            results[name] = "deferred"
            holder.release()  # as a response's context does when its caller raises

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "old", old, 45)  # 60 + 45 > 100
            await trio.testing.wait_all_tasks_blocked()
            assert budget.waiting == 1  # young still holds memory and is not waiting: old waits
            nursery.start_soon(ask, "young", young, 45)
    assert results == {"old": "granted", "young": "deferred"}
    assert (budget.held, old.held, budget.deferred) == (95, 95, 1)


async def test_waits_end_when_the_oldest_is_the_greediest(autojump_clock: trio.testing.MockClock) -> None:
    """Walks that grow block by block until one of them needs more than the whole budget: deferring the
    youngest lets the oldest grow until it fails on its own; none is deferred for ever (no livelock)."""
    budget = MemoryBudget(total=1000, wall_clock=trio.current_time)
    ends: list[str] = []

    async def walk(name: str) -> None:
        for _ in range(100):  # each deferral is a new attempt with a new holder, after DEFER_SECONDS
            holder = budget.holder()
            try:
                while True:
                    await holder.take(10)  # grows until it is over the whole budget
                    await trio.sleep(0.01)
            except ProtocolViolation:
                ends.append(name)
                return
            except JobDeferred as deferred:
                not_before = deferred.not_before
            finally:
                holder.release()  # as the walk does, before its job is put back
            await trio.sleep_until(not_before)

    with trio.fail_after(10_000):
        async with trio.open_nursery() as nursery:
            for name in "abcd":
                nursery.start_soon(walk, name)
    assert sorted(ends) == ["a", "b", "c", "d"]
    assert budget.deferred > 0 and (budget.held, budget.waiting) == (0, 0)


async def test_a_holder_that_is_not_waiting_keeps_the_others_waiting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """No refusal while some holder that does not wait still holds memory: it will give it back."""
    budget = MemoryBudget(total=100)
    busy, first, second = budget.holder(), budget.holder(), budget.holder()
    await busy.take(60)
    await first.take(15)
    await second.take(15)

    async def release_later() -> None:
        await trio.sleep(30)
        busy.release()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first.take, 20)
            nursery.start_soon(second.take, 20)
            nursery.start_soon(release_later)
    assert (budget.held, budget.deferred, first.held, second.held) == (70, 0, 35, 35)


async def test_random_traffic_keeps_the_budget_consistent(autojump_clock: trio.testing.MockClock) -> None:
    """Sixteen workers taking, growing, giving back and being cancelled at random: the budget never goes
    over its total, never hangs, and ends with nothing held."""
    budget = MemoryBudget(total=1000)
    rng = random.Random(9)
    over: list[int] = []

    async def worker(seed: int) -> None:
        local = random.Random(seed)
        for _ in range(40):
            holder = budget.holder()
            with trio.move_on_after(local.uniform(0.5, 20)):
                try:
                    for _ in range(local.randint(1, 4)):
                        await holder.take(local.randint(1, 400))
                        if budget.held > budget.total:
                            over.append(budget.held)
                        await trio.sleep(local.uniform(0, 2))
                except (ProtocolViolation, JobDeferred):
                    pass
                finally:
                    holder.release()
            await trio.sleep(local.uniform(0, 1))

    with trio.fail_after(10_000):
        async with trio.open_nursery() as nursery:
            for _ in range(16):
                nursery.start_soon(worker, rng.randrange(1 << 30))
    assert not over
    assert (budget.held, budget.waiting) == (0, 0)
    assert 0 < budget.peak <= budget.total


async def test_a_response_holds_its_reservations_until_it_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    budget = MemoryBudget(total=1000)
    holder = budget.holder()
    await holder.take(10)
    response = Response(200, {}, b"x" * 10, holder)
    await response.reserve(TYPED_DECODE_FACTOR)
    await response.reserve_bytes(5)
    assert budget.held == 10 + 10 * TYPED_DECODE_FACTOR + 5
    with pytest.raises(ProtocolViolation):
        await response.reserve_bytes(1000)
    holder.release()
    assert budget.held == 0


def test_the_default_budget_fits_the_default_configuration() -> None:
    """Two 8 MiB listRecords bodies cannot decode at once under the default budget, one can; a relay page
    of 8 MiB cannot be decoded generically at all (it is refused: response_too_large)."""
    page = 8 * MIB
    assert page * (1 + TYPED_DECODE_FACTOR) <= DEFAULT_BUDGET_BYTES < 2 * page * (1 + TYPED_DECODE_FACTOR)
    assert page * (1 + GENERIC_DECODE_FACTOR) > DEFAULT_BUDGET_BYTES


def test_without_frames_lets_the_objects_of_a_failed_page_go() -> None:
    """An error's traceback keeps the frames it went through alive, with their locals (a page's body and
    records); without_frames drops them, and with them those objects, at once (no cycle collector)."""

    class Page:
        pass

    refs: list[weakref.ref[Page]] = []

    def parse() -> None:
        page = Page()
        refs.append(weakref.ref(page))
        try:
            raise ValueError("the decoder's own error")
        except ValueError:
            raise ProtocolViolation("page_too_large") from None

    gc.disable()
    try:
        try:
            parse()
        except ProtocolViolation as exc:
            error = exc
        assert refs[0]() is not None  # held by the traceback (and by the context's)
        assert without_frames(error) is error
        assert refs[0]() is None
        assert error.__traceback__ is None and error.__context__ is not None
        assert error.__context__.__traceback__ is None
    finally:
        gc.enable()
