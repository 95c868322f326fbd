"""daemon.atproto.pages: listRecords and listReposByCollection page parsing (SPEC 6)."""

from __future__ import annotations

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


def parse(body: object, page_size: int = 100) -> RecordsPage:
    return parse_list_records_page(body, did=DID, collection=NSID, page_size=page_size)


# -- listRecords ------------------------------------------------------------------------------------


def test_valid_page() -> None:
    body = {"records": [record("3jzfcijpj2z2a"), record("self", cid="bafkqaaa")], "cursor": "3jzfcijpj2z2a"}
    assert parse(body) == RecordsPage(
        (RecordRef("3jzfcijpj2z2a", CID), RecordRef("self", "bafkqaaa")), "3jzfcijpj2z2a", 0, ()
    )


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


def test_page_too_large_even_when_entries_are_garbage() -> None:
    with pytest.raises(ProtocolViolation) as info:
        parse({"records": [1, 2, 3]}, page_size=2)
    assert info.value.code == "page_too_large"


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
    assert page.records == (RecordRef("first", CID), RecordRef("last", CID))
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
    assert page.records == (RecordRef("ok", CID),)
    assert page.skipped == 4
    assert page.skipped_reasons == ("invalid_cid", "other_did")


def test_other_did_sharing_a_prefix_is_not_taken_for_ours() -> None:
    # Our DID is a prefix of this one: the "/" after the DID in the URI prefix must keep them apart.
    page = parse_list_records_page(
        {"records": [record("a", did=DID + "x")]}, did=DID, collection=NSID, page_size=10
    )
    assert page.records == ()
    assert page.skipped_reasons == ("other_did",)


def test_extra_fields_are_ignored() -> None:
    body = {"records": [{**record("a"), "extra": [1, 2]}], "cursor": "a", "somethingElse": True}
    assert parse(body).records == (RecordRef("a", CID),)


def test_duplicate_records_are_kept() -> None:
    # The records queue is unique on (did, collection, rkey, cid): de-duplication is the store's job.
    assert len(parse({"records": [record("a"), record("a")]}).records) == 2


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
