"""The records of the simulated network: keys, values, blocks and CIDs, and how mutations change them.

Record ``index`` of a pair (DID, collection) has a TID record key that grows with the index, a value in the
atproto JSON form (:func:`record_json`, some with a blob, some with bytes, some with a link) and the real
CID of that value's DAG-CBOR block. ``version`` counts the updates a record has had (each gives it a new
value and so a new CID). Negative indices name the records that only listRecords shows (the
``list_unsigned`` mode): ``-1`` is the first of them.

A pair's current records are its initial ``count`` records with the account's :class:`Mutation` s applied
in order (:func:`pair_state`).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

import cbrrr

from daemon.atproto.cid import DAG_CBOR_PREFIX, RAW_PREFIX, format_cid
from daemon.simnet.ids import TID_EPOCH_US, TID_STEP_US, clock_id, tid_from_int

# Record index % 4 decides the extra field: 1 a blob, 2 bytes, 3 a link (0 none).
BLOB_MIME: Final = "image/png"
_EMPTY_VERSIONS: Final[Mapping[int, int]] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Mutation:
    """One change to one collection of an account, applied as a single new commit.

    In this order: ``empty`` deletes every record of the collection, ``delete`` the records with these
    indices, ``update`` gives these records a new value (and CID), ``recreate`` puts records back with the
    value they had (a delete and a create of the same rkey and value: the same CID), and ``create`` adds
    that many new records after the existing ones.
    """

    collection: str
    update: tuple[int, ...] = ()
    delete: tuple[int, ...] = ()
    create: int = 0
    empty: bool = False
    recreate: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("update", "delete", "recreate"):
            object.__setattr__(self, name, tuple(int(i) for i in getattr(self, name)))

    def as_json(self) -> dict[str, object]:
        """The mutation as a JSON-able mapping (the body of the control endpoint's ``POST /mutate``)."""
        return {
            "collection": self.collection,
            "update": list(self.update),
            "delete": list(self.delete),
            "create": self.create,
            "empty": self.empty,
            "recreate": list(self.recreate),
        }


@dataclass(frozen=True, slots=True)
class PairState:
    """The current records of a pair: live ``indices`` ascending (so in key order) and their versions."""

    indices: Sequence[int]
    versions: Mapping[int, int] = field(default_factory=lambda: _EMPTY_VERSIONS)

    def version(self, index: int) -> int:
        """The version of the live record ``index``."""
        return self.versions.get(index, 0)

    def __len__(self) -> int:
        return len(self.indices)


def pair_state(count: int, mutations: Iterable[Mutation], collection: str) -> PairState:
    """The records of a pair that started with ``count`` records, after the mutations of ``collection``.

    Raises ValueError for a mutation that names a record that is not there (update or delete of a record
    that does not exist, recreate of one that never existed).
    """
    changes = [m for m in mutations if m.collection == collection]
    if not changes:
        return PairState(range(count))
    live: dict[int, int] = dict.fromkeys(range(count), 0)
    last: dict[int, int] = {}
    next_index = count
    for change in changes:
        if change.empty:
            last.update(live)
            live.clear()
        for index in change.delete:
            if index not in live:
                raise ValueError(f"{collection}: cannot delete record {index}: it does not exist")
            last[index] = live.pop(index)
        for index in change.update:
            if index not in live:
                raise ValueError(f"{collection}: cannot update record {index}: it does not exist")
            live[index] += 1
        for index in change.recreate:
            if index not in live:
                if index not in last:
                    raise ValueError(f"{collection}: cannot recreate record {index}: it never existed")
                live[index] = last[index]
        for _ in range(change.create):
            live[next_index] = 0
            next_index += 1
    indices = tuple(sorted(live))
    return PairState(indices, MappingProxyType({i: v for i, v in live.items() if v}))


@dataclass(frozen=True, slots=True)
class PairKeys:
    """Derives the record keys of one (DID, collection) pair cheaply, record by record.

    Record ``n`` has the TID ``(TID_EPOCH_US + n * TID_STEP_US) << 10 | clock``; the records only
    listRecords shows (negative indices) sit half a second after record ``-1 - n``.
    """

    did: str
    collection: str
    clock: int

    def rkey(self, index: int) -> str:
        """The record key of record ``index``."""
        return tid_from_int((record_micros(index) << 10) | self.clock)


@functools.lru_cache(maxsize=65536)
def pair_keys(did: str, collection: str) -> PairKeys:
    """The :class:`PairKeys` of a pair (cached)."""
    return PairKeys(did, collection, clock_id(f"{did}|{collection}"))


def record_micros(index: int) -> int:
    """The timestamp (unix microseconds) of record ``index``'s TID and ``createdAt``."""
    if index >= 0:
        return TID_EPOCH_US + index * TID_STEP_US
    return TID_EPOCH_US + (-1 - index) * TID_STEP_US + TID_STEP_US // 2


def record_rkey(did: str, collection: str, index: int) -> str:
    """The record key (a TID) of record ``index`` of the pair."""
    return pair_keys(did, collection).rkey(index)


@functools.lru_cache(maxsize=1 << 17)
def record_created_at(index: int) -> str:
    """The ``createdAt`` of record ``index``: the timestamp its TID encodes, as RFC 3339 UTC."""
    seconds, rest = divmod(record_micros(index), 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{rest // 1000:03d}Z"


def _extra(did: str, collection: str, index: int, version: int) -> tuple[int, object, str]:
    """The kind of extra field of a record (0: none), its value in the JSON form, and that as JSON text."""
    kind = index % 4 if index >= 0 else 0
    if kind == 1:
        blob = format_cid(RAW_PREFIX + hashlib.sha256(f"simnet-blob|{did}|{index}".encode()).digest())
        size = 1024 + index % 4096
        value = {"ref": {"$link": blob}, "size": size, "$type": "blob", "mimeType": BLOB_MIME}
        return (
            kind,
            value,
            f'{{"ref":{{"$link":"{blob}"}},"size":{size},"$type":"blob","mimeType":"{BLOB_MIME}"}}',
        )
    if kind == 2:
        raw = hashlib.sha256(f"simnet-bytes|{did}|{collection}|{index}|{version}".encode()).digest()[:16]
        text = base64.b64encode(raw).decode().rstrip("=")
        return kind, {"$bytes": text}, f'{{"$bytes":"{text}"}}'
    if kind == 3:
        link = format_cid(DAG_CBOR_PREFIX + hashlib.sha256(f"simnet-link|{index}".encode()).digest())
        return kind, {"$link": link}, f'{{"$link":"{link}"}}'
    return kind, None, ""


def _texts(did: str, collection: str, index: int, version: int, altered: bool) -> tuple[str, str]:
    if index < 0:
        name = f"simnet unsigned record {-1 - index}"
        description = f"A record of {collection} that {did} never signed."
    else:
        name = f"simnet record {index}" + (f" (edit {version})" if version else "")
        description = f"Deterministic record {index} of {collection} published by {did}."
    return name + " (altered)" if altered else name, description


def _value(
    collection: str, index: int, name: str, description: str, kind: int, extra: object
) -> dict[str, object]:
    # Canonical order: shorter keys first, then bytewise: icon, name, $type, digest, license, createdAt,
    # description (and inside a blob: ref, size, $type, mimeType).
    value: dict[str, object] = {"icon": extra} if kind == 1 else {}
    value["name"] = name
    value["$type"] = collection
    if kind == 2:
        value["digest"] = extra
    elif kind == 3:
        value["license"] = extra
    value["createdAt"] = record_created_at(index)
    value["description"] = description
    return value


def _text(collection: str, index: int, name: str, description: str, kind: int, extra: str) -> str:
    head = f'"icon":{extra},' if kind == 1 else ""
    middle = f',"digest":{extra}' if kind == 2 else f',"license":{extra}' if kind == 3 else ""
    return (
        f'{{{head}"name":"{name}","$type":"{collection}"{middle},"createdAt":"{record_created_at(index)}",'
        f'"description":"{description}"}}'
    )


def record_json(
    did: str, collection: str, index: int, version: int = 0, *, altered: bool = False
) -> dict[str, object]:
    """The value of a record in the atproto JSON form (links ``{"$link"}``, bytes ``{"$bytes"}``, blobs
    ``{"$type": "blob", "ref", "mimeType", "size"}``), keys in the order listRecords writes them (DAG-CBOR
    canonical order: shorter keys first, then bytewise).

    ``altered`` gives the value the ``list_altered`` mode shows instead (its CID is not the listed one).
    """
    name, description = _texts(did, collection, index, version, altered)
    kind, extra, _ = _extra(did, collection, index, version)
    return _value(collection, index, name, description, kind, extra)


def record_json_text(
    did: str, collection: str, index: int, version: int = 0, *, altered: bool = False
) -> str:
    """:func:`record_json` as compact JSON text, exactly as ``json.dumps(..., separators=(",", ":"))``
    writes it (assembled from templates: no string in a value needs escaping)."""
    name, description = _texts(did, collection, index, version, altered)
    kind, _, extra = _extra(did, collection, index, version)
    return _text(collection, index, name, description, kind, extra)


def listed_entry(did: str, collection: str, index: int, version: int, altered: bool) -> tuple[str, str]:
    """``(cid, value as JSON text)`` of a record as listRecords shows it (one pass for both: the pages)."""
    name, description = _texts(did, collection, index, version, False)
    kind, extra, extra_text = _extra(did, collection, index, version)
    value: Any = _value(collection, index, name, description, kind, extra)
    cid = format_cid(
        DAG_CBOR_PREFIX + hashlib.sha256(cbrrr.encode_dag_cbor(value, atjson_mode=True)).digest()
    )
    if altered:
        name += " (altered)"
    return cid, _text(collection, index, name, description, kind, extra_text)


def record_value(did: str, collection: str, index: int, version: int = 0) -> dict[str, object]:
    """The record body of record ``index`` of the pair (the same as :func:`record_json`)."""
    return record_json(did, collection, index, version)


def record_block(did: str, collection: str, index: int, version: int = 0) -> bytes:
    """The DAG-CBOR block of a record's value (what ``daemon.atproto.cbor.encode_record`` makes of it)."""
    # cbrrr's atjson mode is encode_record without its data-model check, which these values always pass
    # (the tests compare the two); building repos spends a third of its time in that check otherwise.
    value: Any = record_json(did, collection, index, version)
    block: bytes = cbrrr.encode_dag_cbor(value, atjson_mode=True)
    return block


@functools.lru_cache(maxsize=1 << 16)
def record_cid(did: str, collection: str, index: int, version: int = 0) -> str:
    """The CID (CIDv1, dag-cbor, sha2-256, ``bafyrei...``) of the value of record ``index`` of the pair."""
    block = record_block(did, collection, index, version)
    return format_cid(DAG_CBOR_PREFIX + hashlib.sha256(block).digest())


@dataclass(frozen=True, slots=True)
class Record:
    """One record as a PDS lists it (``version``: how many times it was updated)."""

    did: str
    collection: str
    index: int
    rkey: str
    cid: str
    version: int = 0

    @property
    def uri(self) -> str:
        """The canonical AT-URI of the record."""
        return f"at://{self.did}/{self.collection}/{self.rkey}"

    @property
    def key(self) -> str:
        """The record's MST key, ``<collection>/<rkey>``."""
        return f"{self.collection}/{self.rkey}"

    @property
    def value(self) -> dict[str, object]:
        """The record's value in the atproto JSON form (see :func:`record_json`)."""
        return record_json(self.did, self.collection, self.index, self.version)

    def as_tuple(self) -> tuple[str, str, str, str]:
        """``(did, collection, rkey, cid)``, the form the expectation functions use."""
        return (self.did, self.collection, self.rkey, self.cid)


def make_record(did: str, collection: str, index: int, version: int = 0) -> Record:
    """Record ``index`` (at ``version``) of the pair."""
    rkey = pair_keys(did, collection).rkey(index)
    return Record(did, collection, index, rkey, record_cid(did, collection, index, version), version)


def records_before(cursor_tid: int, count: int, clock: int) -> int:
    """How many of a pair's ``count`` records have a TID below ``cursor_tid`` (listRecords paging)."""
    delta = (cursor_tid >> 10) - TID_EPOCH_US
    if delta < 0:
        return 0
    steps, rest = divmod(delta, TID_STEP_US)
    # Record ``steps`` has exactly the cursor's timestamp when ``rest`` is 0; then the clock decides.
    below = steps + 1 if rest or clock < (cursor_tid & 0x3FF) else steps
    return min(below, count)
