"""What each simulated service answers: pure request -> action logic, with the hostile modes.

A handler turns ``(path, query)`` into an :data:`Action` describing the response (a complete reply, a
streamed body, a hang or a dropped connection); the HTTP layer (:mod:`daemon.simnet.http11`) carries it
out. Handlers keep the little state some hostile modes need (which pages already failed once, how many
429s a pair has had), which :meth:`PdsHandler.reset` clears. Page bodies are rendered from string
templates and cached, because the benchmark pushes thousands of pages per second through here.
"""

from __future__ import annotations

import bisect
import email.utils
import functools
import json
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol, TypeAlias
from urllib.parse import parse_qs, unquote

from daemon.simnet.model import (
    FOREIGN_COLLECTION,
    FOREIGN_DID,
    JUNK_KINDS,
    PDS_BEHAVIOURS,
    RATE_LIMIT_BEHAVIOURS,
    TID_EPOCH_US,
    TID_STEP_US,
    Account,
    NetworkSpec,
    effective_behaviour,
    handle_for,
    junk_per_page,
    multibase_key,
    pair_keys,
    param_bool,
    param_float,
    param_int,
    param_str,
    rate_limit_times,
    record_created_at,
    records_before,
    relay_dids,
    tid_from_int,
    tid_to_int,
)

JSON: Final = b"application/json; charset=utf-8"
HTML: Final = b"text/html; charset=utf-8"
LIST_RECORDS: Final = "/xrpc/com.atproto.repo.listRecords"
LIST_REPOS_BY_COLLECTION: Final = "/xrpc/com.atproto.sync.listReposByCollection"
REDIRECT_TARGET: Final = "/redirect-target"
WELL_KNOWN_DID: Final = "/.well-known/did.json"
DEFAULT_PAGE_LIMIT: Final = 50
DEFAULT_RELAY_LIMIT: Final = 500
MIB: Final = 1_048_576
# About 64 KiB of a record that never closes the array: pds_huge repeats it to the size asked for.
HUGE_FILLER: Final = b'{"uri":"at://did:plc:huge/x.y.z/3aaaaaaaaaaaa","cid":"bafyreihuge"},' * 1000


@dataclass(frozen=True, slots=True)
class Reply:
    """A complete response with a ``Content-Length``."""

    status: int
    body: bytes
    content_type: bytes = JSON
    headers: tuple[tuple[bytes, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class Stream:
    """A 200 response whose body is ``head``, ``filler`` sent ``repeat`` times with ``interval`` seconds
    before each, then ``tail``; chunked unless ``declare_length``."""

    head: bytes
    filler: bytes
    repeat: int
    tail: bytes
    interval: float
    declare_length: bool
    content_type: bytes = JSON

    @property
    def size(self) -> int:
        """The length of the whole body."""
        return len(self.head) + len(self.filler) * self.repeat + len(self.tail)


@dataclass(frozen=True, slots=True)
class Hang:
    """Never answer: hold the connection until the client gives up."""


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Close the connection without answering."""


Action: TypeAlias = Reply | Stream | Hang | Disconnect


class Handler(Protocol):
    """Answers the requests of one origin."""

    def handle(self, path: str, query: str) -> Action:
        """The action for a GET of ``path`` with the raw query string ``query``."""
        ...


def json_reply(status: int, value: object, headers: tuple[tuple[bytes, bytes], ...] = ()) -> Reply:
    """A compact JSON reply."""
    return Reply(status, json.dumps(value, separators=(",", ":")).encode(), JSON, headers)


def error_reply(status: int, error: str, message: str) -> Reply:
    """An XRPC error reply ``{"error", "message"}``."""
    return json_reply(status, {"error": error, "message": message})


NOT_FOUND: Final = error_reply(404, "NotFound", "Not Found")
INTERNAL_ERROR: Final = error_reply(500, "InternalServerError", "Internal Server Error")
HANG: Final = Hang()
DISCONNECT: Final = Disconnect()


def parse_query(query: str) -> dict[str, str]:
    """The first value of each query parameter."""
    return {key: values[0] for key, values in parse_qs(query, keep_blank_values=True).items()}


class PageCache:
    """A least-recently-used cache of rendered bodies, bounded by their total size in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._entries: OrderedDict[tuple[object, ...], bytes] = OrderedDict()

    def get(self, key: tuple[object, ...]) -> bytes | None:
        """The cached body for ``key``, if any (marking it recently used)."""
        body = self._entries.get(key)
        if body is not None:
            self._entries.move_to_end(key)
        return body

    def put(self, key: tuple[object, ...], body: bytes) -> None:
        """Cache ``body`` under ``key``, evicting the least recently used bodies beyond the budget."""
        if len(body) > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.size -= len(old)
        self._entries[key] = body
        self.size += len(body)
        while self.size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.size -= len(evicted)


# DID documents --------------------------------------------------------------------------------------------


def did_document(did: str, pds_url: str) -> dict[str, object]:
    """The DID document of a healthy account on ``pds_url``.

    Half the accounts (by DID hash) name their PDS service ``#atproto_pds`` and the others
    ``<did>#atproto_pds``, both forms the spec accepts; did:plc documents name the key ``<did>#atproto`` as
    plc.directory does, did:web ones the relative ``#atproto``.
    """
    full_service_id = int(handle_for(did)[1:13], 16) & 1
    return {
        "@context": [
            "https://www.w3.org/ns/did/v1",
            "https://w3id.org/security/multikey/v1",
            "https://w3id.org/security/suites/secp256k1-2019/v1",
        ],
        "id": did,
        "alsoKnownAs": [f"at://{handle_for(did)}"],
        "verificationMethod": [
            {
                "id": "#atproto" if did.startswith("did:web:") else f"{did}#atproto",
                "type": "Multikey",
                "controller": did,
                "publicKeyMultibase": multibase_key(did),
            }
        ],
        "service": [
            {
                "id": f"{did}#atproto_pds" if full_service_id else "#atproto_pds",
                "type": "AtprotoPersonalDataServer",
                "serviceEndpoint": pds_url,
            }
        ],
    }


def document_action(account: Account, pds_url: str) -> Action:
    """What the PLC directory (or the account's did:web host) answers for the account's document."""
    did = account.did
    behaviour, params = account.behaviour, account.params
    if behaviour == "plc_404":
        return json_reply(404, {"message": f"DID not registered: {did}"})
    if behaviour == "plc_410":
        return json_reply(410, {"message": f"DID not available: {did}"})
    if behaviour == "plc_hang":
        return HANG
    if behaviour == "doc_bad_json":
        if param_str(params, "variant") == "not_object":
            return json_reply(200, [did])
        return Reply(200, b'{"id": "' + did.encode() + b'", "service": [')
    document = did_document(did, pds_url)
    if behaviour == "doc_no_pds":
        document["service"] = [
            {"id": "#atproto_labeler", "type": "AtprotoLabeler", "serviceEndpoint": pds_url},
        ]
    elif behaviour == "doc_wrong_id":
        document["id"] = FOREIGN_DID
    elif behaviour == "doc_pds_url":
        document["service"] = [
            {
                "id": "#atproto_pds",
                "type": "AtprotoPersonalDataServer",
                "serviceEndpoint": param_str(params, "url"),
            }
        ]
    return json_reply(200, document)


class PlcHandler:
    """The PLC directory: ``GET /{did}`` for every did:plc account."""

    def __init__(self, spec: NetworkSpec, pds_urls: tuple[str, ...]) -> None:
        self._accounts = {a.did: a for a in spec.accounts if a.did.startswith("did:plc:")}
        self._pds_urls = pds_urls
        self._cache: dict[str, Action] = {}

    def handle(self, path: str, query: str) -> Action:
        """The account's document, or 404 for an unknown DID."""
        did = unquote(path[1:]) if "%" in path else path[1:]
        action = self._cache.get(did)
        if action is None:
            account = self._accounts.get(did)
            if account is None:
                return json_reply(404, {"message": f"DID not registered: {did}"})
            action = document_action(account, self._pds_urls[account.pds])
            self._cache[did] = action
        return action


class DidWebHandler:
    """The host of one did:web account: ``GET /.well-known/did.json``."""

    def __init__(self, account: Account, pds_url: str) -> None:
        self._action = document_action(account, pds_url)

    def handle(self, path: str, query: str) -> Action:
        """The account's document, 404 anywhere else."""
        return self._action if path == WELL_KNOWN_DID else NOT_FOUND


# Relay ----------------------------------------------------------------------------------------------------

RELAY_JUNK: Final[tuple[object, ...]] = (
    "did:plc:notanobject000000000000",
    42,
    None,
    {},
    {"did": 7},
    {"did": "not a did"},
    {"did": ""},
)


class RelayHandler:
    """The relay: ``listReposByCollection`` over the accounts with records in a collection, sorted by DID;
    the cursor is the last DID of the page (opaque to clients)."""

    def __init__(self, spec: NetworkSpec, cache: PageCache) -> None:
        self._spec = spec
        self._dids = {c: relay_dids(spec, c) for c in spec.collections}
        self._cache = cache

    def handle(self, path: str, query: str) -> Action:
        """One page of DIDs, or the collection's hostile mode."""
        if path != LIST_REPOS_BY_COLLECTION:
            return NOT_FOUND
        args = parse_query(query)
        collection = args.get("collection")
        if not collection:
            return error_reply(400, "InvalidRequest", 'Error: Params must have the property "collection"')
        try:
            requested = int(args.get("limit", DEFAULT_RELAY_LIMIT))
        except ValueError:
            return error_reply(400, "InvalidRequest", "Error: limit must be an integer")
        limit = min(max(requested, 1), self._spec.relay_page_cap)
        cursor = args.get("cursor") or None
        mode = self._spec.relay_behaviour.get(collection)
        if mode == "relay_hang":
            return HANG
        if mode == "relay_500":
            return INTERNAL_ERROR
        if mode == "relay_bad_body":
            return json_reply(200, ["repos"])
        if mode == "relay_missing_repos":
            return json_reply(200, {"cursor": cursor or "did:plc:zzzzzzzzzzzzzzzzzzzzzzzz"})
        key = ("relay", collection, limit, cursor)
        body = self._cache.get(key)
        if body is None:
            body = self._render(collection, limit, cursor, mode)
            self._cache.put(key, body)
        return Reply(200, body)

    def _render(self, collection: str, limit: int, cursor: str | None, mode: str | None) -> bytes:
        dids = self._dids.get(collection, [])
        start = 0 if cursor is None else bisect.bisect_right(dids, cursor)
        page = dids[start : start + limit]
        entries: list[object] = [{"did": did} for did in page]
        result: dict[str, object] = {"repos": entries}
        if mode == "relay_repeat_cursor":
            result["cursor"] = dids[min(limit, len(dids)) - 1] if dids else "repeat"
        elif start + limit < len(dids):
            result["cursor"] = page[-1]
        if mode == "relay_junk_entries":
            mixed: list[object] = []
            for position, entry in enumerate(entries):
                mixed += (RELAY_JUNK[position % len(RELAY_JUNK)], entry)
            result["repos"] = mixed or list(RELAY_JUNK)
        return json.dumps(result, separators=(",", ":")).encode()


# PDS ------------------------------------------------------------------------------------------------------

_HostileHandler: TypeAlias = Callable[["PdsRequest"], Action]
# Hostile modes whose answer never depends on the request.
FIXED_ANSWERS: Final[Mapping[str, Action]] = {
    "pds_500": INTERNAL_ERROR,
    "pds_hang": HANG,
    "pds_disconnect": DISCONNECT,
    "pds_body_not_object": json_reply(200, [{"records": []}]),
    "pds_invalid_json": Reply(200, b'{"records":[{"uri":"at://'),
    "pds_missing_records": json_reply(200, {"recs": []}),
    "pds_record_not_object": json_reply(200, {"records": [42, "record"]}),
}
# Account-unavailable modes: the XRPC error name and the message, formatted with the DID.
UNAVAILABLE: Final[Mapping[str, tuple[str, str]]] = {
    "pds_takendown": ("RepoTakendown", "Repo has been takendown: {}"),
    "pds_deactivated": ("RepoDeactivated", "Repo has been deactivated: {}"),
    "pds_suspended": ("RepoSuspended", "Repo has been suspended: {}"),
    "pds_repo_not_found": ("RepoNotFound", "Could not find repo for DID: {}"),
    "pds_could_not_find": ("InvalidRequest", "Could not find repo: {}"),
}


def _unavailable(error: str, message: str, request: PdsRequest) -> Action:
    return error_reply(400, error, message.format(request.account.did))


@dataclass(frozen=True, slots=True)
class PdsRequest:
    """A validated listRecords request for an account on this host."""

    account: Account
    collection: str
    limit: int
    requested: int
    cursor: str | None
    query: str
    params: Mapping[str, object]

    @property
    def pair(self) -> tuple[str, str]:
        """The (DID, collection) pair asked for."""
        return (self.account.did, self.collection)


class PdsHandler:
    """One PDS host: ``com.atproto.repo.listRecords`` for the accounts it hosts, newest record first, the
    cursor being the record key of the last record of the page."""

    def __init__(self, spec: NetworkSpec, host: int, origin: str, cache: PageCache) -> None:
        self._spec = spec
        self._origin = origin
        self._accounts = {a.did: a for a in spec.accounts if a.pds == host}
        self._behaviour = {a.did: effective_behaviour(spec, a) for a in self._accounts.values()}
        self._cache = cache
        self._failed_once: set[tuple[str, str, str | None]] = set()
        self._failures: Counter[tuple[str, str]] = Counter()
        self._limited: Counter[tuple[str, str]] = Counter()
        self._hostile: dict[str, _HostileHandler] = {
            "pds_404_first": self._not_found_first,
            "pds_404_mid": self._not_found_mid,
            "pds_500_once": self._fail_once,
            "pds_fail_after_page": self._fail_after_page,
            "pds_trickle": self._trickle,
            "pds_huge": self._huge,
            "pds_too_many_records": self._too_many,
            "pds_repeat_cursor": self._repeat_cursor,
            "pds_cursor_not_string": self._cursor_not_string,
            "pds_bad_records": self._bad_records,
            "pds_redirect": self._redirect,
            "pds_endless": self._endless,
            **dict.fromkeys(RATE_LIMIT_BEHAVIOURS, self._rate_limited),
            **{name: functools.partial(_unavailable, *answer) for name, answer in UNAVAILABLE.items()},
        }

    def reset(self) -> None:
        """Forget the state of the stateful hostile modes (pages failed once, 429s and failures served)."""
        self._failed_once.clear()
        self._failures.clear()
        self._limited.clear()

    def handle(self, path: str, query: str) -> Action:
        """A listRecords page, an XRPC error, or the account's (or host's) hostile mode."""
        if path != LIST_RECORDS:
            if path == REDIRECT_TARGET:
                return json_reply(200, {"records": []})
            return NOT_FOUND
        args = parse_query(query)
        did = args.get("repo")
        collection = args.get("collection")
        if not did:
            return error_reply(400, "InvalidRequest", 'Error: Params must have the property "repo"')
        if not collection:
            return error_reply(400, "InvalidRequest", 'Error: Params must have the property "collection"')
        try:
            requested = int(args.get("limit", DEFAULT_PAGE_LIMIT))
        except ValueError:
            return error_reply(400, "InvalidRequest", "Error: limit must be an integer")
        account = self._accounts.get(did)
        if account is None:
            return error_reply(400, "RepoNotFound", f"Could not find repo for DID: {did}")
        limit = min(max(requested, 1), self._spec.page_size_cap)
        cursor = args.get("cursor") or None
        behaviour, params = self._behaviour[did]
        if behaviour is None or behaviour not in PDS_BEHAVIOURS:
            return self._page(account, collection, limit, cursor)
        fixed = FIXED_ANSWERS.get(behaviour)
        if fixed is not None:
            return fixed
        return self._hostile[behaviour](
            PdsRequest(account, collection, limit, requested, cursor, query, params)
        )

    # Pages ------------------------------------------------------------------------------------------------

    def _page(
        self,
        account: Account,
        collection: str,
        limit: int,
        cursor: str | None,
        *,
        force_cursor: str | None = None,
        junk: int = 0,
    ) -> Reply:
        key = ("pds", account.did, collection, limit, cursor, force_cursor, junk)
        body = self._cache.get(key)
        if body is None:
            count = account.records.get(collection, 0)
            keys = pair_keys(account.did, collection)
            if cursor is None:
                end = count
            else:
                value = tid_to_int(cursor)
                if value is None:
                    return error_reply(400, "InvalidRequest", "Error: cursor is not a valid record key")
                end = records_before(value, count, keys.clock)
            start = max(0, end - (limit - junk))
            next_cursor = force_cursor
            if next_cursor is None and (start > 0 or (self._spec.cursor_on_last_page and end > start)):
                next_cursor = keys.rkey(start)
            body = render_page(account.did, collection, range(end - 1, start - 1, -1), next_cursor, junk)
            self._cache.put(key, body)
        return Reply(200, body)

    def _first_page_cursor(self, request: PdsRequest) -> str:
        count = request.account.records.get(request.collection, 0)
        return pair_keys(*request.pair).rkey(max(0, count - request.limit))

    # Hostile modes ----------------------------------------------------------------------------------------

    def _not_found_first(self, request: PdsRequest) -> Action:
        if request.cursor is None:
            return error_reply(404, "NotFound", "Not Found")
        return self._page(request.account, request.collection, request.limit, request.cursor)

    def _not_found_mid(self, request: PdsRequest) -> Action:
        if request.cursor is None:
            cursor = self._first_page_cursor(request)
            return self._page(request.account, request.collection, request.limit, None, force_cursor=cursor)
        return error_reply(404, "NotFound", "Not Found")

    def _fail_once(self, request: PdsRequest) -> Action:
        key = (*request.pair, request.cursor)
        if key not in self._failed_once:
            self._failed_once.add(key)
            return INTERNAL_ERROR
        return self._page(request.account, request.collection, request.limit, request.cursor)

    def _fail_after_page(self, request: PdsRequest) -> Action:
        page = 1
        if request.cursor is not None:
            value = tid_to_int(request.cursor)
            count = request.account.records.get(request.collection, 0)
            if value is not None:
                done = count - records_before(value, count, pair_keys(*request.pair).clock)
                page = done // request.limit + 1
        failures = param_int(request.params, "failures")
        if page > param_int(request.params, "page") and self._failures[request.pair] < failures:
            self._failures[request.pair] += 1
            return INTERNAL_ERROR
        return self._page(request.account, request.collection, request.limit, request.cursor)

    def _trickle(self, request: PdsRequest) -> Action:
        interval = param_float(request.params, "interval")
        return Stream(b"", b" ", param_int(request.params, "bytes"), b'{"records":[]}', interval, False)

    def _huge(self, request: PdsRequest) -> Action:
        size = param_float(request.params, "mib") * MIB
        declare = param_bool(request.params, "declare_length")
        return Stream(b'{"records":[', HUGE_FILLER, math.ceil(size / len(HUGE_FILLER)), b"", 0.0, declare)

    def _too_many(self, request: PdsRequest) -> Action:
        did, collection = request.pair
        return Reply(200, render_page(did, collection, range(request.requested, -1, -1), None, 0))

    def _repeat_cursor(self, request: PdsRequest) -> Action:
        cursor = self._first_page_cursor(request)
        return self._page(
            request.account, request.collection, request.limit, request.cursor, force_cursor=cursor
        )

    def _cursor_not_string(self, request: PdsRequest) -> Action:
        page = self._page(request.account, request.collection, request.limit, request.cursor)
        value = json.loads(page.body)
        value["cursor"] = 12345
        return json_reply(200, value)

    def _bad_records(self, request: PdsRequest) -> Action:
        junk = junk_per_page(request.limit)
        return self._page(request.account, request.collection, request.limit, request.cursor, junk=junk)

    def _rate_limited(self, request: PdsRequest) -> Action:
        behaviour = self._behaviour[request.pair[0]][0] or ""
        times = rate_limit_times(behaviour, request.params)
        if times is not None and self._limited[request.pair] >= times:
            return self._page(request.account, request.collection, request.limit, request.cursor)
        self._limited[request.pair] += 1
        reset_in = param_int(request.params, "reset_in")
        body = json.dumps({"error": "RateLimitExceeded", "message": "Rate Limit Exceeded"}).encode()
        if behaviour == "pds_429_html":
            return Reply(429, b"<html><body><h1>429 Too Many Requests</h1></body></html>", HTML)
        if behaviour == "pds_429_bare":
            return Reply(429, body)
        headers: tuple[tuple[bytes, bytes], ...]
        if behaviour == "pds_429_reset":
            headers = (
                (b"ratelimit-limit", b"3000"),
                (b"ratelimit-remaining", b"0"),
                (b"ratelimit-reset", str(math.ceil(time.time()) + reset_in).encode()),
                (b"ratelimit-policy", b"3000;w=300"),
            )
        elif behaviour == "pds_429_retry_after_date":
            when = email.utils.formatdate(time.time() + reset_in, usegmt=True)
            headers = ((b"retry-after", when.encode()),)
        else:
            headers = ((b"retry-after", str(reset_in).encode()),)
        return Reply(429, body, JSON, headers)

    def _redirect(self, request: PdsRequest) -> Action:
        location = param_str(request.params, "location", f"{self._origin}{REDIRECT_TARGET}?{request.query}")
        return Reply(302, b"", JSON, ((b"location", location.encode()),))

    def _endless(self, request: PdsRequest) -> Action:
        suffix = (request.cursor or "").removeprefix("endless-")
        page = int(suffix) if suffix.isdigit() else 0
        return json_reply(200, {"records": [], "cursor": f"endless-{page + 1}"})


def render_page(did: str, collection: str, indices: range, cursor: str | None, junk: int) -> bytes:
    """A listRecords body with the records ``indices`` of the pair (in that order), ``junk`` junk records
    (kinds of :data:`JUNK_KINDS`) after them, and ``cursor``."""
    # DIDs and NSIDs contain no character JSON escapes, so the records are assembled from templates.
    keys = pair_keys(did, collection)
    head = f'{{"uri":"at://{did}/{collection}/'
    value_head = f'","value":{{"$type":"{collection}","createdAt":"'
    tail = f' of {collection} published by {did}."}}}}'
    parts = [
        f'{head}{keys.rkey(i)}","cid":"{keys.cid(i)}{value_head}{record_created_at(i)}'
        f'","name":"simnet record {i}","description":"Deterministic record {i}{tail}'
        for i in indices
    ]
    if junk:
        anchor = indices[-1] if indices else 0
        parts += [json.dumps(junk_record(did, collection, anchor, kind)) for kind in JUNK_KINDS[:junk]]
    body = '{"records":[' + ",".join(parts) + "]"
    if cursor is not None:
        body += f',"cursor":"{cursor}"'
    return (body + "}").encode()


def junk_record(did: str, collection: str, anchor: int, kind: str) -> dict[str, object]:
    """A record that a correct daemon must skip (``kind`` is one of :data:`JUNK_KINDS`)."""
    keys = pair_keys(did, collection)
    position = JUNK_KINDS.index(kind)
    # A TID between two real records' TIDs, so it can never be mistaken for one of them.
    rkey = tid_from_int(((TID_EPOCH_US + anchor * TID_STEP_US + 1 + position) << 10) | keys.clock)
    cid = keys.cid(anchor)
    uri = {
        "other_collection": f"at://{did}/{FOREIGN_COLLECTION}/{rkey}",
        "other_did": f"at://{FOREIGN_DID}/{collection}/{rkey}",
        "empty_rkey": f"at://{did}/{collection}/",
        "malformed_uri": f"https://example.com/{did}/{collection}/{rkey}",
        "bad_cid": f"at://{did}/{collection}/{rkey}",
        "invalid_rkey": f"at://{did}/{collection}/..",
        "handle_authority": f"at://{handle_for(did)}/{collection}/{rkey}",
    }[kind]
    if kind == "bad_cid":
        cid = "cid:" + cid
    return {"uri": uri, "cid": cid, "value": {"$type": collection, "junk": kind}}
