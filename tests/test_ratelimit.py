from __future__ import annotations

import email.utils

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.net.ratelimit import pacing_interval, rate_limit_resume_at

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


def test_pacing_interval() -> None:
    assert pacing_interval(0.0) == 0.0
    assert pacing_interval(-1.0) == 0.0
    assert pacing_interval(4.0) >= 0.25
    # ten intervals added up never fall short of one second, so 11 starts never fit in a second
    total = 0.0
    for _ in range(10):
        total += pacing_interval(10.0)
    assert total >= 1.0
