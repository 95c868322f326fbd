"""daemon.atproto.syntax against the vendored atproto interop vectors (tests/interop), plus the canonical record-URI parser."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.atproto.syntax import (
    RecordUri,
    is_valid_at_identifier,
    is_valid_at_uri,
    is_valid_cid,
    is_valid_datetime,
    is_valid_did,
    is_valid_handle,
    is_valid_language,
    is_valid_nsid,
    is_valid_record_key,
    is_valid_tid,
    is_valid_uri,
    parse_record_uri,
)
from daemon.errors import SyntaxValidationError

VECTORS_DIR = Path(__file__).resolve().parent / "interop" / "syntax"

VALIDATORS: dict[str, Callable[[str], bool]] = {
    "did": is_valid_did,
    "handle": is_valid_handle,
    "nsid": is_valid_nsid,
    "recordkey": is_valid_record_key,
    "tid": is_valid_tid,
    "aturi": is_valid_at_uri,
    "cid": is_valid_cid,
    "atidentifier": is_valid_at_identifier,
    "datetime": is_valid_datetime,
    "language": is_valid_language,
    "uri": is_valid_uri,
}
# Families that also have "<kind>_parse_invalid.txt": well-formed strings that are still not valid (a
# month zero, a repeated variant subtag); the validators refuse those too.
PARSE_INVALID = ("datetime", "language")


def _vector_files() -> list[tuple[str, str, bool]]:
    """(kind, file name, expected) for every vector file the validators are tested against."""
    files = [
        (kind, f"{kind}_syntax_{suffix}.txt", expected)
        for kind in VALIDATORS
        for expected, suffix in ((True, "valid"), (False, "invalid"))
    ]
    return files + [(kind, f"{kind}_parse_invalid.txt", False) for kind in PARSE_INVALID]


def _vectors() -> list[object]:
    """One pytest param per vector line (the vendored vectors must be there: a missing file fails)."""
    params: list[object] = []
    for kind, name, expected in _vector_files():
        # Lines are significant byte for byte (several invalid vectors end in a space): no stripping.
        lines = (VECTORS_DIR / name).read_text(encoding="utf-8").split("\n")
        for number, line in enumerate(lines, start=1):
            if line == "" or line.startswith("#"):
                continue
            params.append(pytest.param(kind, line, expected, id=f"{name}:{number}"))
    return params


@pytest.mark.parametrize(("kind", "value", "expected"), _vectors())
def test_interop_vector(kind: str, value: str, expected: bool) -> None:
    assert VALIDATORS[kind](value) is expected


def test_every_vector_file_is_used() -> None:
    used = {name for _, name, _ in _vector_files()}
    assert used == {path.name for path in VECTORS_DIR.glob("*.txt")}
    for name in used:
        path = VECTORS_DIR / name
        assert any(line and not line.startswith("#") for line in path.read_text().split("\n")), path


DID = "did:plc:7iza6de2dwap2sbkpav7c6c6"


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (
            f"at://{DID}/com.example.fooBar/3jzfcijpj2z2a",
            RecordUri(DID, "com.example.fooBar", "3jzfcijpj2z2a"),
        ),
        ("at://did:web:example.com/a.b.c/self", RecordUri("did:web:example.com", "a.b.c", "self")),
        (f"at://{DID}/a.b.c/~1.2-3_:x", RecordUri(DID, "a.b.c", "~1.2-3_:x")),
    ],
)
def test_parse_record_uri_accepts_canonical(uri: str, expected: RecordUri) -> None:
    assert parse_record_uri(uri) == expected


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "at://",
        f"at://{DID}",
        f"at://{DID}/a.b.c",
        f"at://{DID}/a.b.c/",
        f"at://{DID}/a.b.c/rkey/",
        f"at://{DID}/a.b.c/rkey/more",
        f"at://{DID}/a.b.c/rkey?x=1",
        f"at://{DID}/a.b.c/rkey#/frag",
        f"at://{DID}?x=1/a.b.c/rkey",
        "at://alice.example.com/a.b.c/rkey",
        f"AT://{DID}/a.b.c/rkey",
        f"at:/{DID}/a.b.c/rkey",
        f"https://{DID}/a.b.c/rkey",
        f" at://{DID}/a.b.c/rkey",
        f"at://{DID}/a.b.c/rkey ",
        f"at://{DID}/a.b.c/rkey\n",
        f"at://{DID}/a.b/rkey",
        f"at://{DID}/a.b.c/.",
        f"at://{DID}/a.b.c/..",
        f"at://{DID}/a.b.c/%23",
        f"at://{DID}/a.b.c/" + "o" * 513,
        f"at://{DID}//rkey",
        "at:///a.b.c/rkey",
        "at://did:plc:/a.b.c/rkey",
    ],
)
def test_parse_record_uri_rejects(uri: str) -> None:
    with pytest.raises(SyntaxValidationError):
        parse_record_uri(uri)


def test_parse_record_uri_error_message_is_bounded() -> None:
    uri = "at://" + "x" * 100_000
    with pytest.raises(SyntaxValidationError) as info:
        parse_record_uri(uri)
    assert len(info.value.message) < 400
    assert info.value.code == "invalid_syntax"


def test_canonical_record_uris_are_valid_general_uris() -> None:
    uri = f"at://{DID}/com.example.fooBar/3jzfcijpj2z2a"
    parse_record_uri(uri)
    assert is_valid_at_uri(uri)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("did:plc:" + "a" * (2048 - 8), True),
        ("did:plc:" + "a" * (2049 - 8), False),
        ("did:plc:abc\n", False),
        ("did:plc:abc%20", True),
    ],
)
def test_did_length_and_newline(value: str, expected: bool) -> None:
    assert is_valid_did(value) is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a.b." + "c" * 63, True),
        ("a.b." + "c" * 64, False),
        ("a.b.c\n", False),
        ("com.example.a1", True),
    ],
)
def test_nsid_edges(value: str, expected: bool) -> None:
    assert is_valid_nsid(value) is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("QmbWqxBEKC3P8tqsKc98xmWNzrzDtRLMiMPL8wBuTGsMnR", False),
        ("QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG", False),
        ("bafyreie5cvv4h45feadgeuwhbcutmh6t7ceseocckahdoe6uat64zmz454", True),
        ("b" * 256, True),
        ("b" * 257, False),
        ("b" * 7, False),
        ("bafyrei\n", False),
    ],
)
def test_cid_edges(value: str, expected: bool) -> None:
    assert is_valid_cid(value) is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("at://did:plc:asdf123#/a/b", True),
        ("at://did:plc:asdf123/a.b.c/rkey#/a[0]", True),
        ("at://did:plc:asdf123?q=1", False),
        ("at://did:plc:asdf123/a.b.c?q=1", False),
        ("at://did:plc:asdf123/a.b.c/" + "o" * 8200, False),
    ],
)
def test_at_uri_fragment_and_query(value: str, expected: bool) -> None:
    assert is_valid_at_uri(value) is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-02-29T12:00:00Z", True),
        ("2023-02-29T12:00:00Z", False),
        ("2000-02-29T12:00:00Z", True),
        ("1900-02-29T12:00:00Z", False),
        ("0000-02-29T00:00:00Z", True),
        ("1985-04-31T00:00:00Z", False),
        ("1985-04-30T23:59:60Z", False),
        ("0000-01-01T01:00:00+01:00", True),
        ("0000-01-01T00:59:00+01:00", False),
        ("9999-12-31T22:59:00-01:00", True),
        ("9999-12-31T23:00:00-01:00", False),
        ("1985-04-12T23:20:50.123+00:00", True),
        ("1985-04-12T23:20:50.123-00:00", False),
        ("1985-04-12T23:20:50." + "1" * 50 + "Z", False),
        ("1985-04-12T23:20:50Z\n", False),
        ("１985-04-12T23:20:50Z", False),
    ],
)
def test_datetime_edges(value: str, expected: bool) -> None:
    assert is_valid_datetime(value) is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("en", True),
        ("EN", False),
        ("en-US", True),
        ("en-us", True),
        ("x-private", True),
        ("en-a-bbb-a-ccc", False),
        ("en-a-bbb-b-ccc", True),
        ("de-1901-1996", True),
        ("de-1901-1901", False),
        ("zh-yue-HK", True),
        ("en-", False),
        ("en\n", False),
    ],
)
def test_language_edges(value: str, expected: bool) -> None:
    assert is_valid_language(value) is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("https://example.com/" + "x" * (8192 - 20), True),
        ("https://example.com/" + "x" * (8193 - 20), False),
        ("a+b.c-d:x", True),
        ("1a:x", False),
        ("mailto:someone@example.com", True),
        ("https:///path", False),
        ("https://example.com\n", False),
        ("https://exa\u00a0mple.com", False),
    ],
)
def test_uri_edges(value: str, expected: bool) -> None:
    assert is_valid_uri(value) is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("did:plc:asdf123", True),
        ("alice.example.com", True),
        ("did:plc", False),
        ("@alice.example.com", False),
    ],
)
def test_at_identifier_edges(value: str, expected: bool) -> None:
    assert is_valid_at_identifier(value) is expected
