"""daemon.atproto.commit: decoding, checking, verifying and signing repo commits."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.atproto.cbor import Link, decode_dag_cbor, encode_dag_cbor
from daemon.atproto.cid import RAW, cid_for_block
from daemon.atproto.commit import Commit, decode_commit, sign_commit, verify_commit
from daemon.atproto.keys import _ORDERS, K256, P256, PrivateKey
from daemon.errors import ProtocolViolation

DID = "did:plc:7iza6de2dwap2sbkpav7c6c6"
REV = "3jzfcijpj2z2a"
DATA = cid_for_block(b"mst root")
PREV = cid_for_block(b"previous commit")
KEY = PrivateKey.generate(K256)


def _fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"did": DID, "version": 3, "data": Link(DATA), "rev": REV, "prev": None}
    fields.update(changes)
    return {name: value for name, value in fields.items() if value is not _ABSENT}


_ABSENT = object()


def _signed(fields: dict[str, Any], key: PrivateKey = KEY) -> bytes:
    return encode_dag_cbor(fields | {"sig": key.sign(encode_dag_cbor(fields))})


@pytest.mark.parametrize("curve", [K256, P256])
@pytest.mark.parametrize("prev", [None, PREV])
def test_sign_decode_verify(curve: str, prev: bytes | None) -> None:
    key = PrivateKey.generate(curve)
    cid, block = sign_commit(did=DID, data=DATA, rev=REV, prev=prev, key=key)
    assert cid == cid_for_block(block)
    commit = decode_commit(block, did=DID)
    assert commit == Commit(DID, 3, DATA, REV, prev, commit.sig)
    assert decode_dag_cbor(commit.unsigned_bytes()) == {
        k: v for k, v in decode_dag_cbor(block).items() if k != "sig"
    }
    verify_commit(commit, key.public_key)


def test_unknown_fields_are_ignored_and_not_signed() -> None:
    # As the reference implementation: its schema drops unknown keys before re-encoding for the signature.
    fields = _fields()
    block = _signed(fields)
    value = decode_dag_cbor(block) | {"extra": "not covered by the signature"}
    commit = decode_commit(encode_dag_cbor(value), did=DID)
    verify_commit(commit, KEY.public_key)


@pytest.mark.parametrize(
    "changes",
    [
        {"version": 2},
        {"version": 4},
        {"version": "3"},
        {"version": True},
        {"version": _ABSENT},
        {"did": "did:plc:someoneelseentirelyxxx"},
        {"did": DID.upper()},
        {"did": _ABSENT},
        {"did": 1},
        {"data": _ABSENT},
        {"data": None},
        {"data": DATA},
        {"data": Link(cid_for_block(b"x", RAW))},
        {"data": Link(b"\x01\x70\x12\x20" + bytes(32))},
        {"prev": _ABSENT},
        {"prev": PREV},
        {"rev": _ABSENT},
        {"rev": "not-a-tid"},
        {"rev": 3},
    ],
    ids=repr,
)
def test_bad_commits_are_invalid_commit(changes: dict[str, Any]) -> None:
    with pytest.raises(ProtocolViolation) as excinfo:
        decode_commit(_signed(_fields(**changes)), did=DID)
    assert excinfo.value.code == "invalid_commit"


def test_sig_must_be_bytes_and_present() -> None:
    for sig in (_ABSENT, "signature", None, [1]):
        value = _fields() | ({} if sig is _ABSENT else {"sig": sig})
        with pytest.raises(ProtocolViolation) as excinfo:
            decode_commit(encode_dag_cbor(value), did=DID)
        assert excinfo.value.code == "invalid_commit"


def test_not_a_map_or_not_canonical() -> None:
    with pytest.raises(ProtocolViolation) as excinfo:
        decode_commit(encode_dag_cbor([1, 2]), did=DID)
    assert excinfo.value.code == "invalid_commit"
    block = _signed(_fields())
    with pytest.raises(ProtocolViolation) as excinfo:
        decode_commit(block + b"\x00", did=DID)
    assert excinfo.value.code == "invalid_cbor"


def _verify_fails(block: bytes, key: PrivateKey = KEY) -> None:
    commit = decode_commit(block, did=DID)
    with pytest.raises(ProtocolViolation) as excinfo:
        verify_commit(commit, key.public_key)
    assert excinfo.value.code == "invalid_signature"


@pytest.mark.parametrize("curve", [K256, P256])
def test_high_s_signature_is_invalid(curve: str) -> None:
    key = PrivateKey.generate(curve)
    fields = _fields()
    sig = key.sign(encode_dag_cbor(fields))
    order = _ORDERS[curve]
    high_s = sig[:32] + (order - int.from_bytes(sig[32:], "big")).to_bytes(32, "big")
    _verify_fails(encode_dag_cbor(fields | {"sig": high_s}), key)


def test_signature_by_another_key_is_invalid() -> None:
    _verify_fails(_signed(_fields(), PrivateKey.generate(K256)))


def test_tampered_commit_is_invalid() -> None:
    sig = KEY.sign(encode_dag_cbor(_fields()))
    _verify_fails(encode_dag_cbor(_fields(rev="3jzfcijpj2z2b") | {"sig": sig}))
    _verify_fails(encode_dag_cbor(_fields(data=Link(PREV)) | {"sig": sig}))


def test_malformed_signatures_are_invalid() -> None:
    sig = KEY.sign(encode_dag_cbor(_fields()))
    for bad in (sig[:63], sig + b"\x00", b"", bytes(64)):
        _verify_fails(encode_dag_cbor(_fields() | {"sig": bad}))


@settings(deadline=None, max_examples=300)
@given(st.binary(max_size=200))
def test_random_commit_bytes_raise_only_protocol_violations(data: bytes) -> None:
    try:
        decode_commit(data, did=DID)
    except ProtocolViolation as exc:
        assert exc.code in ("invalid_commit", "invalid_cbor")
