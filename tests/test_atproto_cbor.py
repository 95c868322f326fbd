"""daemon.atproto.cbor: canonical DAG-CBOR, the atproto JSON form both ways, and record CIDs.

Against the vendored data-model interop vectors (tests/interop/data-model), plus every canonical-form
violation by hand, plus properties over generated values and bytes.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.atproto.cbor import (
    MAX_DEPTH,
    Link,
    cid_for_record,
    decode_dag_cbor,
    decode_record,
    encode_dag_cbor,
    encode_record,
)
from daemon.atproto.cid import RAW, cid_for_block, format_cid
from daemon.errors import ProtocolViolation

DATA_MODEL = Path(__file__).resolve().parent / "interop" / "data-model"
LINK = "bafyreidfayvfuwqa7qlnopdjiqrxzs6blmoeu4rujcjtnci5beludirz2a"
RAW_LINK = "bafkreiccldh766hwcnuxnf2wh6jgzepf2nlu2lvcllt63eww5p6chi4ity"
CID_BYTES = b"\x00" + cid_for_block(b"x")


def _load(name: str) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads((DATA_MODEL / name).read_text(encoding="utf-8"))
    assert cases, name
    return cases


def _b64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _code(excinfo: pytest.ExceptionInfo[ProtocolViolation]) -> str:
    return excinfo.value.code


# --- the interop vectors -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", _load("data-model-fixtures.json"), ids=lambda case: case["cid"])
def test_fixture_round_trips(case: dict[str, Any]) -> None:
    cbor = _b64(case["cbor_base64"])
    assert encode_record(case["json"]) == cbor
    assert decode_record(cbor) == case["json"]
    assert cid_for_record(case["json"]) == case["cid"]
    assert format_cid(cid_for_block(cbor)) == case["cid"]


@pytest.mark.parametrize("case", _load("data-model-valid.json"), ids=lambda case: case["note"])
def test_valid_values_round_trip(case: dict[str, Any]) -> None:
    cbor = encode_record(case["json"])
    # JSON 123.0 is the integer 123 (JavaScript cannot tell them apart); everything else comes back as is.
    assert decode_record(cbor) == _floats_as_ints(case["json"])
    assert cid_for_record(decode_record(cbor)) == cid_for_record(case["json"])


def _floats_as_ints(value: Any) -> Any:
    if isinstance(value, float):
        assert value.is_integer()
        return int(value)
    if isinstance(value, dict):
        return {key: _floats_as_ints(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_floats_as_ints(item) for item in value]
    return value


@pytest.mark.parametrize("case", _load("data-model-invalid.json"), ids=lambda case: case["note"])
def test_invalid_values_are_refused(case: dict[str, Any]) -> None:
    with pytest.raises(ProtocolViolation) as excinfo:
        encode_record(case["json"])
    assert _code(excinfo) == "invalid_record"
    with pytest.raises(ProtocolViolation):
        cid_for_record(case["json"])


def test_integer_like_float_has_the_integers_cid() -> None:
    assert cid_for_record({"a": 123.0}) == cid_for_record({"a": 123})
    assert encode_record({"a": [1.0, {"b": -2.0}]}) == encode_record({"a": [1, {"b": -2}]})


# --- JSON -> CBOR: the data model ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        {"a": 2**63},
        {"a": -(2**63) - 1},
        {"a": 2**64},
        {"a": 1.5},
        {"a": float("nan")},
        {"a": float("inf")},
        {"a": 1e300},
        {"a": (1, 2)},
        {"a": b"raw bytes"},
        {1: "non-string key"},
        {"a": "\ud800"},
        {"a": {"$link": "QmbWqxBEKC3P8tqsKc98xmWNzrzDtRLMiMPL8wBuTGsMnR"}},
        {"a": {"$link": LINK.upper()}},
        {"a": {"$link": "b" + LINK[1:].upper()}},
        {"a": {"$link": "bafkqaaa"}},
        {"a": {"$link": LINK[:-1] + "b"}},
        {"a": {"$link": None}},
        {"a": {"$bytes": "!!!"}},
        {"a": {"$bytes": None}},
        {"a": {"$bytes": "YQ", "$link": LINK}},
        {"$type": "blob", "ref": {"$link": LINK}, "mimeType": "image/png", "size": 1},
        {"$type": "blob", "ref": {"$link": RAW_LINK}, "mimeType": "png", "size": 1},
        {"$type": "blob", "ref": {"$link": RAW_LINK}, "mimeType": "image/png", "size": -1},
        {"$type": "blob", "ref": {"$link": RAW_LINK}, "mimeType": "image/png", "size": 1, "x": 1},
        {"$type": "blob", "ref": RAW_LINK, "mimeType": "image/png", "size": 1},
        {"a": [{"$type": ""}]},
        [1, 2],
        "string",
        None,
    ],
)
def test_encode_record_refuses(value: Any) -> None:
    with pytest.raises(ProtocolViolation) as excinfo:
        encode_record(value)
    assert _code(excinfo) == "invalid_record"


def test_blob_and_padded_bytes_are_accepted() -> None:
    blob = {"$type": "blob", "ref": {"$link": RAW_LINK}, "mimeType": "image/png", "size": 0}
    assert decode_record(encode_record({"b": blob})) == {"b": blob}
    assert encode_record({"a": {"$bytes": "YQ=="}}) == encode_record({"a": {"$bytes": "YQ"}})
    assert decode_record(encode_record({"a": {"$bytes": "YQ=="}})) == {"a": {"$bytes": "YQ"}}


def test_nesting_limit() -> None:
    deep: Any = {}
    for _ in range(MAX_DEPTH - 1):
        deep = {"a": deep}
    encode_record(deep)
    with pytest.raises(ProtocolViolation) as excinfo:
        encode_record({"a": [deep]})
    assert _code(excinfo) == "invalid_record"


# --- CBOR -> JSON: canonical form ----------------------------------------------------------------------


NON_CANONICAL = {
    "unsorted keys": b"\xa2\x62bb\x02\x61a\x01",
    "unsorted keys of equal length": b"\xa2\x61b\x01\x61a\x02",
    "keys sorted bytewise, not length first": b"\xa2\x62aa\x01\x61b\x02",
    "duplicate keys": b"\xa2\x61a\x01\x61a\x02",
    "non-minimal int (1 byte)": b"\xa1\x61a\x18\x05",
    "non-minimal int (2 bytes)": b"\xa1\x61a\x19\x00\x05",
    "non-minimal negative int": b"\xa1\x61a\x38\x00",
    "non-minimal string length": b"\xa1\x61a\x78\x01b",
    "non-minimal byte string length": b"\xa1\x61a\x58\x01b",
    "non-minimal array length": b"\xa1\x61a\x98\x01\x01",
    "non-minimal map length": b"\xb8\x01\x61a\x01",
    "non-minimal key length": b"\xa1\x78\x01a\x01",
    "non-minimal tag": b"\xa1\x61a\xd9\x00\x2a\x58\x25" + CID_BYTES,
    "indefinite array": b"\xa1\x61a\x9f\x01\xff",
    "indefinite map": b"\xbf\x61a\x01\xff",
    "indefinite string": b"\xa1\x61a\x7f\x61b\xff",
    "indefinite bytes": b"\xa1\x61a\x5f\x41b\xff",
    "half float": b"\xa1\x61a\xf9\x3e\x00",
    "single float": b"\xa1\x61a\xfa\x3f\xc0\x00\x00",
    "NaN": b"\xa1\x61a\xfb\x7f\xf8\x00\x00\x00\x00\x00\x00",
    "tag 1": b"\xa1\x61a\xc1\x01",
    "tag 2 (bignum)": b"\xa1\x61a\xc2\x41\x01",
    "tag 42 without the 0x00 prefix": b"\xa1\x61a\xd8\x2a\x58\x24" + CID_BYTES[1:],
    "tag 42 on a string": b"\xa1\x61a\xd8\x2a\x61b",
    "trailing bytes": b"\xa1\x61a\x01\x00",
    "truncated": b"\xa1\x61a",
    "empty": b"",
    "undefined": b"\xa1\x61a\xf7",
    "simple value": b"\xa1\x61a\xf0",
    "integer key": b"\xa1\x01\x01",
    "byte string key": b"\xa1\x41a\x01",
    "invalid UTF-8": b"\xa1\x61a\x61\xff",
    "UTF-8 surrogate": b"\xa1\x61a\x63\xed\xa0\x80",
    "lone break": b"\xff",
}


@pytest.mark.parametrize("data", NON_CANONICAL.values(), ids=NON_CANONICAL.keys())
def test_non_canonical_cbor_is_invalid_cbor(data: bytes) -> None:
    with pytest.raises(ProtocolViolation) as excinfo:
        decode_record(data)
    assert _code(excinfo) == "invalid_cbor"
    with pytest.raises(ProtocolViolation) as excinfo:
        decode_dag_cbor(data)
    assert _code(excinfo) == "invalid_cbor"


DATA_MODEL_VIOLATIONS = {
    "float": b"\xa1\x61a\xfb\x3f\xf8\x00\x00\x00\x00\x00\x00",
    "integral float": b"\xa1\x61a\xfb\x3f\xf0\x00\x00\x00\x00\x00\x00",
    "$link key": encode_dag_cbor({"$link": LINK}),
    "$bytes key": encode_dag_cbor({"$bytes": "YQ", "b": 1}),
    "uint64 above int64": b"\xa1\x61a\x1b\x80" + bytes(7),
    "negative below int64": b"\xa1\x61a\x3b\x80" + bytes(7),
    "CIDv0 link": b"\xa1\x61a\xd8\x2a\x58\x23\x00\x12\x20" + bytes(32),
    "identity-hash link": b"\xa1\x61a\xd8\x2a\x45\x00\x01\x55\x00\x00",
    "non-string $type": encode_dag_cbor({"$type": 1}),
    "bad blob": encode_dag_cbor(
        {"$type": "blob", "ref": Link(cid_for_block(b"x")), "mimeType": "a/b", "size": 1}
    ),
    "array at the top": encode_dag_cbor([1]),
}


@pytest.mark.parametrize("data", DATA_MODEL_VIOLATIONS.values(), ids=DATA_MODEL_VIOLATIONS.keys())
def test_data_model_violations_are_invalid_record(data: bytes) -> None:
    with pytest.raises(ProtocolViolation) as excinfo:
        decode_record(data)
    assert _code(excinfo) == "invalid_record"


def test_links_and_bytes_decode_to_the_json_form() -> None:
    raw = cid_for_block(b"blob", RAW)
    record = {
        "$type": "com.example.thing",
        "link": Link(cid_for_block(b"x")),
        "bytes": b"\x00\x01\x02\xff",
        # A byte string that looks like a CID stays a byte string (libipld would encode it as a link).
        "cidlike": cid_for_block(b"y"),
        "blob": {"$type": "blob", "ref": Link(raw), "mimeType": "image/jpeg", "size": 10},
    }
    value = decode_record(encode_dag_cbor(record))
    assert value == {
        "$type": "com.example.thing",
        "link": {"$link": format_cid(cid_for_block(b"x"))},
        "bytes": {"$bytes": "AAEC/w"},
        "cidlike": {"$bytes": base64.b64encode(cid_for_block(b"y")).decode().rstrip("=")},
        "blob": {"$type": "blob", "ref": {"$link": format_cid(raw)}, "mimeType": "image/jpeg", "size": 10},
    }
    assert encode_record(value) == encode_dag_cbor(record)


def test_generic_decode_keeps_links_apart_from_bytes() -> None:
    cid = cid_for_block(b"x")
    value = decode_dag_cbor(encode_dag_cbor({"l": Link(cid), "b": cid}))
    assert type(value["l"]) is Link and value["l"] == cid
    assert type(value["b"]) is bytes


# --- properties ----------------------------------------------------------------------------------------

_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=20)
_links = st.binary(min_size=1, max_size=40).map(lambda data: {"$link": format_cid(cid_for_block(data))})
_bytes = st.binary(max_size=40).map(lambda data: {"$bytes": base64.b64encode(data).decode().rstrip("=")})
_keys = st.text(max_size=8).filter(lambda key: key not in ("$link", "$bytes", "$type"))
_values = st.recursive(
    _scalars | _links | _bytes,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_keys, children, max_size=4),
    max_leaves=20,
)
_records = st.dictionaries(_keys, _values, max_size=6)


@settings(deadline=None, max_examples=200)
@given(_records)
def test_json_cbor_json_round_trip(record: dict[str, Any]) -> None:
    cbor = encode_record(record)
    assert decode_record(cbor) == record
    assert cid_for_record(record) == format_cid(cid_for_block(cbor))


@settings(deadline=None, max_examples=300)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_protocol_violations(data: bytes) -> None:
    try:
        record = decode_record(data)
    except ProtocolViolation as exc:
        assert exc.code in ("invalid_cbor", "invalid_record")
    else:
        assert encode_record(record) == data


@settings(deadline=None, max_examples=300)
@given(_records, st.data())
def test_mutated_cbor_is_rejected_or_canonical(record: dict[str, Any], data: st.DataObject) -> None:
    # Whatever the decoder accepts re-encodes to exactly the same bytes: it is canonical-strict by itself.
    cbor = bytearray(encode_record(record))
    index = data.draw(st.integers(0, len(cbor) - 1))
    cbor[index] = data.draw(st.integers(0, 255))
    try:
        value = decode_dag_cbor(bytes(cbor))
    except ProtocolViolation:
        return
    assert encode_dag_cbor(value) == bytes(cbor)
