"""Syntax validators for AT Protocol identifiers (atproto.com/specs).

Pure and fast: every check is a length test plus one precompiled regex ``fullmatch`` (``fullmatch`` rather
than ``match`` + ``$``, because ``$`` also matches before a trailing newline). They are exercised line by line
against the shared interop vectors in ``../shared/interop-tests/syntax``.

Rules, and where this module is deliberately stricter or looser than a reading of the prose spec:

- DID: ``did:<lowercase method>:<identifier>``, ASCII ``[A-Za-z0-9._:%-]``, not ending in ``:`` or ``%``,
  at most 2048 characters. Percent-escapes are not decoded or checked (as the spec allows).
- Handle: hostname with at least two labels, labels 1-63 of ``[A-Za-z0-9-]`` not starting or ending with a
  hyphen, the last label (TLD) starting with a letter, at most 253 characters.
- NSID: at least three segments; domain labels as for handles but the first one starting with a letter; the
  name segment letters and digits only, starting with a letter; segments at most 63 and the whole at most
  317 characters. The 253-character limit of the domain authority is *not* enforced: the interop vectors
  accept a longer one.
- Record key: 1-512 of ``[A-Za-z0-9._~:-]``, except ``.`` and ``..``.
- TID: 13 characters of base32-sortable, the first one of ``234567abcdefghij`` (top bit clear).
- CID: 8-256 of ``[A-Za-z0-9+=]``, not starting with ``Qm`` (CIDv0 is not accepted; no multibase CIDv1 string
  can start with ``Qm`` because ``Q`` is not a multibase prefix, so this rejects exactly the CIDv0 strings).
- AT-URI (general): ``at://AUTHORITY[/NSID[/RKEY]][#/FRAGMENT]`` where AUTHORITY is a DID or a handle, the
  record key follows the record-key rules, an optional fragment is a JSON pointer starting with ``/``, and
  the whole is at most 8192 characters. A ``?query`` is rejected: the spec reserves it but no atproto
  implementation accepts one, and nothing here needs it.
- Record URI (canonical): exactly ``at://<did>/<nsid>/<rkey>``: a DID (not a handle) authority, no query, no
  fragment, no trailing slash.
- AT identifier: a DID or a handle.
- Datetime: ``YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`` (the intersection of RFC 3339 and ISO 8601 the
  Lexicon spec asks for), at most 64 characters, ``-00:00`` refused, and a real instant: the day exists in
  its month, seconds up to 59 (no leap second, as JavaScript's ``Date`` has none), and in UTC the year is
  still within 0000-9999.
- Language: a BCP 47 tag (RFC 5646 grammar, grandfathered tags included) whose primary subtag is two or
  three lower-case letters, with no variant or extension singleton repeated (case-insensitively), as the
  reference implementation's strict parser checks.
- URI (generic, the Lexicon ``uri`` format): an RFC 3986 scheme (a letter, then letters, digits, ``+``,
  ``-``, ``.``), ``:``, an optional ``//``, then at least one character that is not ``/``; no whitespace
  anywhere; at most 8192 characters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from daemon.errors import SyntaxValidationError

MAX_DID_LENGTH = 2048
MAX_HANDLE_LENGTH = 253
MAX_NSID_LENGTH = 317
MAX_RECORD_KEY_LENGTH = 512
MAX_AT_URI_LENGTH = 8192
MIN_CID_LENGTH = 8
MAX_CID_LENGTH = 256
MAX_DATETIME_LENGTH = 64
MAX_URI_LENGTH = 8192

_DID_RE = re.compile(r"did:[a-z]+:[a-zA-Z0-9._:%-]*[a-zA-Z0-9._-]")
_HANDLE_RE = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\.)+[a-zA-Z](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
)
_NSID_RE = re.compile(
    r"[a-zA-Z](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
    r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)+"
    r"\.[a-zA-Z][a-zA-Z0-9]{0,62}"
)
_RECORD_KEY_RE = re.compile(r"[a-zA-Z0-9_~.:-]{1,512}")
_TID_RE = re.compile(r"[234567abcdefghij][234567abcdefghijklmnopqrstuvwxyz]{12}")
_CID_RE = re.compile(r"[a-zA-Z0-9+=]{8,256}")
# The characters an AT-URI may carry before its fragment, and in its fragment (a JSON pointer).
_AT_URI_CHARS_RE = re.compile(r"[a-zA-Z0-9._~:@!$&')(*+,;=%/-]*")
_AT_URI_FRAGMENT_RE = re.compile(r"/[a-zA-Z0-9._~:@!$&')(*+,;=%\[\]/-]*")

_AT_PREFIX = "at://"

_DATETIME_RE = re.compile(
    r"(?P<year>[0-9]{4})-(?P<month>0[1-9]|1[012])-(?P<day>[0-2][0-9]|3[01])"
    r"T(?P<hour>[01][0-9]|2[0-3]):(?P<minute>[0-5][0-9]):(?P<second>[0-5][0-9]|60)(?:\.[0-9]+)?"
    r"(?:Z|(?P<sign>[+-])(?P<off_hour>[01][0-9]|2[0-3]):(?P<off_minute>[0-5][0-9]))"
)
_DAYS_IN_MONTH = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
# RFC 5646 section 2.1, as the reference implementation writes it (its "language" group is the one whose
# primary subtag the strict check looks at).
_LANGUAGE_RE = re.compile(
    r"(?P<grandfathered>en-GB-oed|i-ami|i-bnn|i-default|i-enochian|i-hak|i-klingon|i-lux|i-mingo|i-navajo"
    r"|i-pwn|i-tao|i-tay|i-tsu|sgn-BE-FR|sgn-BE-NL|sgn-CH-DE|art-lojban|cel-gaulish|no-bok|no-nyn|zh-guoyu"
    r"|zh-hakka|zh-min|zh-min-nan|zh-xiang)"
    r"|(?P<language>[A-Za-z]{2,3}(?:-[A-Za-z]{3}(?:-[A-Za-z]{3}){0,2})?|[A-Za-z]{4}|[A-Za-z]{5,8})"
    r"(?:-[A-Za-z]{4})?(?:-(?:[A-Za-z]{2}|[0-9]{3}))?(?:-(?:[A-Za-z0-9]{5,8}|[0-9][A-Za-z0-9]{3}))*"
    r"(?:-[0-9A-WY-Za-wy-z](?:-[A-Za-z0-9]{2,8})+)*(?:-[xX](?:-[A-Za-z0-9]{1,8})+)?"
    r"|(?P<private>[xX](?:-[A-Za-z0-9]{1,8})+)"
)
_LANGUAGE_PRIMARY_RE = re.compile(r"[a-z]{2,3}")
_EXTLANG_RE = re.compile(r"[A-Za-z]{3}")
_SCRIPT_RE = re.compile(r"[A-Za-z]{4}")
_REGION_RE = re.compile(r"[A-Za-z]{2}|[0-9]{3}")
_VARIANT_RE = re.compile(r"[A-Za-z0-9]{5,8}|[0-9][A-Za-z0-9]{3}")
_SINGLETON_RE = re.compile(r"[0-9A-WYZa-wyz]")
_EXTENSION_RE = re.compile(r"[A-Za-z0-9]{2,8}")
# An RFC 3986 scheme; the reference implementation's ``\w+`` would refuse valid schemes like "content-type".
_URI_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:(?://)?[^\s/]\S*")


@dataclass(frozen=True, slots=True)
class RecordUri:
    """The parts of a canonical record URI ``at://<did>/<collection>/<rkey>``."""

    did: str
    collection: str
    rkey: str


def is_valid_did(value: str) -> bool:
    """Whether ``value`` is a syntactically valid DID (any method)."""
    return len(value) <= MAX_DID_LENGTH and _DID_RE.fullmatch(value) is not None


def is_valid_handle(value: str) -> bool:
    """Whether ``value`` is a syntactically valid handle (a hostname with at least two labels)."""
    return len(value) <= MAX_HANDLE_LENGTH and _HANDLE_RE.fullmatch(value) is not None


def is_valid_nsid(value: str) -> bool:
    """Whether ``value`` is a syntactically valid NSID."""
    return len(value) <= MAX_NSID_LENGTH and _NSID_RE.fullmatch(value) is not None


def is_valid_record_key(value: str) -> bool:
    """Whether ``value`` is a syntactically valid record key."""
    return _RECORD_KEY_RE.fullmatch(value) is not None and value != "." and value != ".."


def is_valid_tid(value: str) -> bool:
    """Whether ``value`` is a syntactically valid TID."""
    return _TID_RE.fullmatch(value) is not None


def is_valid_cid(value: str) -> bool:
    """Whether ``value`` is a syntactically valid (CIDv1) CID string; the bytes are not decoded."""
    return _CID_RE.fullmatch(value) is not None and not value.startswith("Qm")


def is_valid_at_uri(value: str) -> bool:
    """Whether ``value`` is a valid general AT-URI (handle or DID authority, optional fragment)."""
    if len(value) > MAX_AT_URI_LENGTH:
        return False
    uri, hash_sign, fragment = value.partition("#")
    if hash_sign and _AT_URI_FRAGMENT_RE.fullmatch(fragment) is None:
        return False
    if not uri.startswith(_AT_PREFIX) or _AT_URI_CHARS_RE.fullmatch(uri) is None:
        return False
    parts = uri[len(_AT_PREFIX) :].split("/")
    if len(parts) > 3:
        return False
    authority = parts[0]
    if not (is_valid_did(authority) if authority.startswith("did:") else is_valid_handle(authority)):
        return False
    if len(parts) >= 2 and not is_valid_nsid(parts[1]):
        return False
    return len(parts) < 3 or is_valid_record_key(parts[2])


def is_valid_at_identifier(value: str) -> bool:
    """Whether ``value`` is a valid AT identifier: a DID or a handle."""
    return is_valid_did(value) if value.startswith("did:") else is_valid_handle(value)


def is_valid_datetime(value: str) -> bool:
    """Whether ``value`` is a valid atproto datetime, in syntax and as an instant (see the module docstring)."""
    if len(value) > MAX_DATETIME_LENGTH or value.endswith("-00:00"):
        return False
    match = _DATETIME_RE.fullmatch(value)
    if match is None:
        return False
    year, month, day = int(match["year"]), int(match["month"]), int(match["day"])
    leap = month == 2 and year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    if not 1 <= day <= _DAYS_IN_MONTH[month - 1] + leap or match["second"] == "60":
        return False
    if match["sign"] is None:
        return True
    # Only the first and last day of the range can cross a year boundary when moved to UTC.
    offset = int(match["off_hour"]) * 60 + int(match["off_minute"])
    minutes = int(match["hour"]) * 60 + int(match["minute"])
    if match["sign"] == "+" and (year, month, day) == (0, 1, 1):
        return minutes >= offset
    if match["sign"] == "-" and (year, month, day) == (9999, 12, 31):
        return minutes + offset < 24 * 60
    return True


def is_valid_language(value: str) -> bool:
    """Whether ``value`` is a valid BCP 47 language tag (strict, see the module docstring)."""
    match = _LANGUAGE_RE.fullmatch(value)
    if match is None:
        return False
    if match["grandfathered"] is not None or match["private"] is not None:
        return True
    subtags = value.split("-")
    if _LANGUAGE_PRIMARY_RE.fullmatch(subtags[0]) is None:
        return False
    return not _repeats_variant_or_singleton(subtags)


def is_valid_uri(value: str) -> bool:
    """Whether ``value`` is a valid generic URI in the Lexicon ``uri`` format sense."""
    return len(value) <= MAX_URI_LENGTH and _URI_RE.fullmatch(value) is not None


def _repeats_variant_or_singleton(subtags: list[str]) -> bool:
    """RFC 5646 section 4.1: a variant or an extension singleton may appear only once (ignoring case)."""
    index = 1
    while index < min(len(subtags), 4) and _EXTLANG_RE.fullmatch(subtags[index]):
        index += 1
    if index < len(subtags) and _SCRIPT_RE.fullmatch(subtags[index]):
        index += 1
    if index < len(subtags) and _REGION_RE.fullmatch(subtags[index]):
        index += 1
    seen: set[str] = set()
    while index < len(subtags) and _VARIANT_RE.fullmatch(subtags[index]):
        if subtags[index].lower() in seen:
            return True
        seen.add(subtags[index].lower())
        index += 1
    seen.clear()
    while index < len(subtags) and _SINGLETON_RE.fullmatch(subtags[index]):
        if subtags[index].lower() in seen:
            return True
        seen.add(subtags[index].lower())
        index += 1
        while index < len(subtags) and _EXTENSION_RE.fullmatch(subtags[index]):
            index += 1
    return False


def parse_record_uri(uri: str) -> RecordUri:
    """Split a canonical record URI ``at://<did>/<nsid>/<rkey>`` into its parts.

    Raises SyntaxValidationError for anything else: a handle authority, a query or fragment, a missing or
    extra path segment, or a part that fails its own syntax.
    """
    if len(uri) > MAX_AT_URI_LENGTH or not uri.startswith(_AT_PREFIX):
        raise SyntaxValidationError(f"not an at:// record URI: {_preview(uri)}")
    parts = uri[len(_AT_PREFIX) :].split("/")
    if len(parts) != 3:
        raise SyntaxValidationError(f"record URI must be at://<did>/<collection>/<rkey>: {_preview(uri)}")
    did, collection, rkey = parts
    if not is_valid_did(did):
        raise SyntaxValidationError(f"record URI authority is not a valid DID: {_preview(uri)}")
    if not is_valid_nsid(collection):
        raise SyntaxValidationError(f"record URI collection is not a valid NSID: {_preview(uri)}")
    if not is_valid_record_key(rkey):
        raise SyntaxValidationError(f"record URI record key is not valid: {_preview(uri)}")
    return RecordUri(did, collection, rkey)


def _preview(value: str, limit: int = 120) -> str:
    """``repr`` of an attacker-controlled string, cut short so that it cannot flood a log line."""
    if len(value) <= limit:
        return repr(value)
    return repr(value[:limit]) + f"... ({len(value)} chars)"
