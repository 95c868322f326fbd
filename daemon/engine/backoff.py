"""Retry policy: full-jitter exponential backoff, with the randomness injected (pure)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When to retry a failed job: ``uniform(0, min(cap, base * 2**attempt))`` until ``max_attempts``."""

    max_attempts: int
    base: float
    cap: float
    rng: random.Random = field(default_factory=random.Random, compare=False)

    def should_retry(self, attempts: int) -> bool:
        """True when a job that has made ``attempts`` tries may try again."""
        return attempts < self.max_attempts

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed try."""
        return self.rng.uniform(0.0, min(self.cap, self.base * 2.0**attempts))
