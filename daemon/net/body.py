"""Reading a response body under a byte cap while it streams, with gzip decoded under the same cap."""

from __future__ import annotations

import zlib
from collections.abc import AsyncGenerator, AsyncIterable, Sequence

from daemon.errors import Code, ProtocolViolation
from daemon.net.budget import BudgetHolder


def too_large(where: str, limit: int, code: Code = Code.RESPONSE_TOO_LARGE) -> ProtocolViolation:
    """The error for a body over its cap."""
    return ProtocolViolation(f"GET {where}: response body over {limit} bytes", code=code)


def header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The first value of header ``name`` (lower case), decoded as Latin-1, or None."""
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def decoded_chunks(
    raw: AsyncIterable[bytes],
    *,
    headers: Sequence[tuple[bytes, bytes]],
    limit: int,
    where: str,
    too_large_code: Code = Code.RESPONSE_TOO_LARGE,
) -> AsyncGenerator[bytes, None]:
    """The body's chunks, gzip decoded, refused once either the wire bytes or the decoded bytes pass
    ``limit`` (a declared ``Content-Length`` over it is refused before anything is read)."""
    declared = header(headers, b"content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise too_large(where, limit, too_large_code)
    decoder = _decoder(header(headers, b"content-encoding"), where)
    received = size = 0
    async for chunk in raw:
        received += len(chunk)
        if received > limit:
            raise too_large(where, limit, too_large_code)
        data = decoder.feed(chunk, limit - size) if decoder is not None else chunk
        size += len(data)
        if size > limit:
            raise too_large(where, limit, too_large_code)
        if data:
            yield data
    if decoder is not None:
        decoder.finish()


async def read_body(
    raw: AsyncIterable[bytes],
    *,
    headers: Sequence[tuple[bytes, bytes]],
    limit: int,
    where: str,
    holder: BudgetHolder,
) -> bytearray:
    """The whole body, each chunk taken from the memory budget before it is kept."""
    body = bytearray()
    async for data in decoded_chunks(raw, headers=headers, limit=limit, where=where):
        await holder.take(len(data))
        body += data
    return body


class _Gunzip:
    """gzip decoding that never produces more than the remaining byte budget (plus one, to detect excess)."""

    def __init__(self, where: str) -> None:
        self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._where = where

    def feed(self, data: bytes, budget: int) -> bytes:
        # With the output capped at budget + 1, either the cap is hit (the body is too large, the caller
        # stops) or all input was consumed: nothing is left behind in unconsumed_tail.
        if self._inflater.eof:
            return b""
        try:
            return self._inflater.decompress(data, budget + 1)
        except zlib.error as exc:
            raise ProtocolViolation(
                f"GET {self._where}: bad gzip body: {exc}", code=Code.BAD_RESPONSE
            ) from exc

    def finish(self) -> None:
        if not self._inflater.eof:
            raise ProtocolViolation(f"GET {self._where}: truncated gzip body", code=Code.BAD_RESPONSE)


def _decoder(content_encoding: str | None, where: str) -> _Gunzip | None:
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip"):
        return _Gunzip(where)
    raise ProtocolViolation(
        f"GET {where}: unsupported Content-Encoding {content_encoding!r}", code=Code.BAD_RESPONSE
    )
