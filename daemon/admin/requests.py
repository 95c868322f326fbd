"""Validation of admin API request bodies and query strings (SPEC 5), pure.

Every problem raises RequestValidationError whose message is shown to the client verbatim with HTTP 400.
The ``POST /_admin/backfill`` messages are the seed's, word for word. Decisions beyond the SPEC:

- Bodies are UTF-8 JSON (no BOM); ``NaN``/``Infinity`` and nesting too deep to parse count as invalid JSON.
- Unknown top-level fields of any body are rejected (``unknown field: "<name>"``) so that a typo such as
  ``"did"`` for ``"dids"`` cannot silently start a discovery run instead. Unknown query parameters are
  rejected the same way (``unknown query parameter: "<name>"``).
- Only ``POST /_admin/backfill`` accepts an empty body (meaning discover); the other bodies are required.
- ``collections`` must be a non-empty array of configured NSIDs; de-duplicated, first seen wins.
- Integers must be JSON integers (``true`` is not ``1``, ``1.0`` is not ``1``) and fit a signed 64-bit
  integer (SQLite's).
- An id in a URL path (``/_admin/runs/<id>``) past that range names nothing: 404, like any unknown id.
- In query strings an empty value (``?state=``) is the same as an absent parameter, so that a client may fill
  a fixed template; integers there are plain ASCII digits (no sign, spaces or underscores).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, NamedTuple, TypeGuard

from daemon.atproto.syntax import is_valid_did
from daemon.errors import RequestValidationError

JOB_STATES = ("pending", "running", "done", "failed", "cancelled")
RETRYABLE_STATES = ("failed", "cancelled")
MAX_RETRY_IDS = 1000
MAX_PAGE_LIMIT = 1000
DEFAULT_PAGE_LIMIT = 100
MAX_INT64 = 2**63 - 1

INVALID_JSON = "request body must be valid JSON"
NOT_AN_OBJECT = "request body must be a JSON object"
DIDS_NOT_ARRAY = "`dids` must be an array of DID strings, or omitted to discover via the relay"
DIDS_EMPTY = "`dids` must not be empty (omit the field to discover via the relay)"
FULL_NOT_BOOLEAN = "`full` must be true or false"
COLLECTIONS_NOT_ARRAY = "`collections` must be a non-empty array of configured collection NSIDs"

_BACKFILL_FIELDS = ("dids", "collections", "full")
_RETRY_FIELDS = ("ids", "state", "run_id")
_ACK_FIELDS = ("through",)
_JSON_WHITESPACE = " \t\r\n"


@dataclass(frozen=True, slots=True)
class BackfillRequest:
    """A validated ``POST /_admin/backfill`` body."""

    mode: Literal["discover", "explicit"]
    dids: tuple[str, ...]
    collections: tuple[str, ...]
    full: bool = False


@dataclass(frozen=True, slots=True)
class RetryRequest:
    """A validated ``POST /_admin/jobs/retry`` body: either ``ids``, or ``state`` (and maybe ``run_id``)."""

    ids: tuple[int, ...] | None
    state: str | None
    run_id: int | None


class PageQuery(NamedTuple):
    """Validated paging parameters of an id-ordered list (a tuple, so that ``after, limit = ...`` works)."""

    after: int
    limit: int


class PublishersQuery(NamedTuple):
    """Validated paging parameters of the DID-ordered publishers list; ``after`` is "" for the first page."""

    after: str
    limit: int


@dataclass(frozen=True, slots=True)
class JobsQuery:
    """Validated ``GET /_admin/jobs`` parameters."""

    state: str | None
    run_id: int | None
    after: int
    limit: int


def is_row_id(value: int) -> bool:
    """Whether ``value`` (an id taken from a URL path) can name a row: positive and within int64."""
    return 1 <= value <= MAX_INT64


def parse_backfill_request(
    raw: bytes, *, configured_collections: tuple[str, ...], max_backfill_dids: int
) -> BackfillRequest:
    """Validate a ``POST /_admin/backfill`` body; an empty body or ``{}`` means discover all collections."""
    text = _decode(raw)
    if text.strip(_JSON_WHITESPACE) == "":
        return BackfillRequest("discover", (), configured_collections)
    body = _load_object(text, _BACKFILL_FIELDS)
    dids = _parse_dids(body["dids"], max_backfill_dids) if "dids" in body else None
    collections = configured_collections
    if "collections" in body:
        collections = _parse_collections(body["collections"], configured_collections)
    full = body.get("full", False)
    if not isinstance(full, bool):
        raise RequestValidationError(FULL_NOT_BOOLEAN)
    if dids is None:
        return BackfillRequest("discover", (), collections, full)
    return BackfillRequest("explicit", dids, collections, full)


def parse_retry_request(raw: bytes) -> RetryRequest:
    """Validate a ``POST /_admin/jobs/retry`` body: ``{"ids": [...]}`` or ``{"state": "failed", "run_id"?}``.

    ``ids`` holds 1 to 1000 positive job ids, de-duplicated in order. ``state`` may also be ``"cancelled"``
    (the store retries failed and cancelled jobs alike).
    """
    body = _load_object(_decode(raw), _RETRY_FIELDS)
    if "ids" in body:
        if "state" in body or "run_id" in body:
            raise RequestValidationError(
                "give either `ids`, or `state` (with an optional `run_id`), not both"
            )
        ids = body["ids"]
        if not isinstance(ids, list) or not 1 <= len(ids) <= MAX_RETRY_IDS:
            raise RequestValidationError(f"`ids` must be an array of 1 to {MAX_RETRY_IDS} job ids")
        unique: dict[int, None] = {}
        for value in ids:
            if not _is_int_in(value, 1):
                raise RequestValidationError(f"invalid job id: {_json(value)}")
            unique.setdefault(value, None)
        return RetryRequest(tuple(unique), None, None)
    if "state" not in body:
        raise RequestValidationError('request body must give `ids`, or `state` ("failed" or "cancelled")')
    state = body["state"]
    if not isinstance(state, str) or state not in RETRYABLE_STATES:
        raise RequestValidationError('`state` must be "failed" or "cancelled"')
    if "run_id" not in body:
        return RetryRequest(None, state, None)
    run_id = body["run_id"]
    if not _is_int_in(run_id, 1):
        raise RequestValidationError("`run_id` must be a positive integer")
    return RetryRequest(None, state, run_id)


def parse_ack_request(raw: bytes) -> int:
    """Validate a ``POST /_admin/records/ack`` body ``{"through": <id>}`` and return the id."""
    body = _load_object(_decode(raw), _ACK_FIELDS)
    through = body.get("through")
    if not _is_int_in(through, 0):
        raise RequestValidationError("`through` must be a non-negative integer")
    return through


def parse_page_query(args: Mapping[str, str]) -> PageQuery:
    """Validate ``after`` (an id, default 0) and ``limit`` (1..1000, default 100) of an id-ordered list."""
    _reject_unknown_params(args, ("after", "limit"))
    return PageQuery(_after_id(args), _limit(args))


def parse_jobs_query(args: Mapping[str, str]) -> JobsQuery:
    """Validate ``GET /_admin/jobs`` parameters: ``state``, ``run_id``, ``after`` and ``limit``."""
    _reject_unknown_params(args, ("state", "run_id", "after", "limit"))
    state = args.get("state") or None
    if state is not None and state not in JOB_STATES:
        raise RequestValidationError(f"`state` must be one of {', '.join(JOB_STATES)}")
    run_id: int | None = None
    if args.get("run_id"):
        run_id = _query_int(args, "run_id", 0, 1, MAX_INT64)
        if run_id is None:
            raise RequestValidationError("`run_id` must be a positive integer")
    return JobsQuery(state, run_id, _after_id(args), _limit(args))


def parse_publishers_query(args: Mapping[str, str]) -> PublishersQuery:
    """Validate ``GET /_admin/publishers`` parameters: ``after`` (a DID cursor, default "") and ``limit``."""
    _reject_unknown_params(args, ("after", "limit"))
    after = args.get("after", "")
    if after and not is_valid_did(after):
        raise RequestValidationError("`after` must be a DID (the cursor of the previous page)")
    return PublishersQuery(after, _limit(args))


def _reject_unknown_params(args: Mapping[str, str], allowed: tuple[str, ...]) -> None:
    for name in args:
        if name not in allowed:
            raise RequestValidationError(f"unknown query parameter: {_json(name)}")


def _limit(args: Mapping[str, str]) -> int:
    limit = _query_int(args, "limit", DEFAULT_PAGE_LIMIT, 1, MAX_PAGE_LIMIT)
    if limit is None:
        raise RequestValidationError(f"`limit` must be an integer from 1 to {MAX_PAGE_LIMIT}")
    return limit


def _after_id(args: Mapping[str, str]) -> int:
    after = _query_int(args, "after", 0, 0, MAX_INT64)
    if after is None:
        raise RequestValidationError("`after` must be a non-negative integer")
    return after


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestValidationError(INVALID_JSON) from None


def _load_object(text: str, fields: tuple[str, ...]) -> dict[str, object]:
    """Parse ``text`` as a JSON object with no keys beyond ``fields``."""
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        # ValueError covers JSONDecodeError, NaN/Infinity and integers too long to convert.
        raise RequestValidationError(INVALID_JSON) from None
    if not isinstance(value, dict):
        raise RequestValidationError(NOT_AN_OBJECT)
    for key in value:
        if key not in fields:
            raise RequestValidationError(f"unknown field: {_json(key)}")
    return value


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _parse_dids(value: object, cap: int) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise RequestValidationError(DIDS_NOT_ARRAY)
    if not value:
        raise RequestValidationError(DIDS_EMPTY)
    if len(value) > cap:
        raise RequestValidationError(f"`dids` must contain at most {cap} entries (got {len(value)})")
    unique: dict[str, None] = {}
    for item in value:
        if not isinstance(item, str) or not is_valid_did(item):
            raise RequestValidationError(f"invalid DID in list: {_json(item)}")
        unique.setdefault(item, None)
    return tuple(unique)


def _parse_collections(value: object, configured: tuple[str, ...]) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise RequestValidationError(COLLECTIONS_NOT_ARRAY)
    unique: dict[str, None] = {}
    for item in value:
        if not isinstance(item, str):
            raise RequestValidationError(COLLECTIONS_NOT_ARRAY)
        if item not in configured:
            raise RequestValidationError(f"collection not configured: {_json(item)}")
        unique.setdefault(item, None)
    # the configured order, which ordered_collections follows (SPEC 6.4)
    return tuple(c for c in configured if c in unique)


def _is_int_in(value: object, minimum: int) -> TypeGuard[int]:
    """Whether ``value`` is a JSON integer (not a boolean) from ``minimum`` to the int64 maximum."""
    return isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= MAX_INT64


def _query_int(args: Mapping[str, str], name: str, default: int, minimum: int, maximum: int) -> int | None:
    """The integer value of query parameter ``name``, ``default`` if absent or empty, None if invalid."""
    text = args.get(name, "")
    if text == "":
        return default
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        return None
    number = int(text)
    return number if minimum <= number <= maximum else None


def _json(value: object) -> str:
    """``json.dumps`` of a value taken from a request, for an error message."""
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)  # as JSON.stringify writes it
    except RecursionError:
        return "<value nested too deeply to show>"
