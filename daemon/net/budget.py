"""The memory budget: what all workers' response bodies and decoded data may hold at once (SPEC 7).

A body counts against the budget while it streams in, and decoding it reserves its worst-case expansion
too (:data:`TYPED_DECODE_FACTOR` for msgspec's typed decoders, :data:`GENERIC_DECODE_FACTOR` for a
generic JSON decode that builds a Python object per value) before any object is built, so no response the
network can send within the size caps takes the daemon past ``total`` bytes of bodies and their decoded
forms, however many workers receive such responses at once. A worker that would exceed the budget waits
until others release theirs; one that needs more than the whole budget fails at once.

Waiting never deadlocks. A holder waits only while some holder that is *not* waiting holds memory (it will
give it back: its request has a deadline, its walk an end). Once every byte held belongs to a waiter and
no waiter fits, nobody would ever give anything back (sixteen 8 MiB bodies held, each waiting to reserve
its decode, is such a state): the youngest waiting holder that holds memory is refused and gives it back,
and the others go on. The refusal is :class:`~daemon.errors.JobDeferred`: its job goes back to pending for
:data:`DEFER_SECONDS` at no cost (it did nothing wrong; the daemon was busy), so what a job ends with never
depends on what its neighbours received at the same time. Refusing the youngest (as wait-die schemes do)
is what makes this end: the oldest holder is never refused, so it gets its memory or fails on its own
(more than the whole budget), and a deferred job comes back with new, younger holders. Refusing the one
that asks the most instead would refuse, again and again, the one closest to its end.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from daemon.errors import BackfillError, Code, JobDeferred, ProtocolViolation

# Worst cases per byte of body, measured with tracemalloc and as process RSS (tests/test_budget.py has the
# shapes): msgspec's typed listRecords decoder builds 7.5 bytes of objects per byte of minimal records
# ``{"uri":"a","cid":"b"}`` (8.7 per byte of RSS growth); json.loads builds 25.2 per byte of
# ``[{},{},...]`` and ``{"records":[{},...]}`` (26.1 of RSS for ``[{"a":0},...]``), msgspec's generic
# decoder 24.2. Each factor covers the worst traced case with at least 10% to spare for the allocator.
TYPED_DECODE_FACTOR = 10
GENERIC_DECODE_FACTOR = 28
# DAG-CBOR is denser: one byte (0xa0) is an empty map, so cbrrr builds 80 bytes of objects per byte of a
# record block of ``[{},{},...]`` (72 for empty arrays). For a decode of blocks (verified mode's records,
# which do not reserve it yet: a 2 MiB block of empty maps builds 160 MiB).
CBOR_DECODE_FACTOR = 96

# The default budget. Peak RSS is the daemon's own (~82 MB with the default 16 workers), plus what the
# budget holds, plus what the allocators keep of what was freed (pymalloc arenas that a few live objects
# pin: ~90 MB stayed after walks of 640k tiny blocks were freed). Measured under tests/test_memory.py's
# hostile bodies: 160 MiB let the getRepo CARs reach 321-332 MB; 128 MiB gives 190-221 MB for the
# listRecords bodies and 249-262 MB for the getRepo CARs. One 8 MiB body with its typed decode (88 MiB)
# still fits, with 40 MiB beside it.
DEFAULT_BUDGET_BYTES = 128 * 1024 * 1024
# How long a job refused memory to end a wait nobody could end stays pending before it is claimed again.
DEFER_SECONDS = 1.0


# glibc's mallopt parameter, and the threshold it is pinned to: its default.
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 128 * 1024
_allocator_pinned = False


def pin_allocator() -> bool:
    """Make the C allocator give every freed large buffer back to the OS at once (glibc; elsewhere a no-op).

    glibc serves allocations over its mmap threshold (128 KiB) with their own mappings, which go back to the
    OS when freed, but it raises the threshold each time such a buffer is freed, up to 32 MiB: after the
    first 8 MiB body is freed, bodies live on the heap, where the holes that freed bodies leave (and the
    copies a growing buffer makes) stay in the RSS. Measured with sixteen 8 MiB bodies grown in 64 KiB
    chunks, as responses are read: 175 MiB of RSS for 128 MiB held from the second round on, 129 MiB with
    the threshold pinned; and 218-241 MB instead of 278-338 MB of peak RSS for the daemon under the
    hostile listRecords bodies (tests/test_memory.py). Setting the threshold once turns its adjustment off.
    Returns whether it was set (now or before).
    """
    global _allocator_pinned
    if not _allocator_pinned:
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):
            return False
        mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        mallopt.restype = ctypes.c_int
        _allocator_pinned = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES))
    return _allocator_pinned


@dataclass(eq=False, slots=True)
class _Waiter:
    """One take that waits: how much it asks for, what its holder already holds, its wake-up."""

    amount: int
    holding: int
    age: int
    wake: trio.Event = field(default_factory=trio.Event)
    refused: bool = False


class MemoryBudget:
    """A pool of ``total`` bytes that holders take from and give back.

    ``held`` is what is taken now, ``peak`` the most ever taken at once, ``refused`` how many takes asked
    for more than the whole budget, ``deferred`` how many waits were ended by deferring their job.
    ``wall_clock`` gives the unix time a deferred job is due again from. Making one pins the C allocator
    (:func:`pin_allocator`): the budget counts what is held, which is what the RSS is only if freed buffers
    leave it.
    """

    def __init__(
        self,
        total: int = DEFAULT_BUDGET_BYTES,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.total = total
        self.held = 0
        self.peak = 0
        self.refused = 0
        self.deferred = 0
        self._wall_clock = wall_clock
        self._waiters: list[_Waiter] = []
        self._holders = 0
        pin_allocator()

    @property
    def waiting(self) -> int:
        """How many takes are waiting for memory now."""
        return len(self._waiters)

    def holder(self) -> BudgetHolder:
        """A new holder (one response, one walk) that tracks what it took."""
        self._holders += 1
        return BudgetHolder(self, self._holders)

    async def _take(self, amount: int, held_by_holder: int, what: str, age: int = 0) -> None:
        if held_by_holder + amount > self.total:
            self.refused += 1
            raise ProtocolViolation(
                f"{what} needs {held_by_holder + amount} bytes of memory, over the daemon's budget of "
                f"{self.total}",
                code=Code.RESPONSE_TOO_LARGE,
            )
        if self.held + amount > self.total:
            await self._wait(amount, held_by_holder, age)
        self.held += amount
        self.peak = max(self.peak, self.held)

    async def _wait(self, amount: int, holding: int, age: int) -> None:
        """Wait until ``amount`` fits; raises :class:`JobDeferred` if this waiter is refused."""
        waiter = _Waiter(amount, holding, age)
        self._waiters.append(waiter)
        try:
            while True:
                self._end_hopeless_wait()
                if waiter.refused:
                    self.deferred += 1
                    raise JobDeferred(not_before=self._wall_clock() + DEFER_SECONDS, host=None)
                if self.held + amount <= self.total:
                    return
                waiter.wake = trio.Event()
                await waiter.wake.wait()
        finally:
            self._waiters.remove(waiter)
            # One waiter fewer: a wait the others could end before may now be hopeless, or fit.
            self._wake_all()

    def _end_hopeless_wait(self) -> None:
        """Refuse one waiter if nobody could ever give memory back to the others (see the module doc)."""
        waiters = self._waiters
        if not waiters or any(w.refused for w in waiters):
            return  # nobody waits, or a refused waiter is about to give its memory back
        if self.held > sum(w.holding for w in waiters):
            return  # a holder that is not waiting still holds memory: it will give it back
        if any(self.held + w.amount <= self.total for w in waiters):
            return  # someone can go on
        victim = max(waiters, key=lambda w: (w.holding > 0, w.age))
        victim.refused = True
        victim.wake.set()

    def _give(self, amount: int) -> None:
        self.held -= amount
        self._wake_all()

    def _wake_all(self) -> None:
        for waiter in self._waiters:
            waiter.wake.set()


def without_frames(exc: BackfillError) -> BackfillError:
    """``exc`` with no traceback, nor any on the errors it chains to (for ``raise without_frames(exc)``).

    A traceback holds every frame the error was raised through, and their locals: a page's body, its
    decoded records. The response gives its memory back to the budget as the error leaves it, but the
    engine keeps the error until the job's outcome is written, meanwhile other workers take that memory:
    without the frames, the page's objects go when its budget does. (Measured: 360 MB of peak RSS under
    hostile listRecords bodies with the frames kept, 224 MB without.) Our own errors say what happened in
    their code and message; nothing logs their tracebacks.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        current.__traceback__ = None
        current = current.__cause__ or current.__context__
    return exc


class BudgetHolder:
    """What one response or walk holds of the budget; :meth:`release` gives it all back."""

    def __init__(self, budget: MemoryBudget, age: int = 0) -> None:
        self._budget = budget
        self.age = age  # the budget's count of holders when this one was made: larger is younger
        self.held = 0

    async def take(self, amount: int, what: str = "a response") -> None:
        """Take ``amount`` more bytes, waiting for others to release if the budget is spent.

        Raises ProtocolViolation ``response_too_large`` when this holder would need more than the whole
        budget, and :class:`JobDeferred` when it is the one refused to end a wait no holder could end.
        """
        if amount <= 0:
            return
        await self._budget._take(amount, self.held, what, self.age)
        self.held += amount

    def give(self, amount: int) -> None:
        """Give back ``amount`` bytes of what this holder took."""
        amount = min(amount, self.held)
        if amount > 0:
            self.held -= amount
            self._budget._give(amount)

    def release(self) -> None:
        """Give back everything."""
        self.give(self.held)
