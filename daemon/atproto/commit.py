"""The signed repo commit: decoding it, checking it, verifying and making its signature (SPEC 6.2 step 1).

A v3 commit is the DAG-CBOR map ``{did, version: 3, data, rev, prev, sig}``: ``data`` is the CID of the MST
root, ``rev`` a TID, ``prev`` a CID or null (kept for v2 compatibility, not followed), ``sig`` the 64-byte
compact signature over the DAG-CBOR encoding of the same map without ``sig``.

Fields beyond these six are ignored, and the signature is checked over the five known fields alone, as the
reference implementation does (its schema drops unknown keys before ``verifyCommitSig`` re-encodes the
commit). Version 2 and older commits are refused: current PDSes write v3 only.

Error codes (ProtocolViolation): ``invalid_cbor`` (the block is not canonical DAG-CBOR), ``invalid_commit``
(structure, version, or another account's DID), ``invalid_signature`` (malformed, high-S, or not made by
the account's key).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from daemon.atproto.cbor import Link, decode_dag_cbor, encode_dag_cbor
from daemon.atproto.cid import Cid, cid_for_block, is_dag_cbor_cid
from daemon.atproto.keys import PrivateKey, PublicKey
from daemon.atproto.syntax import is_valid_tid
from daemon.errors import ProtocolViolation

COMMIT_VERSION = 3


@dataclass(frozen=True, slots=True)
class Commit:
    """A decoded, structurally checked commit (its signature not yet verified)."""

    did: str
    version: int
    data: Cid
    rev: str
    prev: Cid | None
    sig: bytes

    def unsigned_bytes(self) -> bytes:
        """The bytes the signature covers: the DAG-CBOR encoding of the commit without ``sig``."""
        return _unsigned_bytes(self.did, self.data, self.rev, self.prev)


def decode_commit(block: bytes, *, did: str) -> Commit:
    """Decode and check a commit block of the account ``did``.

    Raises ProtocolViolation ``invalid_cbor`` or ``invalid_commit``.
    """
    value = decode_dag_cbor(block)
    if type(value) is not dict:
        raise _invalid("commit is not a map")
    commit_did = value.get("did")
    version = value.get("version")
    if type(version) is not int or version != COMMIT_VERSION:
        raise _invalid(f"commit version is {_preview(version)}, only version {COMMIT_VERSION} is supported")
    if type(commit_did) is not str:
        raise _invalid("commit did is not a string")
    if commit_did != did:
        raise _invalid(f"commit is signed for {commit_did[:120]!r}, not {did}")
    data = _link(value, "data")
    if "prev" not in value:
        raise _invalid("commit has no prev (it may be null, not absent)")
    prev = None if value["prev"] is None else _link(value, "prev")
    rev = value.get("rev")
    if type(rev) is not str or not is_valid_tid(rev):
        raise _invalid(f"commit rev is not a TID: {_preview(rev)}")
    sig = value.get("sig")
    if type(sig) is not bytes:
        raise _invalid("commit sig is not a byte string")
    return Commit(commit_did, version, data, rev, prev, sig)


def verify_commit(commit: Commit, key: PublicKey) -> None:
    """Check the commit's signature under the account's key; raises ProtocolViolation ``invalid_signature``."""
    if len(commit.sig) != 64:
        raise ProtocolViolation(
            f"commit signature is {len(commit.sig)} bytes, not a 64-byte compact signature",
            code="invalid_signature",
        )
    if not key.verify(commit.unsigned_bytes(), commit.sig):
        raise ProtocolViolation(
            f"commit signature of {commit.did} does not verify under its {key.curve} key (or is high-S)",
            code="invalid_signature",
        )


def sign_commit(
    *, did: str, data: Cid, rev: str, key: PrivateKey, prev: Cid | None = None
) -> tuple[Cid, bytes]:
    """Make a signed v3 commit (for the simulated network and tests): ``(commit CID, commit block)``."""
    sig = key.sign(_unsigned_bytes(did, data, rev, prev))
    block = encode_dag_cbor(_fields(did, data, rev, prev) | {"sig": sig})
    return cid_for_block(block), block


def _unsigned_bytes(did: str, data: Cid, rev: str, prev: Cid | None) -> bytes:
    return encode_dag_cbor(_fields(did, data, rev, prev))


def _fields(did: str, data: Cid, rev: str, prev: Cid | None) -> dict[str, Any]:
    return {
        "did": did,
        "version": COMMIT_VERSION,
        "data": Link(data),
        "rev": rev,
        "prev": None if prev is None else Link(prev),
    }


def _link(value: dict[str, Any], name: str) -> Cid:
    link = value.get(name)
    if type(link) is not Link or not is_dag_cbor_cid(link):
        raise _invalid(f"commit {name} is not a dag-cbor sha2-256 CID link")
    return bytes(link)


def _preview(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."


def _invalid(message: str) -> ProtocolViolation:
    return ProtocolViolation(message, code="invalid_commit")
