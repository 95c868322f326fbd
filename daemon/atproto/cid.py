"""CIDs the way atproto uses them: binary form, the ``b...`` string form, and block verification.

A CID is handled as its raw binary form (``bytes``, without the ``0x00`` multibase prefix DAG-CBOR puts in
front of it). Only the "blessed" atproto CIDs are accepted anywhere: CIDv1, codec dag-cbor (``0x71``) or raw
(``0x55``), multihash sha2-256 (``0x12``) with a 32-byte digest. That makes every accepted CID exactly 36
bytes with one of two 4-byte prefixes, so the checks are a length test and a prefix comparison rather than
a varint parse. CIDv0 (``Qm...`` / ``0x12 0x20 ...``) and every other codec or hash are refused.

Error codes: ``cid_mismatch`` (ProtocolViolation) when a block's bytes do not hash to its CID; a CID string
that does not parse is a SyntaxValidationError.
"""

from __future__ import annotations

import hashlib
import re
from typing import TypeAlias

import libipld

from daemon.errors import ProtocolViolation, SyntaxValidationError

Cid: TypeAlias = bytes
"""A CID in raw binary form (36 bytes for every CID this module accepts)."""

DAG_CBOR = 0x71
RAW = 0x55
SHA2_256 = 0x12
CID_LENGTH = 36

DAG_CBOR_PREFIX = bytes((0x01, DAG_CBOR, SHA2_256, 0x20))
RAW_PREFIX = bytes((0x01, RAW, SHA2_256, 0x20))

# Lowercase base32 (RFC 4648 alphabet), unpadded: 36 bytes are 58 characters after the "b".
_CID_STRING_RE = re.compile(r"b[a-z2-7]{58}")
_DAG_CBOR_STRING_START = "bafyrei"
_RAW_STRING_START = "bafkrei"
_AFTER_PREFIX = frozenset("abcdefgh")
_LAST_CHARACTER = frozenset("aeimquy4")


def is_blessed_cid(cid: bytes) -> bool:
    """Whether ``cid`` is a CIDv1 dag-cbor or raw CID with a sha2-256 digest."""
    return len(cid) == CID_LENGTH and (cid[:4] == DAG_CBOR_PREFIX or cid[:4] == RAW_PREFIX)


def is_dag_cbor_cid(cid: bytes) -> bool:
    """Whether ``cid`` is a CIDv1 dag-cbor sha2-256 CID (what commits, MST nodes and records have)."""
    return len(cid) == CID_LENGTH and cid[:4] == DAG_CBOR_PREFIX


def format_cid(cid: bytes) -> str:
    """The canonical string form of a blessed CID: ``b`` + lowercase unpadded base32 of the binary CID."""
    # libipld (Rust) is some fifteen times faster here than base64.b32encode.
    text: str = libipld.encode_cid(cid)
    return text


def is_blessed_cid_string(text: str) -> bool:
    """Whether ``text`` is the canonical string of a blessed CID, decided on the string alone.

    After ``b``, 58 base32 characters carry 290 bits for 288: the last character's two low bits must be 0
    (``a e i m q u y 4``), or two strings would name one CID. The 4-byte prefix fills the first 6 characters
    and the top two bits of the 7th (so that one is ``a``-``h``).
    """
    return (
        _CID_STRING_RE.fullmatch(text) is not None
        and (text.startswith(_DAG_CBOR_STRING_START) or text.startswith(_RAW_STRING_START))
        and text[7] in _AFTER_PREFIX
        and text[-1] in _LAST_CHARACTER
    )


def parse_cid(text: str) -> Cid:
    """Parse a CID string into its binary form; only the canonical string of a blessed CID is accepted.

    Raises SyntaxValidationError for anything else (another multibase, upper case, CIDv0, another codec
    or hash, non-canonical trailing bits).
    """
    if not is_blessed_cid_string(text):
        raise SyntaxValidationError(f"not the string of a dag-cbor/raw sha2-256 CIDv1: {text[:80]!r}")
    digest: bytes = libipld.decode_cid(text)["hash"]["digest"]
    return (DAG_CBOR_PREFIX if text.startswith(_DAG_CBOR_STRING_START) else RAW_PREFIX) + digest


def cid_for_block(data: bytes, codec: int = DAG_CBOR) -> Cid:
    """The CID of a block's bytes under ``codec`` (dag-cbor unless told otherwise)."""
    prefix = DAG_CBOR_PREFIX if codec == DAG_CBOR else RAW_PREFIX if codec == RAW else None
    if prefix is None:
        raise ValueError(f"unsupported codec 0x{codec:x}")
    return prefix + hashlib.sha256(data).digest()


def verify_block(cid: bytes, data: bytes) -> None:
    """Check that ``data`` hashes to ``cid``; raises ProtocolViolation ``cid_mismatch`` if not.

    ``cid`` must be a blessed CID (the CAR reader and the MST walk only hand those on); another one is a
    mismatch too, since nothing could ever match it.
    """
    if not is_blessed_cid(cid) or hashlib.sha256(data).digest() != cid[4:]:
        raise ProtocolViolation(
            f"block bytes do not hash to their CID {_cid_preview(cid)}", code="cid_mismatch"
        )


def _cid_preview(cid: bytes) -> str:
    """A CID for an error message: its string when it is well-formed, else a short hex dump."""
    return format_cid(cid) if is_blessed_cid(cid) else cid[:40].hex()
