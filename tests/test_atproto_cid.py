"""daemon.atproto.cid: CID strings both ways, the blessed-CID rule, block verification."""

from __future__ import annotations

import base64
import binascii

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.atproto.cid import (
    DAG_CBOR,
    RAW,
    cid_for_block,
    format_cid,
    is_blessed_cid,
    is_blessed_cid_string,
    is_dag_cbor_cid,
    parse_cid,
    verify_block,
)
from daemon.errors import ProtocolViolation, SyntaxValidationError

LINK = "bafyreidfayvfuwqa7qlnopdjiqrxzs6blmoeu4rujcjtnci5beludirz2a"
RAW_LINK = "bafkreiccldh766hwcnuxnf2wh6jgzepf2nlu2lvcllt63eww5p6chi4ity"


def test_round_trip() -> None:
    for text in (LINK, RAW_LINK):
        cid = parse_cid(text)
        assert len(cid) == 36 and is_blessed_cid(cid)
        assert format_cid(cid) == text
    assert is_dag_cbor_cid(parse_cid(LINK)) and not is_dag_cbor_cid(parse_cid(RAW_LINK))


def test_cid_for_block_codecs() -> None:
    assert cid_for_block(b"abc")[:4] == b"\x01\x71\x12\x20"
    assert cid_for_block(b"abc", RAW)[:4] == b"\x01\x55\x12\x20"
    assert cid_for_block(b"abc", DAG_CBOR) == cid_for_block(b"abc")
    with pytest.raises(ValueError):
        cid_for_block(b"abc", 0x70)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "b",
        LINK.upper(),
        "B" + LINK[1:].upper(),
        "b" + LINK[1:].upper(),
        LINK[:-1],
        LINK + "a",
        LINK[:-1] + "b",  # the last character's unused low bits are set: not the canonical string
        "QmbWqxBEKC3P8tqsKc98xmWNzrzDtRLMiMPL8wBuTGsMnR",
        "zdpuAyTBnYSugBZhqJuLsNpzjmAjSmxDqBbtAqXMtsvxiN2v3",
        "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi",  # dag-pb
        "bagaaierasords4njcts6vs7qvdjfcvgnume4hqohf65zsfguprqphs3icwea",  # another codec
        "bafkqaaa",  # identity hash
        LINK + "\n",
    ],
)
def test_parse_refuses(text: str) -> None:
    with pytest.raises(SyntaxValidationError):
        parse_cid(text)


def test_verify_block() -> None:
    data = b"some block"
    verify_block(cid_for_block(data), data)
    verify_block(cid_for_block(data, RAW), data)
    for cid in (cid_for_block(b"other"), cid_for_block(data)[:-1], b"\x12\x20" + cid_for_block(data)[4:]):
        with pytest.raises(ProtocolViolation) as excinfo:
            verify_block(cid, data)
        assert excinfo.value.code == "cid_mismatch"


def _reference_parse(text: str) -> bytes | None:
    """The slow, obviously right parse: decode base32, keep only blessed CIDs that re-encode to ``text``."""
    try:
        cid = base64.b32decode(text[1:].upper() + "=" * (-len(text[1:]) % 8))
    except (binascii.Error, ValueError):
        return None
    if not text.startswith("b") or not is_blessed_cid(cid):
        return None
    canonical = "b" + base64.b32encode(cid).decode().rstrip("=").lower()
    return cid if canonical == text else None


@settings(deadline=None, max_examples=300)
@given(st.sampled_from([DAG_CBOR, RAW]), st.binary(min_size=32, max_size=32))
def test_format_parse_round_trip(codec: int, digest: bytes) -> None:
    cid = bytes((1, codec, 0x12, 0x20)) + digest
    assert parse_cid(format_cid(cid)) == cid
    assert _reference_parse(format_cid(cid)) == cid


_b32 = "abcdefghijklmnopqrstuvwxyz234567"


@settings(deadline=None, max_examples=500)
@given(
    st.sampled_from(["bafyrei", "bafkrei", "bafyreh", "bafyrea", "bafybei", "bafkqaa", "Bafyrei"]),
    st.text(_b32, min_size=52, max_size=52) | st.text(_b32 + "A1=", min_size=50, max_size=54),
)
def test_string_check_agrees_with_decoding(start: str, rest: str) -> None:
    text = start + rest
    expected = _reference_parse(text)
    assert is_blessed_cid_string(text) is (expected is not None)
    if expected is not None:
        assert parse_cid(text) == expected
    else:
        with pytest.raises(SyntaxValidationError):
            parse_cid(text)
