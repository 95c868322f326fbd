"""Property tests: the pure parsers never raise anything but BackfillError, and valid input round-trips."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.admin.requests import (
    BackfillRequest,
    PageQuery,
    RetryRequest,
    parse_ack_request,
    parse_backfill_request,
    parse_jobs_query,
    parse_page_query,
    parse_publishers_query,
    parse_retry_request,
)
from daemon.atproto.diddoc import did_document_url, parse_did_document
from daemon.atproto.keys import K256, P256, PrivateKey
from daemon.atproto.pages import RecordRef, parse_list_records_page, parse_list_repos_page
from daemon.atproto.syntax import (
    is_valid_at_uri,
    is_valid_cid,
    is_valid_did,
    is_valid_handle,
    is_valid_nsid,
    is_valid_record_key,
    is_valid_tid,
    parse_record_uri,
)
from daemon.errors import BackfillError, SyntaxValidationError

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DID = "did:plc:7iza6de2dwap2sbkpav7c6c6"
NSID = "com.emdashcms.experimental.package.release"
COLLECTIONS = (NSID, "com.emdashcms.experimental.package.profile", "com.example.other.thing")

# Decoded JSON as Python's json module produces it (NaN and infinities included: json.loads accepts them).
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=25,
)
# Strict JSON (what a correct server sends): no NaN or infinities.
strict_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=25,
)

# Built from alphabets rather than st.from_regex, which is several times slower to draw from.
_BASE32 = "abcdefghijklmnopqrstuvwxyz234567"
_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
plc_dids = st.text(_BASE32, min_size=24, max_size=24).map(lambda s: f"did:plc:{s}")
generic_dids = st.builds(
    lambda method, ident: f"did:{method}:{ident}",
    st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8),
    st.text(_ALNUM + "._-", min_size=1, max_size=30),
)
record_keys = st.text(_ALNUM + "_~.:-", min_size=1, max_size=40).filter(lambda k: k not in (".", ".."))
cids = st.text(_BASE32, min_size=58, max_size=58).map(lambda s: f"b{s}")
signing_keys = st.text(_BASE58, min_size=10, max_size=60).map(lambda s: f"z{s}")
# Real keys on both curves (a DID document's key is validated and normalised to its Multikey form).
VALID_KEYS = tuple(
    PrivateKey.from_bytes(curve, bytes([n + 1]) * 32).public_key.multikey()
    for curve in (K256, P256)
    for n in range(4)
)
valid_signing_keys = st.sampled_from(VALID_KEYS)
labels = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from("abcdefghijklmnopqrstuvwxyz"),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789", max_size=10),
)
hostnames = st.lists(labels, min_size=2, max_size=4).map(".".join)
cursors = st.none() | st.text(max_size=30)

# Strings that look almost right, so that the validators' edges are reached more often than by plain text.
uri_like = st.builds(
    lambda did, nsid, rkey, tail: f"at://{did}/{nsid}/{rkey}{tail}",
    st.sampled_from([DID, "did:plc:other", "alice.example.com", "did:web:example.com", ""]),
    st.sampled_from([NSID, "com.example.other.thing", "a.b", ""]),
    record_keys | st.text(max_size=10),
    st.sampled_from(["", "/", "/x", "?q=1", "#/f", " ", "\n"]),
)


def mutated(base: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A value drawn from ``base`` with one node replaced, deleted, or added somewhere inside."""

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        value = draw(base)
        return _mutate(draw, value)

    return build()


def _mutate(draw: st.DrawFn, value: Any) -> Any:
    if isinstance(value, dict) and value and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(value)))
        action = draw(st.sampled_from(["descend", "replace", "delete"]))
        changed = dict(value)
        if action == "delete":
            del changed[key]
        elif action == "replace":
            changed[key] = draw(json_values)
        else:
            changed[key] = _mutate(draw, value[key])
        return changed
    if isinstance(value, list) and value and draw(st.booleans()):
        index = draw(st.integers(0, len(value) - 1))
        items = list(value)
        items[index] = _mutate(draw, value[index]) if draw(st.booleans()) else draw(json_values)
        return items
    if isinstance(value, dict) and draw(st.booleans()):
        return {**value, draw(st.text(max_size=8)): draw(json_values)}
    return draw(json_values | st.sampled_from(["", " ", "\n", "at://", "did:plc:", "Qmb12345678"]))


def to_bytes(value: Any) -> bytes:
    """A decoded value as the raw bytes a server sends (NaN and infinities as Python's json writes them)."""
    return json.dumps(value).encode()


def record_entries(did: str = DID, nsid: str = NSID) -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(
        lambda rkey, cid: {"uri": f"at://{did}/{nsid}/{rkey}", "cid": cid, "value": {"$type": nsid}},
        record_keys,
        cids,
    )


records_pages = st.fixed_dictionaries(
    {
        "records": st.lists(
            record_entries() | st.fixed_dictionaries({"uri": uri_like, "cid": cids}), max_size=8
        )
    },
    optional={"cursor": cursors},
)
repos_pages = st.fixed_dictionaries(
    {"repos": st.lists(st.fixed_dictionaries({"did": generic_dids | st.text(max_size=12)}), max_size=8)},
    optional={"cursor": cursors},
)


def did_documents(did: str) -> st.SearchStrategy[dict[str, Any]]:
    endpoint = st.builds(
        lambda scheme, host, port, path: f"{scheme}://{host}{port}{path}",
        st.sampled_from(["https", "http", "HTTPS", "ftp"]),
        hostnames | st.sampled_from(["[::1]", "127.0.0.1", "", "user@h.com"]),
        st.sampled_from(["", ":443", ":0", ":99999", ":"]),
        st.sampled_from(["", "/", "/base", "?x", "#y", "//"]),
    )
    return st.fixed_dictionaries(
        {
            "id": st.just(did),
            "service": st.lists(
                st.fixed_dictionaries(
                    {
                        "id": st.sampled_from(["#atproto_pds", f"{did}#atproto_pds", "#other"]),
                        "type": st.sampled_from(["AtprotoPersonalDataServer", "Other"]),
                        "serviceEndpoint": endpoint,
                    }
                ),
                max_size=3,
            ),
            "verificationMethod": st.lists(
                st.fixed_dictionaries(
                    {
                        "id": st.sampled_from(["#atproto", f"{did}#atproto", "#x"]),
                        "publicKeyMultibase": signing_keys,
                    }
                ),
                max_size=2,
            ),
        }
    )


# -- never anything but BackfillError --------------------------------------------------------------------


raw_records_pages = (
    st.binary(max_size=64)
    | json_values.map(to_bytes)
    | mutated(records_pages).map(to_bytes)
    # cut short, or with a byte flipped: what a broken proxy or a truncated body looks like
    | st.builds(lambda b, n: b[:n], mutated(records_pages).map(to_bytes), st.integers(0, 200))
    | st.builds(
        lambda b, i, x: b[: i % max(len(b), 1)] + bytes([x]) + b[i % max(len(b), 1) + 1 :],
        records_pages.map(to_bytes),
        st.integers(0, 400),
        st.integers(0, 255),
    )
    | st.integers(1, 3000).map(
        lambda depth: b'{"records":[{"uri":"u","cid":"c","value":' + b"[" * depth + b"]" * depth + b"}]}"
    )
)


@FUZZ
@given(body=raw_records_pages, page_size=st.integers(0, 10))
def test_list_records_page_only_raises_backfill_errors(body: bytes, page_size: int) -> None:
    try:
        page = parse_list_records_page(body, did=DID, collection=NSID, page_size=page_size)
    except BackfillError:
        return
    assert len(page.records) + page.skipped <= page_size
    assert page.cursor is None or (isinstance(page.cursor, str) and page.cursor)
    for ref in page.records:
        assert is_valid_record_key(ref.rkey) and is_valid_cid(ref.cid)


@FUZZ
@given(body=json_values | mutated(repos_pages))
def test_list_repos_page_only_raises_backfill_errors(body: Any) -> None:
    try:
        page = parse_list_repos_page(body)
    except BackfillError:
        return
    assert all(is_valid_did(did) for did in page.dids)


@FUZZ
@given(doc=json_values | mutated(did_documents(DID)), allow_http=st.booleans())
def test_did_document_only_raises_backfill_errors(doc: Any, allow_http: bool) -> None:
    try:
        identity = parse_did_document(DID, doc, allow_http=allow_http)
    except BackfillError:
        return
    assert identity.pds.startswith("https://") or (allow_http and identity.pds.startswith("http://"))
    assert not identity.pds.endswith("/")


@FUZZ
@given(
    did=st.text(max_size=40)
    | generic_dids
    | st.text(_ALNUM + ".%-", max_size=30).map(lambda s: f"did:web:{s}"),
    allow_private=st.booleans(),
)
def test_did_document_url_only_raises_backfill_errors(did: str, allow_private: bool) -> None:
    try:
        url = did_document_url(did, plc_directory="https://plc.directory", allow_private=allow_private)
    except BackfillError:
        return
    assert url.startswith("https://") or (allow_private and url.startswith("http://localhost:"))


bodies = (
    st.binary(max_size=64)
    | json_values.map(lambda v: json.dumps(v).encode())
    | mutated(
        st.fixed_dictionaries(
            {},
            optional={
                "dids": st.lists(generic_dids, max_size=4),
                "collections": st.lists(st.sampled_from(COLLECTIONS), max_size=3),
                "ids": st.lists(st.integers(1, 50), max_size=4),
                "state": st.sampled_from(["failed", "cancelled"]),
                "run_id": st.integers(1, 9),
                "through": st.integers(0, 9),
            },
        )
    ).map(lambda v: json.dumps(v).encode())
)


@FUZZ
@given(raw=bodies, cap=st.integers(1, 5))
def test_admin_bodies_only_raise_backfill_errors(raw: bytes, cap: int) -> None:
    for call in (
        lambda: parse_backfill_request(raw, configured_collections=COLLECTIONS, max_backfill_dids=cap),
        lambda: parse_retry_request(raw),
        lambda: parse_ack_request(raw),
    ):
        with contextlib.suppress(BackfillError):
            call()


@FUZZ
@given(
    args=st.dictionaries(
        st.sampled_from(["after", "limit", "state", "run_id"]) | st.text(max_size=5),
        st.text(max_size=8),
        max_size=4,
    )
)
def test_queries_only_raise_backfill_errors(args: dict[str, str]) -> None:
    for parser in (parse_page_query, parse_jobs_query, parse_publishers_query):
        with contextlib.suppress(BackfillError):
            parser(args)


@FUZZ
@given(value=st.text(max_size=60) | uri_like)
def test_syntax_validators_are_total(value: str) -> None:
    for check in (
        is_valid_did,
        is_valid_handle,
        is_valid_nsid,
        is_valid_record_key,
        is_valid_tid,
        is_valid_cid,
        is_valid_at_uri,
    ):
        assert isinstance(check(value), bool)
    try:
        parsed = parse_record_uri(value)
    except SyntaxValidationError:
        return
    assert value == f"at://{parsed.did}/{parsed.collection}/{parsed.rkey}"
    assert is_valid_at_uri(value)


# -- valid input round-trips ---------------------------------------------------------------------------


@FUZZ
@given(
    entries=st.lists(st.tuples(record_keys, cids, st.none() | strict_json_values), max_size=10),
    cursor=cursors,
)
def test_valid_records_page_round_trips(entries: list[tuple[str, str, Any]], cursor: str | None) -> None:
    records: list[dict[str, Any]] = []
    values: list[bytes | None] = []
    for rkey, cid, value in entries:
        entry: dict[str, Any] = {"uri": f"at://{DID}/{NSID}/{rkey}", "cid": cid}
        if value is not None:
            entry["value"] = value
        records.append(entry)
        # the value is handed on as the exact bytes it was sent as
        values.append(None if value is None else to_bytes(value))
    body = to_bytes({"records": records, "cursor": cursor})
    page = parse_list_records_page(body, did=DID, collection=NSID, page_size=10)
    assert page.records == tuple(
        RecordRef(rkey, cid, raw) for (rkey, cid, _), raw in zip(entries, values, strict=True)
    )
    assert page.cursor == (cursor or None)
    assert (page.skipped, page.skipped_reasons) == (0, ())


@FUZZ
@given(dids=st.lists(generic_dids, max_size=10), cursor=cursors)
def test_valid_repos_page_round_trips(dids: list[str], cursor: str | None) -> None:
    page = parse_list_repos_page({"repos": [{"did": d, "head": "x"} for d in dids], "cursor": cursor})
    assert page.dids == tuple(dids)
    assert page.cursor == (cursor or None)
    assert page.skipped == 0


@FUZZ
@given(
    did=plc_dids,
    host=hostnames,
    port=st.none() | st.integers(1, 65535),
    path=st.sampled_from(["", "/", "/xrpc-base", "/a/b/"]),
    key=valid_signing_keys,
)
def test_valid_did_document_round_trips(did: str, host: str, port: int | None, path: str, key: str) -> None:
    netloc = host if port is None else f"{host}:{port}"
    doc = {
        "id": did,
        "verificationMethod": [{"id": f"{did}#atproto", "type": "Multikey", "publicKeyMultibase": key}],
        "service": [
            {
                "id": "#atproto_pds",
                "type": "AtprotoPersonalDataServer",
                "serviceEndpoint": f"https://{netloc}{path}",
            }
        ],
    }
    identity = parse_did_document(did, doc, allow_http=False)
    assert identity.pds == f"https://{netloc}{path}".rstrip("/")
    assert (identity.signing_key, identity.signing_key_id) == (key, f"{did}#atproto")
    assert did_document_url(did, plc_directory="https://plc.directory/", allow_private=False) == (
        f"https://plc.directory/{did}"
    )


@FUZZ
@given(
    dids=st.lists(generic_dids, min_size=1, max_size=8),
    collections=st.none() | st.lists(st.sampled_from(COLLECTIONS), min_size=1, max_size=4),
)
def test_valid_backfill_request_round_trips(dids: list[str], collections: list[str] | None) -> None:
    body: dict[str, object] = {"dids": dids}
    if collections is not None:
        body["collections"] = collections
    request = parse_backfill_request(
        json.dumps(body).encode(), configured_collections=COLLECTIONS, max_backfill_dids=8
    )
    # in the configured order, which ordered_collections follows (SPEC 6.4), whatever the request's order
    expected_collections = (
        COLLECTIONS if collections is None else tuple(c for c in COLLECTIONS if c in collections)
    )
    assert request == BackfillRequest("explicit", tuple(dict.fromkeys(dids)), expected_collections)


@FUZZ
@given(ids=st.lists(st.integers(1, 2**63 - 1), min_size=1, max_size=20), through=st.integers(0, 2**63 - 1))
def test_valid_retry_and_ack_round_trip(ids: list[int], through: int) -> None:
    assert parse_retry_request(json.dumps({"ids": ids}).encode()) == RetryRequest(
        tuple(dict.fromkeys(ids)), None, None
    )
    assert parse_ack_request(json.dumps({"through": through}).encode()) == through


@FUZZ
@given(after=st.integers(0, 2**63 - 1), limit=st.integers(1, 1000))
def test_valid_page_query_round_trips(after: int, limit: int) -> None:
    assert parse_page_query({"after": str(after), "limit": str(limit)}) == PageQuery(after, limit)
