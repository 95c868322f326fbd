"""DAG-CBOR in canonical form, and the atproto JSON form of records, both ways (SPEC 6.2, 6.3).

The codec is ``cbrrr`` (C). It enforces canonical DAG-CBOR on decode by itself: map keys sorted
length-first and unique, minimal integer and length encodings, no indefinite lengths, no tags but 42, no
simple values but true/false/null, floats only as 64-bit, valid UTF-8, nothing after the value. Its
"atjson" mode converts links and byte strings to and from ``{"$link": ...}`` / ``{"$bytes": ...}`` in C,
which is exactly the mapping the reference PDS's ``listRecords`` applies (CID strings as ``b`` + base32,
bytes as unpadded standard base64), rejects floats, and rejects CBOR maps that use ``$link`` or ``$bytes``
as a key (their JSON form would be ambiguous).

What the atproto data model adds on top of DAG-CBOR is checked here, in one pass over the JSON form
(``_check``), identically in both directions, so that a record accepted one way is accepted the other way:

- a record is a map; nesting at most ``MAX_DEPTH`` maps/arrays deep;
- integers within the signed 64-bit range; no floats (JSON ``123.0`` is the integer 123, as in JavaScript,
  which cannot tell the two apart; ``123.5`` is refused);
- links are blessed CIDs (CIDv1, dag-cbor or raw, sha2-256); ``{"$link"}`` / ``{"$bytes"}`` objects have that
  one key and a string value;
- ``$type``, where present, is a non-empty string; ``{"$type": "blob"}`` is exactly ``$type``, ``ref`` (a raw
  CID link), ``mimeType`` (a string with a ``/``) and ``size`` (an integer >= 0), as the reference
  implementation's strict parsing requires.

Error codes (ProtocolViolation): ``invalid_cbor`` for bytes that are not canonical DAG-CBOR,
``invalid_record`` for a value that is valid DAG-CBOR or JSON but breaks the atproto data model.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import cbrrr

from daemon.atproto.cid import DAG_CBOR_PREFIX, format_cid, is_blessed_cid_string
from daemon.errors import ProtocolViolation

MAX_DEPTH = 128
"""Deepest nesting of maps and arrays accepted in a record (JSON encoders recurse; real records nest < 20)."""

_I64_MIN = -(2**63)
_I64_MAX = 2**63 - 1
_BLOB_KEYS = frozenset({"$type", "ref", "mimeType", "size"})
_RAW_LINK_START = "bafkrei"  # how the string of every raw sha2-256 CIDv1 starts (see cid.py)
_CBRRR_ERRORS = (ValueError, TypeError, OverflowError)


class Link(bytes):
    """A CID link inside a decoded DAG-CBOR value: the raw binary CID, typed apart from byte strings."""

    __slots__ = ()


def decode_dag_cbor(data: bytes) -> Any:
    """Decode one canonical DAG-CBOR value; links come back as :class:`Link` (any CID, unchecked).

    Raises ProtocolViolation ``invalid_cbor`` for anything that is not canonical DAG-CBOR.
    """
    try:
        return cbrrr.decode_dag_cbor(data, cid_ctor=Link)
    except _CBRRR_ERRORS as exc:
        raise ProtocolViolation(f"block is not canonical DAG-CBOR: {exc}", code="invalid_cbor") from exc


def encode_dag_cbor(value: Any) -> bytes:
    """Encode a value (links as :class:`Link`) in canonical DAG-CBOR.

    For values this package builds itself (commits, MST nodes); raises ValueError/TypeError on a value that
    has no DAG-CBOR form, which is a bug in the caller.
    """
    encoded: bytes = cbrrr.encode_dag_cbor(value, cid_type=Link)
    return encoded


def decode_record(data: bytes) -> dict[str, Any]:
    """Decode a record block into the atproto JSON form, as the reference PDS's ``listRecords`` writes it.

    Raises ProtocolViolation ``invalid_cbor`` (not canonical DAG-CBOR) or ``invalid_record`` (a float, a
    ``$link``/``$bytes`` map key, an out-of-range integer, a non-blessed link, a bad ``$type`` or blob, too
    deep, or not a map).
    """
    try:
        value: Any = cbrrr.decode_dag_cbor(data, atjson_mode=True)
    except _CBRRR_ERRORS as exc:
        # atjson mode also refuses what DAG-CBOR allows but the data model does not (floats, reserved
        # keys); a plain decode tells the two kinds of failure apart. Only failures pay for it.
        decode_dag_cbor(data)
        raise ProtocolViolation(
            f"record breaks the atproto data model: {exc}", code="invalid_record"
        ) from exc
    _check(value, from_json=False)
    record: dict[str, Any] = value  # _check proved it is a dict
    return record


def encode_record(value: Any) -> bytes:
    """Encode a record in the atproto JSON form (decoded JSON) as canonical DAG-CBOR.

    ``{"$link": cid}`` becomes a link and ``{"$bytes": base64}`` a byte string. Raises ProtocolViolation
    ``invalid_record`` for a value outside the data model (see the module docstring).
    """
    if _check(value, from_json=True):
        value = _without_floats(value)
    try:
        encoded: bytes = cbrrr.encode_dag_cbor(value, atjson_mode=True)
    except _CBRRR_ERRORS as exc:  # bad base64, lone surrogates, non-string keys, foreign types
        raise ProtocolViolation(f"record has no DAG-CBOR form: {exc}", code="invalid_record") from exc
    return encoded


def cid_for_record(value: Any) -> str:
    """The CID string (CIDv1, dag-cbor, sha2-256) of a record given in the atproto JSON form.

    List mode compares it with the ``cid`` listRecords gave. Raises ProtocolViolation ``invalid_record``
    as :func:`encode_record` does.
    """
    return format_cid(DAG_CBOR_PREFIX + hashlib.sha256(encode_record(value)).digest())


def _check(value: Any, *, from_json: bool) -> bool:
    """Check a record in the JSON form against the data model; True if it holds integral JSON floats.

    Breadth-first, level by level, so that depth is counted without recursion or per-item bookkeeping.
    ``from_json`` admits integral floats (JSON parsers make ``123.0`` a float; cbrrr never does).
    """
    if type(value) is not dict:
        raise _invalid(f"a record must be a map, not {type(value).__name__}")
    has_float = False
    level: list[Any] = [value]
    depth = 0
    while level:
        depth += 1
        if depth > MAX_DEPTH:
            raise _invalid(f"record nests deeper than {MAX_DEPTH} levels")
        below: list[Any] = []
        for item in level:
            kind = type(item)
            if kind is dict:
                if "$link" in item or "$bytes" in item:
                    _check_special(item)
                    continue
                if "$type" in item:
                    _check_type(item)
                below.extend(item.values())
            elif kind is list:
                below.extend(item)
            elif kind is int:
                if not _I64_MIN <= item <= _I64_MAX:
                    raise _invalid("integer outside the signed 64-bit range")
            elif kind is str or kind is bool or item is None:
                pass
            elif kind is float and from_json:
                if not (math.isfinite(item) and item.is_integer() and _I64_MIN <= item <= _I64_MAX):
                    raise _invalid("floats are not allowed in the atproto data model")
                has_float = True
            else:
                raise _invalid(f"{kind.__name__} is not an atproto data model type")
        level = below
    return has_float


def _check_special(item: dict[str, Any]) -> None:
    """A ``{"$link": ...}`` or ``{"$bytes": ...}`` object: exactly one key, a string, a blessed CID."""
    if len(item) != 1:
        raise _invalid("a $link or $bytes object must have no other key")
    if "$link" not in item:
        if type(item["$bytes"]) is not str:
            raise _invalid("$bytes must be a base64 string")
        return
    link = item["$link"]
    if type(link) is not str:
        raise _invalid("$link must be a CID string")
    if not is_blessed_cid_string(link):
        raise _invalid(f"link is not a dag-cbor/raw sha2-256 CIDv1: {link[:80]!r}")


def _check_type(item: dict[str, Any]) -> None:
    type_ = item["$type"]
    if type(type_) is not str or not type_:
        raise _invalid("$type must be a non-empty string")
    if type_ != "blob":
        return
    ref, mime, size = item.get("ref"), item.get("mimeType"), item.get("size")
    if (
        item.keys() != _BLOB_KEYS
        or type(mime) is not str
        or "/" not in mime
        or type(size) is not int
        or size < 0
        or type(ref) is not dict
        or len(ref) != 1
        or type(ref.get("$link")) is not str
        or not ref["$link"].startswith(_RAW_LINK_START)
    ):
        raise _invalid("a blob must be exactly $type, ref (a raw CID link), mimeType and size")


def _without_floats(value: Any) -> Any:
    """A copy with integral floats made ints (recursion is bounded: ``_check`` limited the depth)."""
    kind = type(value)
    if kind is float:
        return int(value)
    if kind is dict:
        return {key: _without_floats(item) for key, item in value.items()}
    if kind is list:
        return [_without_floats(item) for item in value]
    return value


def _invalid(message: str) -> ProtocolViolation:
    return ProtocolViolation(message, code="invalid_record")
