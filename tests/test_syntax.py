"""daemon.atproto.syntax against the vendored atproto interop vectors (tests/interop), plus the canonical record-URI parser."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.atproto.syntax import (
    RecordUri,
    is_valid_at_uri,
    is_valid_cid,
    is_valid_did,
    is_valid_handle,
    is_valid_nsid,
    is_valid_record_key,
    is_valid_tid,
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
}


def _vectors() -> list[object]:
    """One pytest param per vector line (the vendored vectors must be there: a missing file fails)."""
    params: list[object] = []
    for kind in VALIDATORS:
        for expected, suffix in ((True, "valid"), (False, "invalid")):
            name = f"{kind}_syntax_{suffix}.txt"
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
    for kind in VALIDATORS:
        for suffix in ("valid", "invalid"):
            path = VECTORS_DIR / f"{kind}_syntax_{suffix}.txt"
            assert path.is_file(), path
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
