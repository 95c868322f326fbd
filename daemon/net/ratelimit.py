"""Rate-limit policy: when a rate-limited host may be asked again, and how far apart requests start.

Pure: no I/O, no trio. Every function takes the current time as an argument, so callers decide which clock
(unix wall time for pauses that are reported to operators, trio's clock for pacing).
"""

from __future__ import annotations

import email.utils
import math
from collections.abc import Mapping
from datetime import UTC

# A RateLimit-Reset value below this is a number of seconds from now rather than a unix time: 1e9 seconds
# after the epoch is September 2001, long before any AT Protocol server existed, while no server asks for a
# pause of 31 years.
_DELTA_SECONDS_BELOW = 1e9


def rate_limit_resume_at(
    headers: Mapping[str, str],
    *,
    now: float,
    default_pause: float,
    cap: float = 900.0,
) -> float:
    """Return the unix time at which a host that answered HTTP 429 may be asked again.

    Looks, case-insensitively, at:

    1. ``RateLimit-Reset``: the reference PDS sends the unix time (seconds) at which its window resets.
       The IETF ``RateLimit`` draft sends a number of seconds from now instead; a value below 1e9 is read
       that way.
    2. ``Retry-After`` (RFC 9110): a number of seconds from now, or an HTTP date.

    The first header that parses wins; a missing or unparsable one (garbage, negative, NaN) is skipped, and
    with neither usable the host pauses for ``default_pause`` seconds. The answer is clamped to
    ``[now, now + cap]`` so that a hostile server can neither make the daemon hammer it nor park a host
    forever. The body of the 429 is not consulted: JSON and HTML (proxy) 429s are treated alike (SPEC 6.1).
    """
    resume_at = _rate_limit_reset(_header(headers, "ratelimit-reset"), now)
    if resume_at is None:
        resume_at = _retry_after(_header(headers, "retry-after"), now)
    if resume_at is None:
        resume_at = now + default_pause
    return min(max(resume_at, now), now + cap)


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
    return now + seconds if seconds < _DELTA_SECONDS_BELOW else seconds


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
