"""daemon.net.ratelimit: when a 429'd host may be asked again, and pacing under announced windows (SPEC 6.1)."""

from __future__ import annotations

import email.utils

import httpx
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from daemon.net.ratelimit import (
    MIN_PAUSE,
    PACING_HEADROOM,
    RESET_ROUNDING,
    RateLimitWindow,
    pacing_interval,
    rate_limit_resume_at,
    rate_limit_window,
    window_delay,
)

NOW = 1_700_000_000.0


def resume(headers: dict[str, str] | httpx.Headers, default: float = 60.0, cap: float = 900.0) -> float:
    return rate_limit_resume_at(headers, now=NOW, default_pause=default, cap=cap)


def test_ratelimit_reset_unix_seconds_get_one_second_for_the_rounding_down() -> None:
    # The reference PDS sends the window's reset as a unix time rounded down: it may be a second later.
    assert RESET_ROUNDING == 1.0
    assert resume({"RateLimit-Reset": str(int(NOW) + 42)}) == NOW + 43


def test_ratelimit_reset_delta_seconds() -> None:
    assert resume({"ratelimit-reset": "30"}) == NOW + 30


def test_header_lookup_is_case_insensitive_for_plain_dicts_and_httpx_headers() -> None:
    assert resume({"RATELIMIT-RESET": "30"}) == NOW + 30
    assert resume(httpx.Headers({"Retry-After": "15"})) == NOW + 15


def test_retry_after_seconds() -> None:
    assert resume({"Retry-After": "120"}) == NOW + 120


def test_retry_after_http_date() -> None:
    date = email.utils.formatdate(NOW + 300, usegmt=True)
    assert resume({"Retry-After": date}) == NOW + 300


def test_retry_after_date_with_unknown_zone_is_gmt() -> None:
    date = email.utils.formatdate(NOW + 300, usegmt=True).replace("GMT", "-0000")
    assert resume({"Retry-After": date}) == NOW + 300


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        # the later of the two, whichever header names it
        ({"RateLimit-Reset": str(int(NOW) + 10), "Retry-After": "500"}, NOW + 500),
        ({"RateLimit-Reset": str(int(NOW) + 500), "Retry-After": "10"}, NOW + 501),
        ({"RateLimit-Reset": str(int(NOW) + 10), "Retry-After": "11"}, NOW + 11),
        # equal: the +1 s of the rounded-down reset makes RateLimit-Reset the later one
        ({"RateLimit-Reset": str(int(NOW) + 10), "Retry-After": "10"}, NOW + 11),
        ({"RateLimit-Reset": "30", "Retry-After": "20"}, NOW + 30),  # delta form: no rounding
        ({"RateLimit-Reset": "20", "Retry-After": "30"}, NOW + 30),
        (
            {
                "RateLimit-Reset": str(int(NOW) + 60),
                "Retry-After": email.utils.formatdate(NOW + 120, usegmt=True),
            },
            NOW + 120,
        ),
        (
            {
                "RateLimit-Reset": str(int(NOW) + 120),
                "Retry-After": email.utils.formatdate(NOW + 60, usegmt=True),
            },
            NOW + 121,
        ),
        # one usable, one garbage: the usable one
        ({"RateLimit-Reset": "soon", "Retry-After": "20"}, NOW + 20),
        ({"RateLimit-Reset": str(int(NOW) + 20), "Retry-After": "later"}, NOW + 21),
        # a past reset does not shorten a Retry-After, nor the other way round
        ({"RateLimit-Reset": str(int(NOW) - 100), "Retry-After": "5"}, NOW + 5),
        ({"RateLimit-Reset": str(int(NOW) + 5), "Retry-After": "0"}, NOW + 6),
    ],
)
def test_the_later_of_ratelimit_reset_and_retry_after(headers: dict[str, str], expected: float) -> None:
    assert resume(headers) == expected


@pytest.mark.parametrize(
    "headers",
    [
        {"RateLimit-Reset": str(int(NOW) - 1)},  # the reset just passed: +1 s lands on NOW
        {"RateLimit-Reset": str(int(NOW) - 100)},
        {"RateLimit-Reset": "0"},
        {"RateLimit-Reset": "0.25"},
        {"Retry-After": "0"},
        {"Retry-After": "0.5"},
        {"Retry-After": email.utils.formatdate(NOW - 100, usegmt=True)},
        {"Retry-After": email.utils.formatdate(NOW, usegmt=True)},
        {"RateLimit-Reset": "0", "Retry-After": "0"},
    ],
)
def test_a_pause_lasts_at_least_one_second(headers: dict[str, str]) -> None:
    assert MIN_PAUSE == 1.0
    assert resume(headers) == NOW + 1


def test_the_minimum_applies_to_the_default_pause_too() -> None:
    assert resume({}, default=0.0) == NOW + 1
    assert resume({}, default=0.2) == NOW + 1
    assert resume({}, default=3.0) == NOW + 3


def test_garbage_ratelimit_reset_falls_through_to_retry_after() -> None:
    assert resume({"RateLimit-Reset": "soon", "Retry-After": "20"}) == NOW + 20


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"RateLimit-Reset": "soon"},
        {"RateLimit-Reset": "nan"},
        {"RateLimit-Reset": "inf"},
        {"RateLimit-Reset": "-5"},
        {"Retry-After": "tomorrow"},
        {"Retry-After": ""},
        {"Retry-After": "Mon, 99 Foo 2024 99:99:99 GMT"},
        {"Retry-After": "-1"},
    ],
)
def test_missing_or_garbage_headers_use_the_default_pause(headers: dict[str, str]) -> None:
    assert resume(headers, default=60.0) == NOW + 60


def test_result_is_capped() -> None:
    assert resume({"Retry-After": "999999"}) == NOW + 900
    assert resume({"RateLimit-Reset": str(int(NOW) + 86400)}, cap=600) == NOW + 600
    assert resume({}, default=5000) == NOW + 900


def test_a_reset_in_the_past_means_the_minimum_pause() -> None:
    assert resume({"RateLimit-Reset": str(int(NOW) - 100)}) == NOW + MIN_PAUSE
    assert resume({"Retry-After": email.utils.formatdate(NOW - 100, usegmt=True)}) == NOW + MIN_PAUSE


@given(st.dictionaries(st.sampled_from(["RateLimit-Reset", "Retry-After", "X"]), st.text(max_size=40)))
def test_always_within_bounds(headers: dict[str, str]) -> None:
    assert NOW + MIN_PAUSE <= resume(headers) <= NOW + 900


@given(
    reset=st.integers(-10, 2000),
    retry_after=st.integers(0, 2000),
)
def test_never_earlier_than_either_header_says(reset: int, retry_after: int) -> None:
    headers = {"RateLimit-Reset": str(int(NOW) + reset), "Retry-After": str(retry_after)}
    resume_at = resume(headers)
    assert resume_at == min(max(NOW + reset + 1, NOW + retry_after, NOW + 1), NOW + 900)


def test_pacing_interval() -> None:
    assert pacing_interval(0.0) == 0.0
    assert pacing_interval(-1.0) == 0.0
    assert pacing_interval(4.0) >= 0.25
    # ten intervals added up never fall short of one second, so 11 starts never fit in a second
    total = 0.0
    for _ in range(10):
        total += pacing_interval(10.0)
    assert total >= 1.0


# --- windows: RateLimit-* of ordinary responses -------------------------------------------------------------


def window(headers: dict[str, str] | httpx.Headers) -> RateLimitWindow | None:
    return rate_limit_window(headers, now=NOW)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        # the reference PDS: a unix reset (rounded down, so +1 s) and the policy naming the limit
        (
            {
                "RateLimit-Limit": "3000",
                "RateLimit-Remaining": "2999",
                "RateLimit-Reset": str(int(NOW) + 300),
                "RateLimit-Policy": "3000;w=300",
            },
            RateLimitWindow("3000;w=300", 2999, NOW + 301),
        ),
        (
            {
                "ratelimit-limit": "6000",
                "ratelimit-remaining": "10",
                "ratelimit-reset": str(int(NOW) + 30),
                "ratelimit-policy": "6000;w=300",
            },
            RateLimitWindow("6000;w=300", 10, NOW + 31),
        ),
        # no policy: RateLimit-Limit names it; neither: the nameless limit
        (
            {"RateLimit-Limit": "100", "RateLimit-Remaining": "5", "RateLimit-Reset": "60"},
            RateLimitWindow("100", 5, NOW + 60),
        ),
        ({"RateLimit-Remaining": "0", "RateLimit-Reset": "60"}, RateLimitWindow("", 0, NOW + 60)),
        ({"RateLimit-Remaining": " 7 ", "RateLimit-Reset": " 9 "}, RateLimitWindow("", 7, NOW + 9)),
        ({"RateLimit-Remaining": "2.9", "RateLimit-Reset": "9"}, RateLimitWindow("", 2, NOW + 9)),
    ],
)
def test_rate_limit_window_reads_the_headers(headers: dict[str, str], expected: RateLimitWindow) -> None:
    assert window(headers) == expected
    assert window(httpx.Headers(headers)) == expected


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"RateLimit-Remaining": "5"},
        {"RateLimit-Reset": str(int(NOW) + 10)},
        {"RateLimit-Remaining": "many", "RateLimit-Reset": "10"},
        {"RateLimit-Remaining": "-1", "RateLimit-Reset": "10"},
        {"RateLimit-Remaining": "nan", "RateLimit-Reset": "10"},
        {"RateLimit-Remaining": "5", "RateLimit-Reset": "soon"},
        {"RateLimit-Remaining": "5", "RateLimit-Reset": "-3"},
        {"RateLimit-Remaining": "5", "RateLimit-Reset": "inf"},
        {"Retry-After": "10", "RateLimit-Limit": "100"},
    ],
)
def test_no_usable_window(headers: dict[str, str]) -> None:
    assert window(headers) is None


def test_a_hostile_policy_name_is_kept_short() -> None:
    found = window({"RateLimit-Remaining": "1", "RateLimit-Reset": "1", "RateLimit-Policy": "p" * 10_000})
    assert found is not None and len(found.policy) == 100


def w(remaining: int, reset_in: float) -> RateLimitWindow:
    return RateLimitWindow("3000;w=300", remaining, NOW + reset_in)


@pytest.mark.parametrize(
    ("window_", "in_flight", "expected"),
    [
        # plenty left: no pacing at all (more than PACING_HEADROOM requests per second of window left)
        (w(3000, 10), 0, 0.0),
        (w(2999, 59), 0, 0.0),
        # the remaining requests spread evenly over what is left of the window
        (w(100, 50), 0, 0.5),
        (w(10, 5), 0, 0.5),
        (w(1, 8), 0, 8.0),
        (w(300, 300), 0, 1.0),
        # requests in flight are not in ``remaining`` yet: they count as spent
        (w(10, 5), 5, 1.0),
        (w(10, 5), 9, 5.0),
        # nothing left (or all of it in flight): wait for the reset
        (w(0, 30), 0, 30.0),
        (w(3, 30), 3, 30.0),
        (w(3, 30), 7, 30.0),
        # the window is over: no wait, whatever it said
        (w(0, 0), 0, 0.0),
        (w(0, -5), 0, 0.0),
        (w(5, -5), 9, 0.0),
    ],
)
def test_window_delay(window_: RateLimitWindow, in_flight: int, expected: float) -> None:
    assert window_delay(window_, now=NOW, in_flight=in_flight) == pytest.approx(expected)


def test_the_headroom_boundary() -> None:
    # exactly PACING_HEADROOM per second left is paced; one more is not
    at = int(PACING_HEADROOM * 10)
    assert window_delay(w(at, 10), now=NOW, in_flight=0) == pytest.approx(10 / at)
    assert window_delay(w(at + 1, 10), now=NOW, in_flight=0) == 0.0


@given(remaining=st.integers(0, 3000), reset_in=st.floats(1.0, 900.0))
def test_paced_requests_never_reach_the_limit_before_the_reset(remaining: int, reset_in: float) -> None:
    """Spaced by window_delay (each response reporting one fewer left), the requests that start before the
    window resets never exceed what it said was left."""
    assume(remaining <= reset_in * PACING_HEADROOM)  # a window that is paced at all
    now, reset_at, started = NOW, NOW + reset_in, 0
    while True:
        now += window_delay(RateLimitWindow("p", remaining - started, reset_at), now=now, in_flight=0)
        if now >= reset_at:
            break
        started += 1
        assert started <= remaining
