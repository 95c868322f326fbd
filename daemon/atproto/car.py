"""An incremental CAR v1 reader that verifies every block (SPEC 6.2 step 1).

The daemon streams ``getRepo``/``getBlocks``/``getRecord`` responses of up to ``max_car_bytes`` and must not
hold them whole, so the reader is push-style: :meth:`CarReader.feed` takes the body chunk by chunk and
returns the blocks completed so far; :meth:`CarReader.finish` says the body ended and checks that it ended
cleanly. It holds at most one incomplete section at a time.

A CAR v1 is ``varint(len) header`` then ``varint(len) cid block`` sections until the end. Checked:

- varints: unsigned LEB128, minimal (no trailing ``0x00`` group), at most 9 bytes, not cut off by the end;
- the header: canonical DAG-CBOR map with ``version`` 1 and ``roots`` an array of CID links (zero roots are
  fine: the reference PDS's ``getBlocks`` CARs have none); other keys are ignored, as the reference does;
- each section: at most ``max_block_size`` bytes of block after a blessed CID (CIDv1, dag-cbor or raw,
  sha2-256; CIDv0 and anything else refused), and the block's sha2-256 equal to the CID's digest;
- the whole body: at most ``max_bytes`` (the caller's cap); nothing left over at the end (a truncated final
  section or trailing garbage).

Error codes (ProtocolViolation): ``invalid_car``, ``cid_mismatch``, ``car_too_large``. Blocks are *not*
decoded here: whether they are canonical DAG-CBOR is checked where they are used.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from daemon.atproto.cbor import Link, decode_dag_cbor, encode_dag_cbor
from daemon.atproto.cid import CID_LENGTH, DAG_CBOR_PREFIX, RAW_PREFIX, Cid, format_cid, is_blessed_cid
from daemon.errors import ProtocolViolation

MAX_BLOCK_SIZE = 2 * 1024 * 1024
"""Default largest block accepted (records are capped well below this by PDSes)."""

MAX_HEADER_SIZE = 64 * 1024
_MAX_VARINT_BYTES = 9
_CIDV0_PREFIX = b"\x12\x20"

Block = tuple[Cid, bytes]


class CarReader:
    """Push-style CAR v1 reader: ``feed`` chunks, collect the verified ``(cid, bytes)`` blocks, ``finish``."""

    def __init__(self, *, max_block_size: int = MAX_BLOCK_SIZE, max_bytes: int | None = None) -> None:
        self._max_section = CID_LENGTH + max_block_size
        self._max_bytes = max_bytes
        self._buf = bytearray()
        self._received = 0
        self._roots: tuple[Cid, ...] | None = None
        self._finished = False

    @property
    def roots(self) -> tuple[Cid, ...]:
        """The header's root CIDs; raises ProtocolViolation ``invalid_car`` if the header has not arrived."""
        if self._roots is None:
            raise _invalid("the CAR header has not been read")
        return self._roots

    def feed(self, chunk: bytes) -> list[Block]:
        """Add the next piece of the body; returns the blocks it completed, in order, each verified."""
        if self._finished:
            raise RuntimeError("CarReader.feed after finish")
        self._received += len(chunk)
        if self._max_bytes is not None and self._received > self._max_bytes:
            raise ProtocolViolation(f"CAR is larger than {self._max_bytes} bytes", code="car_too_large")
        buf = self._buf
        buf += chunk
        blocks: list[Block] = []
        pos = 0
        end = len(buf)
        while pos < end:
            header = _read_varint(buf, pos, end)
            if header is None:
                break
            length, start = header
            limit = MAX_HEADER_SIZE if self._roots is None else self._max_section
            if length > limit:
                raise _invalid(f"CAR section of {length} bytes is larger than the limit of {limit}")
            if end - start < length:
                break
            if self._roots is None:
                self._roots = _parse_header(bytes(buf[start : start + length]))
            else:
                blocks.append(_parse_section(buf, start, length))
            pos = start + length
        del buf[:pos]
        return blocks

    def finish(self) -> None:
        """The body has ended: raises ProtocolViolation ``invalid_car`` unless it ended after a whole section."""
        self._finished = True
        if self._roots is None:
            raise _invalid("CAR ended before its header")
        if self._buf:
            raise _invalid(f"CAR ends in {len(self._buf)} bytes that are no complete section")


def read_car(
    data: bytes, *, max_block_size: int = MAX_BLOCK_SIZE, max_bytes: int | None = None
) -> tuple[tuple[Cid, ...], list[Block]]:
    """Read a whole (small) CAR held in memory: ``(roots, blocks)``, with every check of :class:`CarReader`.

    The reader copies the data it is fed, so a large body should be streamed through :class:`CarReader`.
    """
    reader = CarReader(max_block_size=max_block_size, max_bytes=max_bytes)
    blocks = reader.feed(data)
    reader.finish()
    return reader.roots, blocks


def encode_car(roots: Sequence[Cid], blocks: Iterable[Block]) -> bytes:
    """Write a CAR v1 (for the simulated network and tests); the blocks are written as given."""
    header = encode_dag_cbor({"version": 1, "roots": [Link(root) for root in roots]})
    parts = [encode_varint(len(header)), header]
    for cid, data in blocks:
        parts += (encode_varint(len(cid) + len(data)), cid, data)
    return b"".join(parts)


def _read_varint(buf: bytearray, pos: int, end: int) -> tuple[int, int] | None:
    """``(value, next position)``, or None when the buffer ends inside the varint."""
    value = 0
    shift = 0
    index = pos
    while index < end:
        byte = buf[index]
        index += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if byte == 0 and index - pos > 1:
                raise _invalid("CAR varint is not minimally encoded")
            return value, index
        if index - pos >= _MAX_VARINT_BYTES:
            raise _invalid(f"CAR varint is longer than {_MAX_VARINT_BYTES} bytes")
        shift += 7
    return None


def encode_varint(value: int) -> bytes:
    """``value`` as an unsigned LEB128 varint (CAR section lengths)."""
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _parse_header(data: bytes) -> tuple[Cid, ...]:
    try:
        header = decode_dag_cbor(data)
    except ProtocolViolation as exc:
        raise _invalid(f"CAR header is not canonical DAG-CBOR: {exc.message}") from exc
    if type(header) is not dict:
        raise _invalid("CAR header is not a map")
    version, roots = header.get("version"), header.get("roots")
    if type(version) is not int or version != 1:
        raise _invalid(f"CAR header version is {version!r}, not 1")
    if type(roots) is not list or not all(type(root) is Link and is_blessed_cid(root) for root in roots):
        raise _invalid("CAR header roots are not an array of dag-cbor/raw sha2-256 CIDs")
    return tuple(bytes(root) for root in roots)


def _parse_section(buf: bytearray, start: int, length: int) -> Block:
    if length < CID_LENGTH:
        raise _invalid(f"CAR section of {length} bytes is too short for a CID")
    prefix = bytes(buf[start : start + 4])
    if prefix != DAG_CBOR_PREFIX and prefix != RAW_PREFIX:
        kind = "a CIDv0" if prefix[:2] == _CIDV0_PREFIX else "not a dag-cbor/raw sha2-256 CIDv1"
        raise _invalid(f"CAR block CID is {kind}")
    cid = bytes(buf[start : start + CID_LENGTH])
    data = bytes(buf[start + CID_LENGTH : start + length])
    if hashlib.sha256(data).digest() != cid[4:]:
        raise ProtocolViolation(f"CAR block does not hash to its CID {format_cid(cid)}", code="cid_mismatch")
    return cid, data


def _invalid(message: str) -> ProtocolViolation:
    return ProtocolViolation(message, code="invalid_car")
