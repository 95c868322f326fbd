"""Parsers for the pages the relay and PDSes answer with (SPEC 6).

Pure: they take the body and return a frozen value or raise ProtocolViolation. The caller owns everything
that spans pages (repeated cursor, page count, the first-page 404 rule).

``com.atproto.repo.listRecords`` (:func:`parse_list_records_page`) takes the raw body and decodes it with a
typed msgspec decoder: no Python object is built for anything but the fields it reads, and each record's
``value`` stays the raw JSON bytes it was (:class:`msgspec.Raw`), so a hostile body costs a bounded multiple
of its size (the caller reserves that from the memory budget first):

- the body must be an object with a ``records`` array, else ``bad_response``;
- more than ``page_size`` records is ``page_too_large``: the page is rejected whole, never chunked;
- every entry must be an object with a string ``uri`` and a string ``cid``, else the *whole page* is
  ``bad_response`` (as the seed does): a PDS that sends such a page is broken, and skipping would hide it;
- ``cursor`` absent, ``null`` or a string; an empty string means "end" like an absent one; anything else, or a
  cursor longer than ``MAX_CURSOR_LENGTH``, is ``bad_response`` (a cursor is saved durably and sent back in a
  URL, so a hostile one must stay small);
- a well-formed entry whose ``uri`` is not a canonical ``at://<did>/<collection>/<rkey>``, names another DID
  or collection, has an invalid record key, or whose ``cid`` is not a valid CID string, is *skipped*: counted
  in ``skipped`` with its reason in ``skipped_reasons``; the rest of the page is kept.

``com.atproto.sync.listReposByCollection`` (:func:`parse_list_repos_page`):

- the body must be an object with a ``repos`` array, else ``bad_response``;
- entries that are not objects, lack a string ``did``, or whose ``did`` is not a valid DID are skipped;
- ``cursor`` as above. DIDs are returned in page order, duplicates included: the caller de-duplicates
  across pages anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import msgspec

from daemon.atproto.syntax import is_valid_cid, is_valid_did, is_valid_record_key, parse_record_uri
from daemon.errors import Code, ProtocolViolation, SyntaxValidationError

MAX_CURSOR_LENGTH = 4096

# Reasons a listRecords entry is skipped; short and stable because they end up in logs and metrics.
SKIP_INVALID_URI = "invalid_uri"
SKIP_OTHER_DID = "other_did"
SKIP_OTHER_COLLECTION = "other_collection"
SKIP_INVALID_RKEY = "invalid_rkey"
SKIP_INVALID_CID = "invalid_cid"


@dataclass(frozen=True, slots=True)
class RecordRef:
    """One record of a listRecords page: its key, CID and value (raw JSON bytes; None when absent)."""

    rkey: str
    cid: str
    value: bytes | None = None


_ABSENT = msgspec.Raw(b"")


class _Entry(msgspec.Struct):
    uri: str
    cid: str
    value: msgspec.Raw = _ABSENT


class _RecordsBody(msgspec.Struct):
    records: list[_Entry]
    cursor: str | None = None


_RECORDS_DECODER = msgspec.json.Decoder(_RecordsBody)


@dataclass(frozen=True, slots=True)
class RecordsPage:
    """A validated listRecords page.

    ``skipped_reasons`` holds each distinct skip reason once, in the order first seen. ``present`` holds
    the record keys of the pair's own records that were skipped (an invalid CID string): they are still in
    the collection, so reconcile must not take them for deleted.
    """

    records: tuple[RecordRef, ...]
    cursor: str | None
    skipped: int
    skipped_reasons: tuple[str, ...]
    present: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ReposPage:
    """A validated listReposByCollection page."""

    dids: tuple[str, ...]
    cursor: str | None
    skipped: int


def parse_list_records_page(
    body: bytes | bytearray, *, did: str, collection: str, page_size: int
) -> RecordsPage:
    """Validate a raw listRecords body for the pair (``did``, ``collection``), both already valid.

    Raises ProtocolViolation (``bad_response`` or ``page_too_large``) for a page that breaks the protocol.
    """
    try:
        page = _RECORDS_DECODER.decode(body)
    except msgspec.ValidationError as exc:
        raise ProtocolViolation(f"listRecords body does not have the expected shape: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ProtocolViolation(f"listRecords body is not valid JSON: {exc}") from None
    except RecursionError:
        # msgspec refuses nesting deeper than ~1000 levels (even inside a skipped ``value``) this way
        raise ProtocolViolation("listRecords body is nested too deeply to decode") from None
    cursor = _checked_cursor(page.cursor, "listRecords")
    if len(page.records) > page_size:
        raise ProtocolViolation(
            f"listRecords page has {len(page.records)} records, more than the limit of {page_size}",
            code=Code.PAGE_TOO_LARGE,
        )
    # Every well-formed URI for this pair starts with this prefix, so the common case costs one
    # startswith and one record-key match; only the odd entry goes through the full parser.
    prefix = _uri_prefix(did, collection)
    prefix_length = len(prefix)
    refs: list[RecordRef] = []
    reasons: list[str] = []
    present: list[str] = []
    skipped = 0
    for entry in page.records:
        uri, cid = entry.uri, entry.cid
        reason: str | None = None
        if uri.startswith(prefix):
            rkey = uri[prefix_length:]
            if not is_valid_record_key(rkey):
                reason = SKIP_INVALID_RKEY
        else:
            rkey = ""
            reason = _foreign_uri_reason(uri, did)
        if reason is None and not is_valid_cid(cid):
            reason = SKIP_INVALID_CID
            present.append(rkey)
        if reason is None:
            refs.append(RecordRef(rkey, cid, bytes(entry.value) if len(entry.value) else None))
        else:
            skipped += 1
            if reason not in reasons:
                reasons.append(reason)
    return RecordsPage(tuple(refs), cursor, skipped, tuple(reasons), tuple(present))


@lru_cache(maxsize=256)
def _uri_prefix(did: str, collection: str) -> str:
    return f"at://{did}/{collection}/"


def parse_list_repos_page(body: object) -> ReposPage:
    """Validate a decoded listReposByCollection body.

    Raises ProtocolViolation (``bad_response``) when the body is not an object with a ``repos`` array or the
    cursor is not a string.
    """
    if not isinstance(body, dict):
        raise ProtocolViolation(f"listReposByCollection body is {_json_type(body)}, not an object")
    repos = body.get("repos")
    if not isinstance(repos, list):
        raise ProtocolViolation(
            f"listReposByCollection `repos` is {_json_type(repos, body, 'repos')}, not an array"
        )
    cursor = _parse_cursor(body, "listReposByCollection")
    dids: list[str] = []
    skipped = 0
    for entry in repos:
        did = entry.get("did") if isinstance(entry, dict) else None
        if isinstance(did, str) and is_valid_did(did):
            dids.append(did)
        else:
            skipped += 1
    return ReposPage(tuple(dids), cursor, skipped)


def _foreign_uri_reason(uri: str, did: str) -> str:
    """Why a record URI that does not start with the pair's prefix is skipped."""
    try:
        parsed = parse_record_uri(uri)
    except SyntaxValidationError:
        return SKIP_INVALID_URI
    return SKIP_OTHER_DID if parsed.did != did else SKIP_OTHER_COLLECTION


def _parse_cursor(body: dict[object, object], what: str) -> str | None:
    cursor = body.get("cursor")
    if cursor is not None and not isinstance(cursor, str):
        raise ProtocolViolation(f"{what} `cursor` is {_json_type(cursor)}, not a string")
    return _checked_cursor(cursor, what)


def _checked_cursor(cursor: str | None, what: str) -> str | None:
    if cursor is None:
        return None
    if len(cursor) > MAX_CURSOR_LENGTH:
        raise ProtocolViolation(f"{what} `cursor` is {len(cursor)} characters, over {MAX_CURSOR_LENGTH}")
    return cursor or None


def _json_type(value: object, container: dict[object, object] | None = None, key: str = "") -> str:
    """The JSON name of a decoded value's type, for messages that must not echo attacker data.

    With ``container`` and ``key``, a key that is not there at all reads "missing" rather than "null".
    """
    if container is not None and key not in container:
        return "missing"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
