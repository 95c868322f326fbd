"""Rate-limit policy: when a rate-limited host may be asked again, and how far apart requests start.

Pure: no I/O, no trio. Every function takes the current time as an argument, so callers decide which clock
(unix wall time for pauses that are reported to operators, trio's clock for pacing).
"""

from __future__ import annotations

import email.utils
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC

# A RateLimit-Reset value below this is a number of seconds from now rather than a unix time: 1e9 seconds
# after the epoch is September 2001, long before any AT Protocol server existed, while no server asks for a
# pause of 31 years.
_DELTA_SECONDS_BELOW = 1e9
# The reference PDS rounds RateLimit-Reset (a unix time) down: the window may reset up to a second later.
RESET_ROUNDING = 1.0
# A 429 pauses its host for at least this long, whatever the headers say.
MIN_PAUSE = 1.0
# Windows with more than this many requests left per second of window need no pacing: the per-host rate
# and concurrency keep far below them.
PACING_HEADROOM = 50.0


def rate_limit_resume_at(
    headers: Mapping[str, str],
    *,
    now: float,
    default_pause: float,
    cap: float = 900.0,
) -> float:
    """Return the unix time at which a host that answered HTTP 429 may be asked again (SPEC 6.1).

    Looks, case-insensitively, at both:

    1. ``RateLimit-Reset``: the reference PDS sends the unix time (seconds) at which its window resets,
       rounded down, so up to a second early: one second is added to a unix time. The IETF ``RateLimit``
       draft sends a number of seconds from now instead; a value below 1e9 is read that way.
    2. ``Retry-After`` (RFC 9110): a number of seconds from now (the reference PDS rounds it up), or an
       HTTP date.

    The pause lasts until the later of the two, and at least one second; a missing or unparsable header
    (garbage, negative, NaN) is ignored, and with neither usable the host pauses for ``default_pause``
    seconds. The answer is capped at ``now + cap`` so that a hostile server cannot park a host forever.
    The body of the 429 is not consulted: JSON and HTML (proxy) 429s are treated alike.
    """
    named = [
        when
        for when in (
            _rate_limit_reset(_header(headers, "ratelimit-reset"), now),
            _retry_after(_header(headers, "retry-after"), now),
        )
        if when is not None
    ]
    resume_at = max(named) if named else now + default_pause
    return min(max(resume_at, now + MIN_PAUSE), now + cap)


@dataclass(frozen=True, slots=True)
class RateLimitWindow:
    """What a response's ``RateLimit-*`` headers say of the limit that applies to its endpoint.

    ``policy`` names the limit (``RateLimit-Policy``, e.g. ``3000;w=300``; the reference PDS has a global
    limit and a separate one for ``getRepo``); ``remaining`` requests are left until ``reset_at`` (unix
    seconds, already moved a second later for the reference PDS's rounding down).
    """

    policy: str
    remaining: int
    reset_at: float


def rate_limit_window(headers: Mapping[str, str], *, now: float) -> RateLimitWindow | None:
    """The window an ordinary response describes, or None when it sends no usable ``RateLimit-*``."""
    remaining = _seconds(_header(headers, "ratelimit-remaining") or "")
    reset_at = _rate_limit_reset(_header(headers, "ratelimit-reset"), now)
    if remaining is None or reset_at is None:
        return None
    policy = (_header(headers, "ratelimit-policy") or _header(headers, "ratelimit-limit") or "").strip()
    return RateLimitWindow(policy[:100], int(remaining), reset_at)


def window_delay(window: RateLimitWindow, *, now: float, in_flight: int) -> float:
    """Seconds to wait before one more request under ``window`` so that the limit is never reached.

    Requests still in flight are not counted in ``remaining`` yet. The remaining requests are spread
    evenly over what is left of the window; with none left, wait for the window to reset.
    """
    left = window.reset_at - now
    if left <= 0:
        return 0.0
    available = window.remaining - in_flight
    if available <= 0:
        return left
    return 0.0 if available > left * PACING_HEADROOM else left / available


def _header(headers: Mapping[str, str], lower_name: str) -> str | None:
    value = headers.get(lower_name)
    if value is not None:
        return value
    # Plain dicts are case-sensitive; httpx.Headers answers the lookup above already.
    for name, candidate in headers.items():
        if name.lower() == lower_name:
            return candidate
    return None


def _seconds(value: str) -> float | None:
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


def _rate_limit_reset(value: str | None, now: float) -> float | None:
    if value is None:
        return None
    seconds = _seconds(value)
    if seconds is None:
        return None
    return now + seconds if seconds < _DELTA_SECONDS_BELOW else seconds + RESET_ROUNDING


def _retry_after(value: str | None, now: float) -> float | None:
    if value is None:
        return None
    seconds = _seconds(value)
    if seconds is not None:
        return now + seconds
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        # RFC 9110 dates are always GMT; a "-0000" zone comes back naive.
        when = when.replace(tzinfo=UTC)
    try:
        return when.timestamp()
    except (OverflowError, OSError, ValueError):
        return None


def pacing_interval(rate: float) -> float:
    """Seconds between the starts of two requests to one host at ``rate`` per second (0 when unlimited).

    A hair over ``1 / rate``, so that float rounding can never fit ``rate + 1`` spaced starts into one
    second.
    """
    return 0.0 if rate <= 0 else (1.0 / rate) * (1.0 + 1e-9)
