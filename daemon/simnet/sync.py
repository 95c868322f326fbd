"""The sync endpoints of a simulated PDS, answering from an account's :class:`~daemon.simnet.repos.Repo`
as the reference PDS (@atproto/pds) does.

- ``getRecord?did&collection&rkey``: a CAR whose one root is the commit, holding the commit, the MST nodes
  on the path to the key and the record block if it exists (200 with a proof of absence if not);
- ``getLatestCommit?did``: ``{"cid", "rev"}``;
- ``getBlocks?did&cids=...``: a CAR with zero roots holding the requested blocks (sorted by CID, not in
  the order asked; duplicates collapse); any CID the repo lacks fails the whole request with 400
  ``InvalidRequest`` "Could not find cids: <cid>,<cid>";
- ``getRepo?did``: the whole repo, root = the commit, blocks sorted by CID (no walk order), streamed;
- ``getRepoStatus?did``: ``{"did", "active": true, "rev"}`` (the account gate, in the PDS handler, answers
  for unavailable accounts).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator, Mapping
from typing import Final

from daemon.atproto.car import encode_car, encode_varint
from daemon.atproto.cid import DAG_CBOR_PREFIX, RAW_PREFIX, Cid, format_cid, parse_cid
from daemon.atproto.syntax import is_valid_nsid, is_valid_record_key
from daemon.errors import SyntaxValidationError
from daemon.simnet.actions import CAR, Action, Chunks, Reply, error_reply, json_reply
from daemon.simnet.repos import MIB, Repo

GET_RECORD: Final = "/xrpc/com.atproto.sync.getRecord"
GET_LATEST_COMMIT: Final = "/xrpc/com.atproto.sync.getLatestCommit"
GET_BLOCKS: Final = "/xrpc/com.atproto.sync.getBlocks"
GET_REPO: Final = "/xrpc/com.atproto.sync.getRepo"
GET_REPO_STATUS: Final = "/xrpc/com.atproto.sync.getRepoStatus"
SYNC_METHODS: Final = frozenset({GET_RECORD, GET_LATEST_COMMIT, GET_BLOCKS, GET_REPO, GET_REPO_STATUS})
# Methods whose answer needs the account's repo built (getRepoStatus only needs the rev).
REPO_METHODS: Final = SYNC_METHODS - {GET_REPO_STATUS}
_FILLER_SECTION: Final = MIB  # bytes per filler section of a car_huge getRepo
# How tiny filler blocks begin: like every MST node block (a two-entry map whose first key is "e").
_NODE_START: Final = b"\xa2\x61\x65"
_FILLER_CHUNK: Final = 256 * 1024  # tiny filler sections are sent in pieces of about this size


def missing_param(name: str) -> Reply:
    """The reference's answer to a request without a required parameter."""
    return error_reply(400, "InvalidRequest", f'Error: Params must have the property "{name}"')


def answer(method: str, repo: Repo, args: Mapping[str, list[str]]) -> Action:
    """The answer of sync ``method`` (one of :data:`REPO_METHODS`) from ``repo``."""
    if method == GET_LATEST_COMMIT:
        return json_reply(200, {"cid": format_cid(repo.commit), "rev": repo.rev})
    if method == GET_RECORD:
        return get_record(repo, args)
    if method == GET_BLOCKS:
        return get_blocks(repo, args)
    return Chunks(repo.car_chunks)


def repo_status(did: str, rev: str) -> Reply:
    """getRepoStatus of an active account."""
    return json_reply(200, {"did": did, "active": True, "rev": rev})


def get_record(repo: Repo, args: Mapping[str, list[str]]) -> Reply:
    """The proof CAR of ``collection``/``rkey`` (of presence or of absence)."""
    collection = args.get("collection", [""])[0]
    rkey = args.get("rkey", [""])[0]
    if not collection:
        return missing_param("collection")
    if not rkey:
        return missing_param("rkey")
    if not is_valid_nsid(collection):
        return error_reply(400, "InvalidRequest", "Error: collection must be a valid nsid")
    if not is_valid_record_key(rkey):
        return error_reply(400, "InvalidRequest", "Error: rkey must be a valid Record Key")
    return Reply(200, encode_car([repo.commit], repo.record_proof(f"{collection}/{rkey}")), CAR)


def get_blocks(repo: Repo, args: Mapping[str, list[str]]) -> Reply:
    """The CAR of the requested blocks, or 400 naming the ones the repo lacks."""
    texts = [text for text in args.get("cids", []) if text]
    if not texts:
        return missing_param("cids")
    cids: list[Cid] = []
    for position, text in enumerate(texts):
        try:
            cids.append(parse_cid(text))
        except SyntaxValidationError:
            return error_reply(400, "InvalidRequest", f"Error: cids/{position} must be a cid string")
    unique = sorted(set(cids))
    missing = [format_cid(cid) for cid in dict.fromkeys(cids) if cid not in repo.blocks]
    if missing:
        return error_reply(400, "InvalidRequest", f"Could not find cids: {','.join(missing)}")
    return Reply(200, repo.car(unique), CAR)


@functools.lru_cache(maxsize=8)
def filler_section(total: int) -> bytes:
    """A CAR section of exactly ``total`` bytes (>= 40) holding a raw block of zeros (its CID matches)."""
    for length in (1, 2, 3, 4):
        data = bytes(total - length - 36)
        section = encode_varint(36 + len(data))
        if len(section) == length:
            return section + RAW_PREFIX + hashlib.sha256(data).digest() + data
    raise ValueError(f"no CAR section of {total} bytes")


def huge_repo(
    repo: Repo,
    size: int,
    declare_length: bool,
    block_bytes: int = 0,
    dag_cbor: bool = False,
    salt: int = 0,
) -> Chunks:
    """A getRepo CAR of ``size`` bytes (or the repo's own size if larger): the whole repo, then filler
    blocks no walk needs (1 MiB raw sections; or of ``block_bytes`` each, with dag-cbor CIDs if
    ``dag_cbor``, distinct for each ``salt``); streamed, never held whole."""
    return with_filler(list(repo.car_chunks()), size, declare_length, block_bytes, dag_cbor, salt)


def car_header_length(car: bytes) -> int:
    """How many bytes of ``car`` its header takes (the varint and the header block)."""
    length, shift, pos = 0, 0, 0
    while True:
        byte = car[pos]
        length |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return pos + length
        shift += 7


def with_filler(
    car: list[bytes],
    size: int,
    declare_length: bool,
    block_bytes: int = 0,
    dag_cbor: bool = False,
    salt: int = 0,
    *,
    after: list[bytes] | None = None,
) -> Chunks:
    """The CAR ``car`` (its pieces), then filler blocks up to ``size`` bytes in all (see huge_repo), then
    ``after`` (more of the CAR's own sections)."""
    after = after or []
    real = sum(len(chunk) for chunk in car) + sum(len(chunk) for chunk in after)
    extra = max(0, size - real)
    if block_bytes:
        pieces = tiny_filler(block_bytes, size, dag_cbor, salt)
        section = _tiny_section_length(block_bytes)
        count = extra // section
        per_piece = len(pieces[0]) // section if pieces else 1
        whole, rest = divmod(count, per_piece)
        tail = pieces[whole][: rest * section] if rest else b""
        total = real + count * section

        def tiny() -> Iterator[bytes]:
            yield from car
            yield from pieces[:whole]
            yield tail
            yield from after

        return Chunks(tiny, total if declare_length else None)
    full, rest = divmod(extra, _FILLER_SECTION)
    sections = [_FILLER_SECTION] * full
    if rest and sections and rest < 40:
        sections[-1] += rest
    elif rest >= 40:
        sections.append(rest)

    def chunks() -> Iterator[bytes]:
        yield from car
        for length in sections:
            yield filler_section(length)
        yield from after

    total = real + sum(sections)
    return Chunks(chunks, total if declare_length else None)


def _tiny_section_length(block_bytes: int) -> int:
    return len(encode_varint(36 + block_bytes)) + 36 + block_bytes


def tiny_filler_blocks(block_bytes: int, size: int) -> int:
    """How many filler blocks of ``block_bytes`` fit in ``size`` bytes (what :func:`tiny_filler` makes)."""
    return size // _tiny_section_length(block_bytes)


@functools.lru_cache(maxsize=8)
def tiny_filler(block_bytes: int, size: int, dag_cbor: bool = False, salt: int = 0) -> tuple[bytes, ...]:
    """As many CAR sections of distinct blocks of ``block_bytes`` (>= 8) as fit in ``size`` bytes, in
    pieces of about 256 KiB (the same number of sections each). Each block starts like an MST node block;
    their CIDs (raw, or dag-cbor if ``dag_cbor``) match; fillers of different ``salt`` (the account) share
    no block. Built once and shared by every answer of the account (a prefix of it for a smaller one)."""
    prefix = DAG_CBOR_PREFIX if dag_cbor else RAW_PREFIX
    section_length = _tiny_section_length(block_bytes)
    count = size // section_length
    first = salt * count
    per_piece = max(1, _FILLER_CHUNK // section_length)
    head = encode_varint(36 + block_bytes)
    pieces: list[bytes] = []
    for start in range(0, count, per_piece):
        parts: list[bytes] = []
        for index in range(start, min(count, start + per_piece)):
            data = _NODE_START + (first + index).to_bytes(block_bytes - len(_NODE_START), "big")
            parts += (head, prefix, hashlib.sha256(data).digest(), data)
        pieces.append(b"".join(parts))
    return tuple(pieces)


def dribble(action: Action, count: int, interval: float) -> Action:
    """``action`` (a 200) sent as its first ``count`` bytes one at a time, ``interval`` seconds apart, then
    the rest (what pds_trickle does to the sync endpoints); anything else unchanged."""
    if isinstance(action, Reply) and action.status == 200:
        body = action.body
        source: Chunks = Chunks(lambda: iter([body]), None, action.content_type, action.headers)
    elif isinstance(action, Chunks):
        source = action
    else:
        return action

    def pieces() -> Iterator[bytes]:
        left = count
        for chunk in source.chunks():
            while left and chunk:
                yield chunk[:1]
                chunk = chunk[1:]
                left -= 1
            if chunk:
                yield chunk

    return Chunks(pieces, None, source.content_type, source.headers, interval)
