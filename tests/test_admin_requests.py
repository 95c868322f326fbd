"""daemon.admin.requests: admin request bodies and query strings (SPEC 5)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

import pytest

from daemon.admin import requests as admin_requests
from daemon.admin.requests import (
    BackfillRequest,
    JobsQuery,
    PageQuery,
    PublishersQuery,
    RetryRequest,
    parse_ack_request,
    parse_backfill_request,
    parse_jobs_query,
    parse_page_query,
    parse_publishers_query,
    parse_retry_request,
)
from daemon.errors import RequestValidationError

COLLECTIONS = ("com.example.a.profile", "com.example.a.release", "com.example.b.profile")
D1 = "did:plc:7iza6de2dwap2sbkpav7c6c6"
D2 = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"
D3 = "did:web:example.com"
BIG = 2**63


def backfill(raw: bytes | str, cap: int = 100) -> BackfillRequest:
    data = raw.encode() if isinstance(raw, str) else raw
    return parse_backfill_request(data, configured_collections=COLLECTIONS, max_backfill_dids=cap)


def backfill_error(raw: bytes | str, cap: int = 100) -> str:
    with pytest.raises(RequestValidationError) as info:
        backfill(raw, cap)
    assert info.value.code == "InvalidRequest"
    return info.value.message


# -- POST /_admin/backfill ------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"", b" ", b"\n\t\r\n ", b"{}", b" {} \n"])
def test_empty_body_or_empty_object_is_discover(raw: bytes) -> None:
    assert backfill(raw) == BackfillRequest("discover", (), COLLECTIONS)


def test_explicit_dids() -> None:
    assert backfill(json.dumps({"dids": [D1, D2, D3]})) == BackfillRequest(
        "explicit", (D1, D2, D3), COLLECTIONS
    )


def test_dids_are_deduplicated_first_seen_wins() -> None:
    assert backfill(json.dumps({"dids": [D2, D1, D2, D3, D1]})).dids == (D2, D1, D3)


@pytest.mark.parametrize(
    "raw",
    [b"{", b"nope", b"{'dids': []}", b"\xff\xfe{}", b"\xef\xbb\xbf{}", b"[" * 100_000, b"NaN", b"{} {}"],
)
def test_invalid_json(raw: bytes) -> None:
    assert backfill_error(raw) == "request body must be valid JSON"


@pytest.mark.parametrize("raw", ['{"dids": [NaN]}', '{"dids": Infinity}', '{"dids": [-Infinity]}'])
def test_non_standard_constants_are_invalid_json(raw: str) -> None:
    assert backfill_error(raw) == "request body must be valid JSON"


@pytest.mark.parametrize("raw", ["[]", "null", "1", '"dids"', "true", f'["{D1}"]'])
def test_body_must_be_an_object(raw: str) -> None:
    assert backfill_error(raw) == "request body must be a JSON object"


@pytest.mark.parametrize("dids", [None, "did:plc:x", 5, {}, {"0": D1}, True])
def test_dids_must_be_an_array(dids: object) -> None:
    assert backfill_error(json.dumps({"dids": dids})) == (
        "`dids` must be an array of DID strings, or omitted to discover via the relay"
    )


def test_dids_must_not_be_empty() -> None:
    assert (
        backfill_error('{"dids": []}')
        == "`dids` must not be empty (omit the field to discover via the relay)"
    )


def test_dids_cap_is_checked_before_deduplication() -> None:
    assert backfill(json.dumps({"dids": [D1] * 3}), cap=3).dids == (D1,)
    assert (
        backfill_error(json.dumps({"dids": [D1] * 4}), cap=3)
        == "`dids` must contain at most 3 entries (got 4)"
    )
    assert (
        backfill_error(json.dumps({"dids": [D1] * 101}))
        == "`dids` must contain at most 100 entries (got 101)"
    )


@pytest.mark.parametrize(
    "value",
    [
        5,
        None,
        True,
        1.5,
        [D1],
        {"did": D1},
        "",
        "did:plc:",
        "alice.example.com",
        "did:plc:abc ",
        "DID:plc:x",
        "é",
    ],
)
def test_invalid_did_in_list(value: object) -> None:
    # the value as JavaScript's JSON.stringify writes it: compact, non-ASCII kept
    shown = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    assert backfill_error(json.dumps({"dids": [D1, value]})) == f"invalid DID in list: {shown}"


def test_invalid_did_is_shown_like_json_stringify() -> None:
    assert backfill_error('{"dids": [{"a": [1, 2]}]}') == 'invalid DID in list: {"a":[1,2]}'
    assert backfill_error('{"dids": ["did:plc:\u00e9"]}') == 'invalid DID in list: "did:plc:é"'


def test_first_invalid_did_is_named() -> None:
    assert backfill_error(json.dumps({"dids": [D1, "bad1", "bad2"]})) == 'invalid DID in list: "bad1"'


def test_collections_restrict_either_mode_in_the_configured_order() -> None:
    only = [COLLECTIONS[2], COLLECTIONS[0]]
    in_order = (COLLECTIONS[0], COLLECTIONS[2])
    assert backfill(json.dumps({"collections": only})) == BackfillRequest("discover", (), in_order)
    assert backfill(json.dumps({"dids": [D1], "collections": only})) == BackfillRequest(
        "explicit", (D1,), in_order
    )


def test_collections_are_deduplicated() -> None:
    raw = json.dumps({"collections": [COLLECTIONS[1], COLLECTIONS[0], COLLECTIONS[1]]})
    assert backfill(raw).collections == (COLLECTIONS[0], COLLECTIONS[1])


def test_full_is_a_boolean() -> None:
    assert backfill(json.dumps({"full": True})).full is True
    assert backfill(json.dumps({"dids": [D1], "full": False})).full is False
    assert backfill_error(json.dumps({"full": 1})) == "`full` must be true or false"


@pytest.mark.parametrize("value", [None, [], "com.example.a.profile", {}, 5, [5], [None], [["x"]]])
def test_collections_must_be_a_non_empty_array_of_strings(value: object) -> None:
    assert backfill_error(json.dumps({"collections": value})) == (
        "`collections` must be a non-empty array of configured collection NSIDs"
    )


@pytest.mark.parametrize("value", ["com.example.other.thing", "", "not an nsid", "COM.EXAMPLE.A.PROFILE"])
def test_collection_not_configured(value: str) -> None:
    raw = json.dumps({"collections": [COLLECTIONS[0], value]})
    assert backfill_error(raw) == f"collection not configured: {json.dumps(value)}"


def test_dids_are_checked_before_collections() -> None:
    assert backfill_error(json.dumps({"dids": [], "collections": []})).startswith("`dids` must not be empty")


@pytest.mark.parametrize("key", ["did", "DIDS", "mode", ""])
def test_unknown_field_is_rejected(key: str) -> None:
    assert backfill_error(json.dumps({key: [D1]})) == f"unknown field: {json.dumps(key)}"


def test_deeply_nested_did_value_does_not_crash() -> None:
    raw = '{"dids": [' + "[" * 5000 + "]" * 5000 + "]}"
    message = backfill_error(raw)
    assert message.startswith("invalid DID in list: ") or message == "request body must be valid JSON"


# -- POST /_admin/jobs/retry -------------------------------------------------------------------------------


def retry_error(raw: str | bytes) -> str:
    with pytest.raises(RequestValidationError) as info:
        parse_retry_request(raw.encode() if isinstance(raw, str) else raw)
    return info.value.message


def test_retry_ids() -> None:
    assert parse_retry_request(b'{"ids": [3, 1, 3, 2]}') == RetryRequest((3, 1, 2), None, None)
    assert parse_retry_request(json.dumps({"ids": list(range(1, 1001))}).encode()).ids == tuple(
        range(1, 1001)
    )


def test_retry_state() -> None:
    assert parse_retry_request(b'{"state": "failed"}') == RetryRequest(None, "failed", None)
    assert parse_retry_request(b'{"state": "failed", "run_id": 7}') == RetryRequest(None, "failed", 7)
    assert parse_retry_request(b'{"state": "cancelled"}') == RetryRequest(None, "cancelled", None)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "request body must be valid JSON"),
        (b"{", "request body must be valid JSON"),
        (b"[]", "request body must be a JSON object"),
        (b"{}", 'request body must give `ids`, or `state` ("failed" or "cancelled")'),
        (b'{"run_id": 1}', 'request body must give `ids`, or `state` ("failed" or "cancelled")'),
        (
            b'{"ids": [1], "state": "failed"}',
            "give either `ids`, or `state` (with an optional `run_id`), not both",
        ),
        (b'{"ids": [1], "run_id": 1}', "give either `ids`, or `state` (with an optional `run_id`), not both"),
        (b'{"ids": []}', "`ids` must be an array of 1 to 1000 job ids"),
        (b'{"ids": null}', "`ids` must be an array of 1 to 1000 job ids"),
        (b'{"ids": 5}', "`ids` must be an array of 1 to 1000 job ids"),
        (json.dumps({"ids": list(range(1, 1002))}).encode(), "`ids` must be an array of 1 to 1000 job ids"),
        (b'{"ids": [1, 0]}', "invalid job id: 0"),
        (b'{"ids": [-1]}', "invalid job id: -1"),
        (b'{"ids": [true]}', "invalid job id: true"),
        (b'{"ids": [1.0]}', "invalid job id: 1.0"),
        (b'{"ids": ["1"]}', 'invalid job id: "1"'),
        (f'{{"ids": [{BIG}]}}'.encode(), f"invalid job id: {BIG}"),
        (b'{"state": "pending"}', '`state` must be "failed" or "cancelled"'),
        (b'{"state": "running"}', '`state` must be "failed" or "cancelled"'),
        (b'{"state": null}', '`state` must be "failed" or "cancelled"'),
        (b'{"state": ["failed"]}', '`state` must be "failed" or "cancelled"'),
        (b'{"state": "failed", "run_id": 0}', "`run_id` must be a positive integer"),
        (b'{"state": "failed", "run_id": null}', "`run_id` must be a positive integer"),
        (b'{"state": "failed", "run_id": "1"}', "`run_id` must be a positive integer"),
        (b'{"state": "failed", "run_id": false}', "`run_id` must be a positive integer"),
        (f'{{"state": "failed", "run_id": {BIG}}}'.encode(), "`run_id` must be a positive integer"),
        (b'{"state": "failed", "extra": 1}', 'unknown field: "extra"'),
    ],
)
def test_retry_rejects(raw: bytes, message: str) -> None:
    assert retry_error(raw) == message


# -- POST /_admin/records/ack -----------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "through"), [(b'{"through": 0}', 0), (b'{"through": 42}', 42)])
def test_ack(raw: bytes, through: int) -> None:
    assert parse_ack_request(raw) == through


def test_ack_max_int64() -> None:
    assert parse_ack_request(f'{{"through": {BIG - 1}}}'.encode()) == BIG - 1


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "request body must be valid JSON"),
        (b"\x80", "request body must be valid JSON"),
        (b"1", "request body must be a JSON object"),
        (b"{}", "`through` must be a non-negative integer"),
        (b'{"through": -1}', "`through` must be a non-negative integer"),
        (b'{"through": true}', "`through` must be a non-negative integer"),
        (b'{"through": false}', "`through` must be a non-negative integer"),
        (b'{"through": 1.5}', "`through` must be a non-negative integer"),
        (b'{"through": 1e3}', "`through` must be a non-negative integer"),
        (b'{"through": "5"}', "`through` must be a non-negative integer"),
        (b'{"through": null}', "`through` must be a non-negative integer"),
        (f'{{"through": {BIG}}}'.encode(), "`through` must be a non-negative integer"),
        (b'{"through": 1' + b"0" * 5000 + b"}", "request body must be valid JSON"),
        (b'{"through": 1, "all": true}', 'unknown field: "all"'),
    ],
)
def test_ack_rejects(raw: bytes, message: str) -> None:
    with pytest.raises(RequestValidationError) as info:
        parse_ack_request(raw)
    assert info.value.message == message


# -- query strings ------------------------------------------------------------------------------------------


def query_error(parser: Callable[[Mapping[str, str]], object], args: dict[str, str]) -> str:
    with pytest.raises(RequestValidationError) as info:
        parser(args)
    return info.value.message


def test_page_query_defaults_and_values() -> None:
    assert parse_page_query({}) == PageQuery(0, 100)
    assert parse_page_query({"after": "", "limit": ""}) == PageQuery(0, 100)
    assert parse_page_query({"after": "17", "limit": "1000"}) == PageQuery(17, 1000)
    assert parse_page_query({"limit": "1", "after": "0"}) == PageQuery(0, 1)
    after, limit = parse_page_query({"after": "5", "limit": "7"})
    assert (after, limit) == (5, 7)


@pytest.mark.parametrize(
    "limit", ["0", "1001", "-1", "+5", " 5", "5 ", "1_0", "1.0", "ten", "٣", "99999999999999999999"]
)
def test_bad_limit(limit: str) -> None:
    assert query_error(parse_page_query, {"limit": limit}) == "`limit` must be an integer from 1 to 1000"


@pytest.mark.parametrize("after", ["-1", "x", "1e3", str(BIG), "9" * 20, "0x10"])
def test_bad_after(after: str) -> None:
    assert query_error(parse_page_query, {"after": after}) == "`after` must be a non-negative integer"


def test_page_query_rejects_unknown_and_filter_params() -> None:
    assert query_error(parse_page_query, {"offset": "1"}) == 'unknown query parameter: "offset"'
    assert query_error(parse_page_query, {"state": "failed"}) == 'unknown query parameter: "state"'


def test_jobs_query() -> None:
    assert parse_jobs_query({}) == JobsQuery(None, None, 0, 100)
    assert parse_jobs_query({"state": "", "run_id": "", "after": "", "limit": ""}) == JobsQuery(
        None, None, 0, 100
    )
    assert parse_jobs_query({"state": "failed", "run_id": "3", "after": "9", "limit": "50"}) == JobsQuery(
        "failed", 3, 9, 50
    )
    for state in ("pending", "running", "done", "failed", "cancelled"):
        assert parse_jobs_query({"state": state}).state == state


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"state": "FAILED"}, "`state` must be one of pending, running, done, failed, cancelled"),
        ({"state": "dead"}, "`state` must be one of pending, running, done, failed, cancelled"),
        ({"run_id": "0"}, "`run_id` must be a positive integer"),
        ({"run_id": "-2"}, "`run_id` must be a positive integer"),
        ({"run_id": "x"}, "`run_id` must be a positive integer"),
        ({"run_id": str(BIG)}, "`run_id` must be a positive integer"),
        ({"limit": "0"}, "`limit` must be an integer from 1 to 1000"),
        ({"after": "-1"}, "`after` must be a non-negative integer"),
        ({"kind": "discover"}, 'unknown query parameter: "kind"'),
    ],
)
def test_jobs_query_rejects(args: dict[str, str], message: str) -> None:
    assert query_error(parse_jobs_query, args) == message


def test_publishers_query() -> None:
    assert parse_publishers_query({}) == PublishersQuery("", 100)
    assert parse_publishers_query({"after": D1, "limit": "5"}) == PublishersQuery(D1, 5)
    after, limit = parse_publishers_query({"after": "", "limit": ""})
    assert (after, limit) == ("", 100)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"after": "5"}, "`after` must be a DID (the cursor of the previous page)"),
        ({"after": "did:plc:"}, "`after` must be a DID (the cursor of the previous page)"),
        ({"limit": "1001"}, "`limit` must be an integer from 1 to 1000"),
        ({"state": "failed"}, 'unknown query parameter: "state"'),
    ],
)
def test_publishers_query_rejects(args: dict[str, str], message: str) -> None:
    assert query_error(parse_publishers_query, args) == message


def test_value_too_deep_to_show_does_not_escape_as_recursion_error() -> None:
    # json.loads and json.dumps share the interpreter's recursion budget, and the dump runs a few frames
    # deeper than the load did, so a value that only just parsed may fail to print.
    nested: list[object] = []
    for _ in range(100_000):
        nested = [nested]
    assert admin_requests._json(nested) == "<value nested too deeply to show>"
