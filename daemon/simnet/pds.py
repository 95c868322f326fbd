"""One simulated PDS host: ``com.atproto.repo.listRecords`` and the sync endpoints, with the hostile modes.

The handler keeps the little state some hostile modes need (which pages already failed once, how many
429s a pair or account has had), which :meth:`PdsHandler.reset` clears. listRecords pages are rendered
from string templates and cached, because the benchmark pushes thousands of pages per second through
here; repos are built on first use and cached (:class:`~daemon.simnet.repos.RepoCache`).

Unknown accounts get what the reference PDS says: listRecords 400 ``InvalidRequest`` "Could not find repo:
<did>", the sync endpoints 400 ``RepoNotFound``; an unknown XRPC method (or getBlocks on a host without it)
501 ``MethodNotImplemented``.
"""

from __future__ import annotations

import email.utils
import functools
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, TypeAlias

from daemon.simnet.actions import (
    DISCONNECT,
    HANG,
    HTML,
    INTERNAL_ERROR,
    JSON,
    NOT_FOUND,
    NOT_IMPLEMENTED,
    RATE_LIMITED_BODY,
    Action,
    Headers,
    PageCache,
    Reply,
    Request,
    Stream,
    error_reply,
    json_reply,
    parse_query,
    parse_query_lists,
    with_headers,
)
from daemon.simnet.behaviours import (
    ACCOUNT_STATES,
    EMPTY_OBJECT,
    JUNK_KINDS,
    MINIMAL_RECORD,
    PDS_BEHAVIOURS,
    RATE_LIMIT_BEHAVIOURS,
    UNAVAILABLE,
    junk_per_page,
    param_bool,
    param_float,
    param_int,
    param_str,
    rate_limit_times,
)
from daemon.simnet.ids import (
    FOREIGN_COLLECTION,
    FOREIGN_DID,
    TID_EPOCH_US,
    TID_STEP_US,
    handle_for,
    rev_for,
    tid_from_int,
)
from daemon.simnet.ratelimit import HostRateLimits
from daemon.simnet.records import listed_entry, pair_keys, record_cid
from daemon.simnet.repos import MIB, Repo, RepoCache
from daemon.simnet.spec import Account, NetworkSpec
from daemon.simnet.sync import (
    GET_BLOCKS,
    GET_REPO,
    GET_REPO_STATUS,
    SYNC_METHODS,
    answer,
    car_header_length,
    dribble,
    huge_repo,
    missing_param,
    repo_status,
    with_filler,
)
from daemon.simnet.views import Listing, effective_behaviour, pair_listing

LIST_RECORDS: Final = "/xrpc/com.atproto.repo.listRecords"
REDIRECT_TARGET: Final = "/redirect-target"
DEFAULT_PAGE_LIMIT: Final = 50
# About 64 KiB of a record that never closes the array: pds_huge repeats it to the size asked for.
HUGE_FILLER: Final = b'{"uri":"at://did:plc:huge/x.y.z/3aaaaaaaaaaaa","cid":"bafyreihuge"},' * 1000
# The other pds_huge shapes repeat about this many bytes of entries per chunk.
HUGE_UNITS_PER_CHUNK: Final = 65_536
# Modes whose listRecords answer never depends on the request.
FIXED_ANSWERS: Final[Mapping[str, Action]] = {
    "pds_500": INTERNAL_ERROR,
    "pds_hang": HANG,
    "pds_disconnect": DISCONNECT,
    "pds_body_not_object": json_reply(200, [{"records": []}]),
    "pds_invalid_json": Reply(200, b'{"records":[{"uri":"at://'),
    "pds_missing_records": json_reply(200, {"recs": []}),
    "pds_record_not_object": json_reply(200, {"records": [42, "record"]}),
}
# What the sync endpoints say for an account in each state (None: it does not exist here).
_STATE_ERRORS: Final[Mapping[str | None, tuple[str, str]]] = {
    "takendown": ("RepoTakendown", "Repo has been takendown: {}"),
    "deactivated": ("RepoDeactivated", "Repo has been deactivated: {}"),
    "suspended": ("RepoSuspended", "Repo has been suspended: {}"),
    None: ("RepoNotFound", "Could not find repo for DID: {}"),
}
_GONE: Final = ("InvalidRequest", "Could not find repo: {}")


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


_HostileHandler: TypeAlias = Callable[[PdsRequest], Action]


def _unavailable(error: str, message: str, request: PdsRequest) -> Action:
    return error_reply(400, error, message.format(request.account.did))


class PdsHandler:
    """One PDS host: listRecords (newest record first, the cursor being the record key of the last record of
    the page) and the sync endpoints, for the accounts it hosts."""

    def __init__(
        self,
        spec: NetworkSpec,
        host: int,
        origin: str,
        cache: PageCache,
        repos: RepoCache | None = None,
        on_rate_limited: Callable[[], None] = lambda: None,
    ) -> None:
        self._host = host
        self._origin = origin
        self._cache = cache
        self._repos = RepoCache() if repos is None else repos
        options = spec.host(host)
        self._get_blocks = options.get_blocks
        self._limits = HostRateLimits(options.rate_limit, options.repo_bucket, on_rate_limited)
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
            **dict.fromkeys(("pds_gone_deactivated", "pds_gone_takendown", "pds_gone_deleted"), self._gone),
        }
        self.set_spec(spec)

    def set_spec(self, spec: NetworkSpec) -> None:
        """Serve the (mutated) ``spec``: its accounts on this host, at their current commits."""
        self._spec = spec
        self._accounts = {a.did: a for a in spec.accounts if a.pds == self._host}
        self._behaviour = {a.did: effective_behaviour(spec, a) for a in self._accounts.values()}

    def reset(self) -> None:
        """Forget the state of the stateful hostile modes (pages failed once, 429s, failures, windows)."""
        self._failed_once.clear()
        self._failures.clear()
        self._limited.clear()
        self._limits.reset()

    def handle(self, request: Request) -> Action:
        """A listRecords page, a sync answer, an XRPC error, or the account's (or host's) hostile mode;
        every XRPC answer carries the host's rate-limit headers (if it has limits)."""
        path = request.path
        if not path.startswith("/xrpc/"):
            return json_reply(200, {"records": []}) if path == REDIRECT_TARGET else NOT_FOUND
        headers, rejected = self._limits.check(path, request.client)
        if rejected is not None:
            return rejected
        if path == LIST_RECORDS:
            action = self._list_records(request)
        elif path in SYNC_METHODS:
            action = self._sync(request)
        else:
            action = NOT_IMPLEMENTED
        return with_headers(action, headers)

    # listRecords ------------------------------------------------------------------------------------------

    def _list_records(self, request: Request) -> Action:
        args = parse_query(request.query)
        did = args.get("repo")
        collection = args.get("collection")
        if not did:
            return missing_param("repo")
        if not collection:
            return missing_param("collection")
        try:
            requested = int(args.get("limit", DEFAULT_PAGE_LIMIT))
        except ValueError:
            return error_reply(400, "InvalidRequest", "Error: limit must be an integer")
        account = self._accounts.get(did)
        if account is None:
            return error_reply(400, *_gone_message(did))
        limit = min(max(requested, 1), self._spec.page_size_cap)
        cursor = args.get("cursor") or None
        behaviour, params = self._behaviour[did]
        if behaviour is None or behaviour not in PDS_BEHAVIOURS or behaviour == "pds_moved":
            return self._page(account, collection, limit, cursor)
        fixed = FIXED_ANSWERS.get(behaviour)
        if fixed is not None:
            return fixed
        pds_request = PdsRequest(account, collection, limit, requested, cursor, request.query, params)
        return self._hostile[behaviour](pds_request)

    def _listing(self, account: Account, collection: str) -> Listing:
        behaviour, params = self._behaviour[account.did]
        return pair_listing(account, collection, behaviour, params)

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
        behaviour, params = self._behaviour[account.did]  # the listing depends on them (set_behaviour)
        key = (
            "pds",
            account.did,
            account.generation,
            behaviour,
            repr(sorted(params.items())),
            collection,
            limit,
            cursor,
            force_cursor,
            junk,
        )
        body = self._cache.get(key)
        if body is None:
            listing = self._listing(account, collection)
            end = len(listing) if cursor is None else listing.below(cursor)
            if end is None:
                return error_reply(400, "InvalidRequest", "Error: cursor is not a valid record key")
            start = max(0, end - (limit - junk))
            next_cursor = force_cursor
            if next_cursor is None and (start > 0 or (self._spec.cursor_on_last_page and end > start)):
                next_cursor = listing.entry(start)[0]
            positions = range(end - 1, start - 1, -1)
            body = render_page(account.did, collection, listing, positions, next_cursor, junk)
            self._cache.put(key, body)
        return Reply(200, body)

    def _first_page_cursor(self, request: PdsRequest) -> str:
        listing = self._listing(request.account, request.collection)
        position = max(0, len(listing) - request.limit)
        return listing.entry(position)[0] if len(listing) else listing.keys.rkey(0)

    # listRecords hostile modes ----------------------------------------------------------------------------

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
            listing = self._listing(request.account, request.collection)
            below = listing.below(request.cursor)
            if below is not None:
                page = (len(listing) - below) // request.limit + 1
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
        shape = param_str(request.params, "shape")
        if shape == "junk":
            return Stream(b'{"records":[', HUGE_FILLER, math.ceil(size / len(HUGE_FILLER)), b"", 0.0, declare)
        head, unit, tail = huge_parts(shape, *request.pair)
        filler, repeat, rest = _huge_layout(len(head) + len(tail), unit, size)
        return Stream(head, filler, repeat, (unit + b",") * rest + tail, 0.0, declare)

    def _too_many(self, request: PdsRequest) -> Action:
        did, collection = request.pair
        listing = Listing(pair_keys(did, collection), request.requested + 1, None)
        return Reply(200, render_page(did, collection, listing, range(request.requested, -1, -1), None, 0))

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
        if self._limit_recovered(request.pair):
            return self._page(request.account, request.collection, request.limit, request.cursor)
        return self._limit_reply(request.account.did)

    def _limit_recovered(self, key: tuple[str, str]) -> bool:
        """Whether the 429 mode of ``key``'s account has sent its 429s to ``key`` (counting one more)."""
        behaviour, params = self._behaviour[key[0]]
        times = rate_limit_times(behaviour or "", params)
        if times is not None and self._limited[key] >= times:
            return True
        self._limited[key] += 1
        return False

    def _limit_reply(self, did: str) -> Reply:
        behaviour, params = self._behaviour[did]
        reset_in = param_int(params, "reset_in")
        if behaviour == "pds_429_html":
            return Reply(429, b"<html><body><h1>429 Too Many Requests</h1></body></html>", HTML)
        if behaviour == "pds_429_bare":
            return Reply(429, RATE_LIMITED_BODY)
        headers: Headers
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
        return Reply(429, RATE_LIMITED_BODY, JSON, headers)

    def _redirect(self, request: PdsRequest) -> Action:
        return self._redirect_to(request.params, request.query)

    def _redirect_to(self, params: Mapping[str, object], query: str) -> Reply:
        location = param_str(params, "location", f"{self._origin}{REDIRECT_TARGET}?{query}")
        return Reply(302, b"", JSON, ((b"location", location.encode()),))

    def _endless(self, request: PdsRequest) -> Action:
        suffix = (request.cursor or "").removeprefix("endless-")
        page = int(suffix) if suffix.isdigit() else 0
        return json_reply(200, {"records": [], "cursor": f"endless-{page + 1}"})

    def _gone(self, request: PdsRequest) -> Action:
        return error_reply(400, *_gone_message(request.account.did))

    # Sync endpoints ---------------------------------------------------------------------------------------

    def _sync(self, request: Request) -> Action:
        path = request.path
        if path == GET_BLOCKS and not self._get_blocks:
            return NOT_IMPLEMENTED
        args = parse_query_lists(request.query)
        did = args.get("did", [""])[0]
        if not did:
            return missing_param("did")
        account = self._accounts.get(did)
        if account is None:
            return self._state_answer(path, did, None)
        behaviour, params = self._behaviour[did]
        name = behaviour or ""
        if name in ("pds_500", "pds_hang", "pds_disconnect"):
            return FIXED_ANSWERS[name]
        if name == "pds_redirect":
            return self._redirect_to(params, request.query)
        if name in RATE_LIMIT_BEHAVIOURS and not self._limit_recovered((did, "")):
            return self._limit_reply(did)
        if name in ACCOUNT_STATES:
            return self._state_answer(path, did, ACCOUNT_STATES[name])
        action: Action
        if path == GET_REPO_STATUS:
            action = repo_status(did, rev_for(did, account.generation))
        elif name == "car_huge":
            repo = self._repos.get(self._spec, account)
            action = self._huge_car(path, repo, args, params, self._spec.position(did))
        else:
            action = answer(path, self._repos.get(self._spec, account), args)
        if name == "pds_trickle":
            return dribble(action, param_int(params, "bytes"), param_float(params, "interval"))
        return action

    @staticmethod
    def _huge_car(
        path: str, repo: Repo, args: Mapping[str, list[str]], params: Mapping[str, object], salt: int
    ) -> Action:
        """car_huge: the answer of its ``endpoint`` padded with filler blocks (getBlocks not implemented
        when the endpoint is getRepo), each account's (``salt``) its own; every other sync answer as
        usual."""
        endpoint = "/xrpc/com.atproto.sync." + param_str(params, "endpoint")
        if endpoint == GET_REPO and path == GET_BLOCKS:
            return NOT_IMPLEMENTED
        action = answer(path, repo, args)
        if path != endpoint or (isinstance(action, Reply) and action.status != 200):
            return action
        size = int(param_float(params, "size_mib") * MIB)
        declare = param_bool(params, "declare_length")
        block_bytes = param_int(params, "block_bytes")
        dag_cbor = param_str(params, "block_codec") == "dag-cbor"
        if path == GET_REPO:
            return huge_repo(repo, size, declare, block_bytes, dag_cbor, salt)
        assert isinstance(action, Reply)
        body = action.body
        head = car_header_length(body) if param_bool(params, "filler_first") else len(body)
        return with_filler([body[:head]], size, declare, block_bytes, dag_cbor, salt, after=[body[head:]])

    @staticmethod
    def _state_answer(path: str, did: str, state: str | None) -> Reply:
        """What the account gate says for an unavailable account (``state`` None: not here at all)."""
        if path == GET_REPO_STATUS and state is not None:
            return json_reply(200, {"did": did, "active": False, "status": state})
        error, message = _STATE_ERRORS[state]
        return error_reply(400, error, message.format(did))


def huge_parts(shape: str, did: str, collection: str) -> tuple[bytes, bytes, bytes]:
    """A pds_huge body of ``shape`` (not "junk") as ``head``, the repeated entry ``unit`` and ``tail``: the
    body is ``head + (unit + ",") * n + tail``."""
    if shape == "huge_value":
        # one record a correct daemon must decode to check: its URI and CID are well formed
        rkey = pair_keys(did, collection).rkey(0)
        cid = record_cid(did, collection, 0)
        head = f'{{"records":[{{"uri":"at://{did}/{collection}/{rkey}","cid":"{cid}","value":['.encode()
        return head, EMPTY_OBJECT, EMPTY_OBJECT + b"]}]}"
    unit = MINIMAL_RECORD if shape == "minimal_records" else EMPTY_OBJECT
    return b'{"records":[', unit, unit + b"]}"


def huge_entries(shape: str, size: float, did: str, collection: str) -> int:
    """How many entries the ``records`` array (or, for "huge_value", its one value) of a pds_huge body of
    ``shape`` (not "junk") and at most ``size`` bytes for the pair holds, as :meth:`PdsHandler._huge`
    builds it."""
    head, unit, tail = huge_parts(shape, did, collection)
    filler, repeat, rest = _huge_layout(len(head) + len(tail), unit, size)
    return (repeat * len(filler) + rest * (len(unit) + 1)) // (len(unit) + 1) + 1


def _huge_layout(fixed: int, unit: bytes, size: float) -> tuple[bytes, int, int]:
    """A filler of about 64 KiB of ``unit,`` entries, how many times it fits in ``size`` bytes besides the
    ``fixed`` ones, and how many more single entries fill the rest."""
    filler = (unit + b",") * (HUGE_UNITS_PER_CHUNK // (len(unit) + 1))
    room = max(0, int(size) - fixed)
    repeat = room // len(filler)
    return filler, repeat, (room - repeat * len(filler)) // (len(unit) + 1)


def _gone_message(did: str) -> tuple[str, str]:
    return _GONE[0], _GONE[1].format(did)


def render_page(
    did: str, collection: str, listing: Listing, positions: range, cursor: str | None, junk: int
) -> bytes:
    """A listRecords body with the entries ``positions`` of ``listing`` (in that order), ``junk`` junk
    records (kinds of :data:`JUNK_KINDS`) after them, and ``cursor``."""
    # DIDs, NSIDs, record keys and CIDs contain no character JSON escapes, so entries come from templates.
    head = f'{{"uri":"at://{did}/{collection}/'
    parts: list[str] = []
    anchor = 0
    for position in positions:
        rkey, index, version = listing.entry(position)
        cid, value = listed_entry(did, collection, index, version, listing.altered(index))
        parts.append(f'{head}{rkey}","cid":"{cid}","value":{value}}}')
        anchor = index
    if junk:
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
    cid = record_cid(did, collection, max(anchor, 0))
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
