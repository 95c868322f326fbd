"""The memory budget: what all workers' response bodies and decoded data may hold at once (SPEC 7).

A body counts against the budget while it streams in, and decoding it reserves its worst-case expansion
too (:data:`TYPED_DECODE_FACTOR` for msgspec's typed decoders, :data:`GENERIC_DECODE_FACTOR` for a
generic JSON decode that builds a Python object per value) before any object is built, so no response the
network can send within the size caps takes the daemon past ``total`` bytes of bodies and their decoded
forms, however many workers receive such responses at once. A worker that would exceed the budget waits
until others release theirs (its request's own deadline still applies); one that needs more than the
whole budget fails at once.
"""

from __future__ import annotations

import trio

from daemon.errors import Code, ProtocolViolation

# Measured worst cases (tests/test_budget.py): msgspec builds at most ~7.5 bytes of objects per byte of a
# listRecords body of minimal records; json.loads builds ~24 per byte of ``[{},{},...]``.
TYPED_DECODE_FACTOR = 8
GENERIC_DECODE_FACTOR = 24

# The default budget: with the default 16 workers and 8 MiB bodies, peak RSS stays under 300 MB.
DEFAULT_BUDGET_BYTES = 160 * 1024 * 1024


class MemoryBudget:
    """A pool of ``total`` bytes that holders take from and give back."""

    def __init__(self, total: int = DEFAULT_BUDGET_BYTES) -> None:
        self.total = total
        self.held = 0
        self.peak = 0
        self._released = trio.Event()

    def holder(self) -> BudgetHolder:
        """A new holder (one response, one walk) that tracks what it took."""
        return BudgetHolder(self)

    async def _take(self, amount: int, held_by_holder: int, what: str) -> None:
        if held_by_holder + amount > self.total:
            raise ProtocolViolation(
                f"{what} needs {held_by_holder + amount} bytes of memory, over the daemon's budget of "
                f"{self.total}",
                code=Code.RESPONSE_TOO_LARGE,
            )
        while self.held + amount > self.total:
            await self._released.wait()
        self.held += amount
        self.peak = max(self.peak, self.held)

    def _give(self, amount: int) -> None:
        self.held -= amount
        self._released.set()
        self._released = trio.Event()


class BudgetHolder:
    """What one response or walk holds of the budget; :meth:`release` gives it all back."""

    def __init__(self, budget: MemoryBudget) -> None:
        self._budget = budget
        self.held = 0

    async def take(self, amount: int, what: str = "a response") -> None:
        """Take ``amount`` more bytes, waiting for others to release if the budget is spent."""
        if amount <= 0:
            return
        await self._budget._take(amount, self.held, what)
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
