"""Deterministic identifiers of the simulated network: DIDs, handles and TIDs.

Everything is derived from indices with SHA-256, so the same spec always names the same accounts.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Final

TID_ALPHABET: Final = "234567abcdefghijklmnopqrstuvwxyz"
# Record n of a pair is stamped TID_EPOCH_US + n * TID_STEP_US (2023-11-14, one second apart).
TID_EPOCH_US: Final = 1_700_000_000_000_000
TID_STEP_US: Final = 1_000_000
# Commit number g of an account has the rev TID REV_EPOCH_US + g * TID_STEP_US (2024-03-09).
REV_EPOCH_US: Final = 1_710_000_000_000_000
WEB_PLACEHOLDER_SUFFIX: Final = ".simnet.invalid"
HANDLE_SUFFIX: Final = ".simnet.test"
# Collection and DID that junk records (and commits of the commit_other_did mode) name.
FOREIGN_COLLECTION: Final = "com.example.simnet.foreign"
FOREIGN_DID: Final = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"

_RFC4648: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_FROM_SORTABLE: Final = bytes.maketrans(TID_ALPHABET.encode(), _RFC4648.encode())
# Two base32 digits per 10-bit value: encoding by table lookups is several times faster than b32encode.
_TID_PAIRS: Final = tuple(TID_ALPHABET[i >> 5] + TID_ALPHABET[i & 31] for i in range(1024))


def digest(text: str) -> bytes:
    """SHA-256 of ``text`` (UTF-8): the source of every derived identifier and value."""
    return hashlib.sha256(text.encode()).digest()


def plc_did(index: int) -> str:
    """The did:plc of account ``index``: 24 base32 characters derived from the index."""
    return "did:plc:" + base64.b32encode(digest(f"simnet-plc:{index}")).decode().lower()[:24]


def web_placeholder_did(index: int) -> str:
    """The placeholder DID of did:web account ``index`` before its listener's port is known."""
    return f"did:web:web{index}{WEB_PLACEHOLDER_SUFFIX}"


def web_did_for_port(port: int) -> str:
    """The did:web that a listener on 127.0.0.1:``port`` serves (``localhost`` with an encoded port)."""
    return f"did:web:localhost%3A{port}"


def handle_for(did: str) -> str:
    """A deterministic handle for ``did`` (used in ``alsoKnownAs``)."""
    return "h" + hashlib.sha256(did.encode()).hexdigest()[:12] + HANDLE_SUFFIX


def tid_from_int(value: int) -> str:
    """Encode a 63-bit integer as a 13-character TID in the base32-sortable alphabet."""
    pairs = _TID_PAIRS
    return (
        TID_ALPHABET[(value >> 60) & 31]
        + pairs[(value >> 50) & 1023]
        + pairs[(value >> 40) & 1023]
        + pairs[(value >> 30) & 1023]
        + pairs[(value >> 20) & 1023]
        + pairs[(value >> 10) & 1023]
        + pairs[value & 1023]
    )


def tid_to_int(tid: str) -> int | None:
    """Decode a 13-character TID (None if ``tid`` is not 13 sortable-base32 chars starting in 2-j)."""
    if len(tid) != 13 or not tid.isascii() or tid.strip(TID_ALPHABET) or tid[0] not in TID_ALPHABET[:16]:
        return None
    # Three all-zero base32 digits in front make the 65 TID bits a whole number of bytes.
    raw = base64.b32decode(b"AAA" + tid.encode().translate(_FROM_SORTABLE))
    return int.from_bytes(raw, "big")


def clock_id(text: str) -> int:
    """A deterministic 10-bit TID clock identifier for ``text``."""
    return int.from_bytes(digest(text)[:2], "big") & 0x3FF


def rev_for(did: str, generation: int) -> str:
    """The rev (a TID) of commit number ``generation`` of the account ``did`` (later commits sort later)."""
    return tid_from_int(((REV_EPOCH_US + generation * TID_STEP_US) << 10) | clock_id(f"rev|{did}"))
