"""daemon.atproto.pages: listRecords and listReposByCollection page parsing (SPEC 6)."""

from __future__ import annotations

import json

import pytest

from daemon.atproto.pages import (
    MAX_CURSOR_LENGTH,
    RecordRef,
    RecordsPage,
    ReposPage,
    parse_list_records_page,
    parse_list_repos_page,
)
from daemon.errors import ProtocolViolation

DID = "did:plc:7iza6de2dwap2sbkpav7c6c6"
OTHER_DID = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"
NSID = "com.emdashcms.experimental.package.release"
CID = "bafyreie5cvv4h45feadgeuwhbcutmh6t7ceseocckahdoe6uat64zmz454"


def record(rkey: str, *, did: str = DID, collection: str = NSID, cid: str = CID) -> dict[str, object]:
    return {"uri": f"at://{did}/{collection}/{rkey}", "cid": cid, "value": {"$type": collection}}


def value_of(collection: str = NSID) -> bytes:
    """The raw ``value`` bytes of :func:`record`'s entries as :func:`raw` encodes them."""
    return json.dumps({"$type": collection}).encode()


def ref(rkey: str, cid: str = CID) -> RecordRef:
    """The RecordRef of ``record(rkey, cid=cid)``: its value kept as the raw JSON bytes it was sent as."""
    return RecordRef(rkey, cid, value_of())


def raw(body: object) -> bytes:
    """A decoded body as the raw bytes a PDS sends (the parser takes bytes, SPEC 6 step 2)."""
    return json.dumps(body).encode()


def parse(body: object, page_size: int = 100) -> RecordsPage:
    return parse_list_records_page(raw(body), did=DID, collection=NSID, page_size=page_size)


# -- listRecords ------------------------------------------------------------------------------------


def test_valid_page() -> None:
    body = {"records": [record("3jzfcijpj2z2a"), record("self", cid="bafkqaaa")], "cursor": "3jzfcijpj2z2a"}
    assert parse(body) == RecordsPage((ref("3jzfcijpj2z2a"), ref("self", "bafkqaaa")), "3jzfcijpj2z2a", 0, ())


@pytest.mark.parametrize("cursor", [None, ""])
def test_absent_null_or_empty_cursor_is_the_end(cursor: str | None) -> None:
    assert parse({"records": [], "cursor": cursor}).cursor is None
    assert parse({"records": []}).cursor is None


def test_empty_page() -> None:
    assert parse({"records": []}) == RecordsPage((), None, 0, ())


@pytest.mark.parametrize("body", [None, [], "records", 3, True, 1.5])
def test_body_must_be_an_object(body: object) -> None:
    with pytest.raises(ProtocolViolation) as info:
        parse(body)
    assert info.value.code == "bad_response"


@pytest.mark.parametrize("records", [None, {}, "x", 1, {"0": record("a")}])
def test_records_must_be_an_array(records: object) -> None:
    with pytest.raises(ProtocolViolation) as info:
        parse({"records": records})
    assert info.value.code == "bad_response"


def test_missing_records_is_bad_response() -> None:
    with pytest.raises(ProtocolViolation, match="missing") as info:
        parse({"cursor": "x"})
    assert info.value.code == "bad_response"


@pytest.mark.parametrize("cursor", [1, 0, True, False, [], {}, 1.5])
def test_non_string_cursor_is_bad_response(cursor: object) -> None:
    with pytest.raises(ProtocolViolation) as info:
        parse({"records": [], "cursor": cursor})
    assert info.value.code == "bad_response"


def test_overlong_cursor_is_bad_response() -> None:
    assert parse({"records": [], "cursor": "c" * MAX_CURSOR_LENGTH}).cursor == "c" * MAX_CURSOR_LENGTH
    with pytest.raises(ProtocolViolation) as info:
        parse({"records": [], "cursor": "c" * (MAX_CURSOR_LENGTH + 1)})
    assert info.value.code == "bad_response"


def test_more_than_page_size_is_page_too_large() -> None:
    records = [record(f"k{i}") for i in range(11)]
    assert len(parse({"records": records[:10]}, page_size=10).records) == 10
    with pytest.raises(ProtocolViolation) as info:
        parse({"records": records}, page_size=10)
    assert info.value.code == "page_too_large"


def test_page_too_large_counts_entries_that_would_be_skipped() -> None:
    # Well-formed entries that are skipped (foreign DID, bad rkey or CID) still count against page_size:
    # the page is rejected whole, never chunked or filtered down to size.
    entries = [record("a", did=OTHER_DID), record("a/b"), record("c", cid="x")]
    with pytest.raises(ProtocolViolation) as info:
        parse({"records": entries}, page_size=2)
    assert info.value.code == "page_too_large"


def test_garbage_entries_are_a_bad_response_whatever_their_number() -> None:
    # The typed decoder refuses a malformed entry while it decodes, before the entries are counted: such a
    # page is bad_response (a retry either way, SPEC 6.1), however many entries it has.
    for page_size in (2, 3, 100):
        with pytest.raises(ProtocolViolation) as info:
            parse({"records": [1, 2, 3]}, page_size=page_size)
        assert info.value.code == "bad_response"


@pytest.mark.parametrize(
    "entry",
    [
        None,
        "at://x",
        1,
        [],
        {},
        {"uri": f"at://{DID}/{NSID}/a"},
        {"cid": CID},
        {"uri": 1, "cid": CID},
        {"uri": f"at://{DID}/{NSID}/a", "cid": None},
        {"uri": None, "cid": CID},
        {"uri": f"at://{DID}/{NSID}/a", "cid": {"$link": CID}},
    ],
)
def test_malformed_entry_fails_the_whole_page(entry: object) -> None:
    with pytest.raises(ProtocolViolation) as info:
        parse({"records": [record("good"), entry]})
    assert info.value.code == "bad_response"


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ({"uri": "not a uri", "cid": CID}, "invalid_uri"),
        ({"uri": f"at://alice.example.com/{NSID}/a", "cid": CID}, "invalid_uri"),
        ({"uri": f"at://{DID}/{NSID}", "cid": CID}, "invalid_uri"),
        ({"uri": f"at://{OTHER_DID}/{NSID}/a?x=1", "cid": CID}, "invalid_uri"),
        (record("a", did=OTHER_DID), "other_did"),
        (record("a", collection="com.example.other"), "other_collection"),
        (record("a/b"), "invalid_rkey"),
        (record("."), "invalid_rkey"),
        (record(".."), "invalid_rkey"),
        (record(""), "invalid_rkey"),
        (record("a#/frag"), "invalid_rkey"),
        (record("a?x=1"), "invalid_rkey"),
        (record("o" * 513), "invalid_rkey"),
        (record("a", cid="Qmb"), "invalid_cid"),
        (record("a", cid="QmbWqxBEKC3P8tqsKc98xmWNzrzDtRLMiMPL8wBuTGsMnR"), "invalid_cid"),
        (record("a", cid=""), "invalid_cid"),
        (record("a", cid="bafy rei"), "invalid_cid"),
    ],
)
def test_bad_record_is_skipped_not_an_error(entry: dict[str, object], reason: str) -> None:
    page = parse({"records": [record("first"), entry, record("last")], "cursor": "c"})
    assert page.records == (ref("first"), ref("last"))
    assert page.skipped == 1
    assert page.skipped_reasons == (reason,)
    assert page.cursor == "c"


def test_skip_reasons_are_distinct_in_first_seen_order() -> None:
    body = {
        "records": [
            record("a", cid="x"),
            record("b", did=OTHER_DID),
            record("c", cid="y"),
            record("ok"),
            record("b", did=OTHER_DID),
        ]
    }
    page = parse(body)
    assert page.records == (ref("ok"),)
    assert page.skipped == 4
    assert page.skipped_reasons == ("invalid_cid", "other_did")


def test_other_did_sharing_a_prefix_is_not_taken_for_ours() -> None:
    # Our DID is a prefix of this one: the "/" after the DID in the URI prefix must keep them apart.
    page = parse_list_records_page(
        raw({"records": [record("a", did=DID + "x")]}), did=DID, collection=NSID, page_size=10
    )
    assert page.records == ()
    assert page.skipped_reasons == ("other_did",)


def test_extra_fields_are_ignored() -> None:
    body = {"records": [{**record("a"), "extra": [1, 2]}], "cursor": "a", "somethingElse": True}
    assert parse(body).records == (ref("a"),)


def test_duplicate_records_are_kept() -> None:
    # The records queue is unique on (did, collection, rkey, cid): de-duplication is the store's job.
    assert len(parse({"records": [record("a"), record("a")]}).records) == 2


# -- raw bytes: the value is kept as sent --------------------------------------------------------------


def test_value_is_kept_as_the_exact_raw_json_bytes() -> None:
    # Whitespace, key order and escapes of the value stay exactly as the PDS sent them: list mode recomputes
    # the CID from them (SPEC 6.3), so nothing may be normalised on the way.
    value = b'{ "$type" : "%s", "b":1,"a" : [1.5, "\\u00e9", {"$link": "x"}] }' % NSID.encode()
    body = b'{"records":[{"uri":"at://%s/%s/k","cid":"%s","value":%s}],"cursor":"k"}' % (
        DID.encode(),
        NSID.encode(),
        CID.encode(),
        value,
    )
    page = parse_list_records_page(body, did=DID, collection=NSID, page_size=10)
    assert page.records == (RecordRef("k", CID, value),)
    assert page.cursor == "k"


@pytest.mark.parametrize(("value", "kept"), [(None, None), ("null", b"null"), ("{}", b"{}"), ("3", b"3")])
def test_absent_or_odd_value_is_reported_as_it_is(value: str | None, kept: bytes | None) -> None:
    # Absent: None (list mode skips it as cid_mismatch); anything else is handed on raw for that check.
    entry = f'"uri":"at://{DID}/{NSID}/k","cid":"{CID}"' + ("" if value is None else f',"value":{value}')
    page = parse_list_records_page(
        ('{"records":[{' + entry + "}]}").encode(), did=DID, collection=NSID, page_size=1
    )
    assert page.records == (RecordRef("k", CID, kept),)


def test_bytearray_bodies_are_accepted() -> None:
    page = parse_list_records_page(
        bytearray(raw({"records": [record("a")]})), did=DID, collection=NSID, page_size=1
    )
    assert page.records == (ref("a"),)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b" ",
        b"{",
        b"nul",
        b'{"records": []} trailing',
        b'{"records": [], "cursor": NaN}',
        b'{"records": [{"uri": "at://x", "cid": "\xff"}]}',
        b"\xff\xfe{}",
        b'{"records": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}",
        b'{"records": [{"uri": "' + b"\xc3" + b'", "cid": "c"}]}',
    ],
)
def test_bytes_that_are_not_json_are_bad_response(body: bytes) -> None:
    with pytest.raises(ProtocolViolation) as info:
        parse_list_records_page(body, did=DID, collection=NSID, page_size=100)
    assert info.value.code == "bad_response"


def test_a_deeply_nested_value_is_a_bad_response_not_a_crash() -> None:
    # msgspec raises RecursionError past ~1000 levels, even for a value it keeps raw: that must be a
    # ProtocolViolation like any other undecodable body, never an exception the job does not expect.
    deep = b"[" * 100_000 + b"]" * 100_000
    body = b'{"records":[{"uri":"at://%s/%s/k","cid":"%s","value":%s}]}' % (
        DID.encode(),
        NSID.encode(),
        CID.encode(),
        deep,
    )
    with pytest.raises(ProtocolViolation) as info:
        parse_list_records_page(body, did=DID, collection=NSID, page_size=1)
    assert info.value.code == "bad_response"
    # nesting a real record value could have is kept raw, undecoded
    shallow = b"[" * 100 + b"]" * 100
    page = parse_list_records_page(body.replace(deep, shallow), did=DID, collection=NSID, page_size=1)
    assert page.records == (RecordRef("k", CID, shallow),)


# -- listReposByCollection ------------------------------------------------------------------------------


def test_valid_repos_page() -> None:
    body = {"repos": [{"did": DID}, {"did": OTHER_DID, "rev": "x"}], "cursor": "abc"}
    assert parse_list_repos_page(body) == ReposPage((DID, OTHER_DID), "abc", 0)


def test_repos_entries_that_are_not_usable_are_skipped() -> None:
    body = {
        "repos": [
            {"did": DID},
            None,
            "did:plc:x",
            [DID],
            {},
            {"did": 5},
            {"did": None},
            {"did": "not-a-did"},
            {"did": "did:plc:abc\n"},
            {"did": OTHER_DID},
        ]
    }
    assert parse_list_repos_page(body) == ReposPage((DID, OTHER_DID), None, 8)


def test_repos_keeps_page_order_and_duplicates() -> None:
    body = {"repos": [{"did": OTHER_DID}, {"did": DID}, {"did": OTHER_DID}]}
    assert parse_list_repos_page(body).dids == (OTHER_DID, DID, OTHER_DID)


@pytest.mark.parametrize(
    "body", [None, [], "x", {"repos": None}, {"repos": {}}, {"cursor": "x"}, {"repos": "a"}]
)
def test_repos_body_must_be_an_object_with_repos_array(body: object) -> None:
    with pytest.raises(ProtocolViolation) as info:
        parse_list_repos_page(body)
    assert info.value.code == "bad_response"


@pytest.mark.parametrize(("cursor", "expected"), [(None, None), ("", None), ("x", "x")])
def test_repos_cursor(cursor: str | None, expected: str | None) -> None:
    assert parse_list_repos_page({"repos": [], "cursor": cursor}).cursor == expected


@pytest.mark.parametrize("cursor", [1, True, [], {}, "c" * (MAX_CURSOR_LENGTH + 1)])
def test_repos_bad_cursor(cursor: object) -> None:
    with pytest.raises(ProtocolViolation) as info:
        parse_list_repos_page({"repos": [{"did": DID}], "cursor": cursor})
    assert info.value.code == "bad_response"
