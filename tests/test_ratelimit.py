from __future__ import annotations

import email.utils

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.ratelimit import TokenBucket, rate_limit_resume_at

NOW = 1_700_000_000.0


def resume(headers: dict[str, str] | httpx.Headers, default: float = 60.0, cap: float = 900.0) -> float:
    return rate_limit_resume_at(headers, now=NOW, default_pause=default, cap=cap)


def test_ratelimit_reset_unix_seconds() -> None:
    assert resume({"RateLimit-Reset": str(int(NOW) + 42)}) == NOW + 42


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


def test_ratelimit_reset_wins_over_retry_after() -> None:
    assert resume({"RateLimit-Reset": str(int(NOW) + 10), "Retry-After": "500"}) == NOW + 10


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


def test_a_reset_in_the_past_means_now() -> None:
    assert resume({"RateLimit-Reset": str(int(NOW) - 100)}) == NOW
    assert resume({"Retry-After": email.utils.formatdate(NOW - 100, usegmt=True)}) == NOW


@given(st.dictionaries(st.sampled_from(["RateLimit-Reset", "Retry-After", "X"]), st.text(max_size=40)))
def test_always_within_bounds(headers: dict[str, str]) -> None:
    assert NOW <= resume(headers) <= NOW + 900


def test_bucket_allows_a_burst_then_paces() -> None:
    bucket = TokenBucket(rate=2.0, burst=3)
    assert [bucket.reserve(10.0) for _ in range(5)] == [0.0, 0.0, 0.0, 0.5, 1.0]


def test_bucket_refills_with_time_up_to_the_burst() -> None:
    bucket = TokenBucket(rate=1.0, burst=2)
    assert bucket.reserve(0.0) == 0.0
    assert bucket.reserve(0.0) == 0.0
    assert bucket.reserve(0.0) == 1.0
    assert not bucket.is_full(0.0)
    assert bucket.is_full(100.0)
    assert [bucket.reserve(100.0) for _ in range(3)] == [0.0, 0.0, 1.0]


def test_bucket_debt_is_repaid_before_new_tokens() -> None:
    bucket = TokenBucket(rate=4.0, burst=1)
    assert bucket.reserve(0.0) == 0.0
    assert bucket.reserve(0.0) == 0.25
    assert bucket.reserve(0.0) == 0.5
    # At 0.5 s the two reservations in debt are used up; the next token comes 0.25 s later.
    assert bucket.reserve(0.5) == 0.25


def test_zero_rate_is_unlimited() -> None:
    bucket = TokenBucket(rate=0.0, burst=1)
    assert all(bucket.reserve(0.0) == 0.0 for _ in range(100))
    assert bucket.is_full(0.0)


def test_burst_below_one_is_one() -> None:
    bucket = TokenBucket(rate=1.0, burst=0)
    assert bucket.reserve(0.0) == 0.0
    assert bucket.reserve(0.0) == 1.0


@given(
    rate=st.floats(min_value=0.1, max_value=100),
    burst=st.integers(min_value=1, max_value=10),
    gaps=st.lists(st.floats(min_value=0, max_value=2), min_size=1, max_size=60),
)
def test_bucket_never_grants_more_than_rate_times_span_plus_burst(
    rate: float, burst: int, gaps: list[float]
) -> None:
    bucket = TokenBucket(rate=rate, burst=burst)
    now = 0.0
    granted: list[float] = []
    for gap in gaps:
        now += gap
        granted.append(now + bucket.reserve(now))
    granted.sort()
    for i, start in enumerate(granted):
        within = [t for t in granted[i:] if t < start + 1.0]
        assert len(within) <= rate * 1.0 + burst + 1e-6
