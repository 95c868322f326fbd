"""The relay: ``com.atproto.sync.listReposByCollection``, with the relay hostile modes."""

from __future__ import annotations

import bisect
import json
from typing import Final

from daemon.simnet.actions import (
    HANG,
    INTERNAL_ERROR,
    NOT_FOUND,
    Action,
    PageCache,
    Reply,
    Request,
    Stream,
    error_reply,
    json_reply,
    parse_query,
)
from daemon.simnet.behaviours import RELAY_HUGE_BYTES, RELAY_HUGE_ENTRY
from daemon.simnet.expectations import relay_dids
from daemon.simnet.spec import NetworkSpec

LIST_REPOS_BY_COLLECTION: Final = "/xrpc/com.atproto.sync.listReposByCollection"
DEFAULT_RELAY_LIMIT: Final = 500
RELAY_JUNK: Final[tuple[object, ...]] = (
    "did:plc:notanobject000000000000",
    42,
    None,
    {},
    {"did": 7},
    {"did": "not a did"},
    {"did": ""},
)


# relay_huge: {"repos":[...]} of junk entries, just under max_response_bytes, in chunks of about 64 KiB.
_HUGE_HEAD: Final = b'{"repos":['
_HUGE_FILLER: Final = (RELAY_HUGE_ENTRY + b",") * (65_536 // (len(RELAY_HUGE_ENTRY) + 1))
_HUGE_ROOM: Final = RELAY_HUGE_BYTES - len(_HUGE_HEAD) - len(RELAY_HUGE_ENTRY) - 2
_HUGE_REST: Final = (_HUGE_ROOM % len(_HUGE_FILLER)) // (len(RELAY_HUGE_ENTRY) + 1)
RELAY_HUGE: Final = Stream(
    _HUGE_HEAD,
    _HUGE_FILLER,
    _HUGE_ROOM // len(_HUGE_FILLER),
    (RELAY_HUGE_ENTRY + b",") * _HUGE_REST + RELAY_HUGE_ENTRY + b"]}",
    0.0,
    False,
)


class RelayHandler:
    """The relay: ``listReposByCollection`` over the accounts with records in a collection, sorted by DID;
    the cursor is the last DID of the page (opaque to clients)."""

    def __init__(self, spec: NetworkSpec, cache: PageCache) -> None:
        self._cache = cache
        self._generation = 0
        self.set_spec(spec)

    def set_spec(self, spec: NetworkSpec) -> None:
        """Serve the (mutated) ``spec``: a collection emptied leaves the listing, as on a real relay."""
        self._spec = spec
        self._dids = {c: relay_dids(spec, c) for c in spec.collections}
        self._generation += 1

    def handle(self, request: Request) -> Action:
        """One page of DIDs, or the collection's hostile mode."""
        if request.path != LIST_REPOS_BY_COLLECTION:
            return NOT_FOUND
        args = parse_query(request.query)
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
        if mode == "relay_huge":
            return RELAY_HUGE
        key = ("relay", self._generation, collection, limit, cursor)
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
