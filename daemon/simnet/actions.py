"""What a simulated service does with a request: the :data:`Action` types, and the helpers that make them.

A handler turns a :class:`Request` into an action describing the response (a complete reply, a streamed
body, a hang or a dropped connection); the HTTP layer (:mod:`daemon.simnet.http11`) carries it out.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Final, Protocol, TypeAlias
from urllib.parse import parse_qs

JSON: Final = b"application/json; charset=utf-8"
HTML: Final = b"text/html; charset=utf-8"
CAR: Final = b"application/vnd.ipld.car"
Headers: TypeAlias = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True)
class Request:
    """One request as a handler sees it: method, path, raw query string, body and the client's IP."""

    path: str
    query: str = ""
    method: str = "GET"
    body: bytes = b""
    client: str = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class Reply:
    """A complete response with a ``Content-Length``."""

    status: int
    body: bytes
    content_type: bytes = JSON
    headers: Headers = ()


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
    headers: Headers = ()

    @property
    def size(self) -> int:
        """The length of the whole body."""
        return len(self.head) + len(self.filler) * self.repeat + len(self.tail)


@dataclass(frozen=True, slots=True)
class Chunks:
    """A 200 response whose body ``chunks()`` generates piece by piece (never held whole), with
    ``interval`` seconds before each piece; ``size`` (when known) is sent as ``Content-Length``, else the
    body is chunked."""

    chunks: Callable[[], Iterator[bytes]]
    size: int | None = None
    content_type: bytes = CAR
    headers: Headers = ()
    interval: float = 0.0


@dataclass(frozen=True, slots=True)
class Hang:
    """Never answer: hold the connection until the client gives up."""


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Close the connection without answering."""


Action: TypeAlias = Reply | Stream | Chunks | Hang | Disconnect


class Handler(Protocol):
    """Answers the requests of one origin."""

    def handle(self, request: Request) -> Action:
        """The action for ``request``."""
        ...


def json_reply(status: int, value: object, headers: Headers = ()) -> Reply:
    """A compact JSON reply."""
    return Reply(status, json.dumps(value, separators=(",", ":")).encode(), JSON, headers)


def error_reply(status: int, error: str, message: str | None = None) -> Reply:
    """An XRPC error reply ``{"error", "message"}`` (without ``message`` when None)."""
    body = {"error": error} if message is None else {"error": error, "message": message}
    return json_reply(status, body)


def with_headers(action: Action, headers: Headers) -> Action:
    """``action`` with ``headers`` added (a hang or a disconnect sends no headers at all)."""
    if not headers or isinstance(action, Hang | Disconnect):
        return action
    return replace(action, headers=action.headers + headers)


NOT_FOUND: Final = error_reply(404, "NotFound", "Not Found")
INTERNAL_ERROR: Final = error_reply(500, "InternalServerError", "Internal Server Error")
NOT_IMPLEMENTED: Final = error_reply(501, "MethodNotImplemented", "Method Not Implemented")
RATE_LIMITED_BODY: Final = b'{"error":"RateLimitExceeded","message":"Rate Limit Exceeded"}'
HANG: Final = Hang()
DISCONNECT: Final = Disconnect()


def parse_query(query: str) -> dict[str, str]:
    """The first value of each query parameter."""
    return {key: values[0] for key, values in parse_qs(query, keep_blank_values=True).items()}


def parse_query_lists(query: str) -> dict[str, list[str]]:
    """Every value of each query parameter, in order (``cids=a&cids=b``)."""
    return parse_qs(query, keep_blank_values=True)


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
