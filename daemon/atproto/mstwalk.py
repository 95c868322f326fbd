"""A resumable walk of the MST restricted to key ranges, fed block by block (SPEC 6.2 step 2).

The walk never fetches anything itself. It knows which blocks it still needs, the caller fetches them (in
``getBlocks`` batches, or a whole ``getRepo`` CAR) and feeds them in, and the walk goes on::

    walk = MstWalk(commit.data, [KeyRange.collection("com.example.thing", after=last_rkey)])
    while not walk.done:
        batch = walk.needed(100)
        for cid, data in fetch_blocks(batch):
            walk.feed(cid, data)
        walk.check_delivered(batch)          # a block the PDS did not send is an error, never a skip
        write(walk.take_records())           # in key order; checkpoint the last key written
    write(walk.take_records())

It descends only into subtrees whose key bounds can hold keys of the ranges, checks every node it visits
(:func:`~daemon.atproto.mst.decode_node` and :func:`~daemon.atproto.mst.check_node`), and releases records
``(key, record CID, record bytes)`` in key order as soon as everything to their left is resolved. Node
blocks are decoded and dropped as they arrive, record bytes are held only until released, and blocks nobody
asked for are dropped unless fed with ``keep=True`` (a ``getRepo`` CAR, whose blocks come in no walk order:
those are held until they are used or the walk is done).

:meth:`MstWalk.needed` lists node blocks before record blocks, so that each round trip uncovers as much of
the tree as it can and the batches stay full. Error codes (ProtocolViolation): ``block_missing``,
``cid_mismatch``, ``invalid_mst``, ``invalid_cbor``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain, islice

from daemon.atproto.cid import Cid, format_cid, verify_block
from daemon.atproto.mst import MstNode, check_node, decode_node
from daemon.errors import ProtocolViolation


@dataclass(frozen=True, slots=True)
class KeyRange:
    """The MST keys ``start <= key < end``."""

    start: bytes
    end: bytes

    @classmethod
    def collection(cls, collection: str, *, after: str | None = None) -> KeyRange:
        """All keys ``<collection>/<rkey>``, or only those whose rkey sorts after ``after`` (a checkpoint)."""
        prefix = collection.encode() + b"/"
        # "0" is the byte after "/", and no key holds a NUL, so key + NUL is the least key after it.
        start = prefix if after is None else prefix + after.encode() + b"\x00"
        return cls(start, collection.encode() + b"0")


@dataclass(frozen=True, slots=True)
class MstRecord:
    """A record the walk found: its full MST ``key``, its ``cid`` and its block bytes ``data``."""

    key: str
    cid: Cid
    data: bytes

    @property
    def collection(self) -> str:
        """The NSID part of the key."""
        return self.key.partition("/")[0]

    @property
    def rkey(self) -> str:
        """The record key part of the key (not yet checked against the record-key syntax)."""
        return self.key.partition("/")[2]


class _Record:
    __slots__ = ("cid", "data", "key")

    def __init__(self, key: bytes, cid: Cid) -> None:
        self.key = key
        self.cid = cid
        self.data: bytes | None = None


class _Subtree:
    """A subtree at its place in the tree; ``items`` (records and subtrees, in key order) once loaded."""

    __slots__ = ("cid", "items", "layer", "lower", "pos", "upper")

    def __init__(self, cid: Cid, layer: int | None, lower: bytes | None, upper: bytes | None) -> None:
        self.cid = cid
        self.layer = layer
        self.lower = lower
        self.upper = upper
        self.items: list[_Record | _Subtree | None] | None = None
        self.pos = 0


class MstWalk:
    """The walk of the tree under ``root`` for the keys in ``ranges`` (see the module docstring).

    Once a method has raised, the walk is in no defined state: the caller fails the job (or starts over).
    """

    def __init__(self, root: Cid, ranges: Sequence[KeyRange]) -> None:
        self._ranges = tuple(ranges)
        self._want_nodes: dict[Cid, list[_Subtree]] = {}
        self._want_records: dict[Cid, list[_Record]] = {}
        self._spare: dict[Cid, bytes] = {}
        self._out: list[MstRecord] = []
        root_slot = self._want_subtree(root, None, None, None)
        self._path: list[_Subtree] = [root_slot]

    @property
    def done(self) -> bool:
        """Whether every record in the ranges has been found (and released to :meth:`take_records`)."""
        return not self._path

    def needed(self, limit: int | None = None) -> list[Cid]:
        """The blocks the walk is waiting for (nodes first), at most ``limit`` of them."""
        return list(islice(chain(self._want_nodes, self._want_records), limit))

    def feed(self, cid: Cid, data: bytes, *, keep: bool = False) -> None:
        """Deliver a block; raises ProtocolViolation ``cid_mismatch`` unless ``data`` hashes to ``cid``.

        A block the walk does not (yet) need is dropped, or with ``keep`` held until it is needed or the walk
        is done. Raises ``invalid_mst``/``invalid_cbor`` for a node that fails its checks.
        """
        verify_block(cid, data)
        records = self._want_records.pop(cid, None)
        subtrees = self._want_nodes.pop(cid, None)
        if keep and subtrees is None and not self.done:
            # Kept even when it was wanted: a record block may be wanted again under another key.
            self._spare[cid] = data
        if records is None and subtrees is None:
            return
        for record in records or ():
            record.data = data
        for subtree in subtrees or ():
            self._load(subtree, data)
        self._release()

    def check_delivered(self, requested: Iterable[Cid]) -> None:
        """Raise ProtocolViolation ``block_missing`` if a block of ``requested`` is still needed."""
        missing = [cid for cid in requested if cid in self._want_nodes or cid in self._want_records]
        if missing:
            raise ProtocolViolation(
                f"{len(missing)} requested block(s) were not delivered, e.g. {format_cid(missing[0])}",
                code="block_missing",
            )

    def finish(self) -> None:
        """Raise ProtocolViolation ``block_missing`` unless the walk is done (for the whole-repo path)."""
        if not self.done:
            self.check_delivered(self.needed())

    def take_records(self) -> list[MstRecord]:
        """The records released since the last call, in key order."""
        out, self._out = self._out, []
        return out

    def _want_subtree(
        self, cid: Cid, layer: int | None, lower: bytes | None, upper: bytes | None
    ) -> _Subtree:
        subtree = _Subtree(cid, layer, lower, upper)
        data = self._spare.pop(cid, None)
        if data is None:
            self._want_nodes.setdefault(cid, []).append(subtree)
        else:
            self._load(subtree, data)  # verified when it was fed
        return subtree

    def _want_record(self, key: bytes, cid: Cid) -> _Record:
        record = _Record(key, cid)
        # A kept record block stays until the walk is done: another key may hold the same record.
        record.data = self._spare.get(cid)
        if record.data is None:
            self._want_records.setdefault(cid, []).append(record)
        return record

    def _load(self, subtree: _Subtree, data: bytes) -> None:
        """Check a subtree's node and lay out its items in the ranges (loading kept children at once)."""
        node = decode_node(data)
        layer = check_node(
            node, layer=subtree.layer, lower=subtree.lower, upper=subtree.upper, cid=subtree.cid
        )
        subtree.items = self._items(node, layer - 1, subtree.lower, subtree.upper)

    def _items(
        self, node: MstNode, child_layer: int, lower: bytes | None, upper: bytes | None
    ) -> list[_Record | _Subtree | None]:
        items: list[_Record | _Subtree | None] = []
        entries = node.entries
        left_upper = entries[0].key if entries else upper
        if node.left is not None and self._overlaps(lower, left_upper):
            items.append(self._want_subtree(node.left, child_layer, lower, left_upper))
        for index, entry in enumerate(entries):
            if self._contains(entry.key):
                items.append(self._want_record(entry.key, entry.value))
            right_upper = entries[index + 1].key if index + 1 < len(entries) else upper
            if entry.right is not None and self._overlaps(entry.key, right_upper):
                items.append(self._want_subtree(entry.right, child_layer, entry.key, right_upper))
        return items

    def _contains(self, key: bytes) -> bool:
        return any(r.start <= key < r.end for r in self._ranges)

    def _overlaps(self, lower: bytes | None, upper: bytes | None) -> bool:
        # Can a key strictly between the bounds be in a range? (An over-estimate costs one fetch at most.)
        return any(
            (upper is None or r.start < upper) and (lower is None or lower < r.end) for r in self._ranges
        )

    def _release(self) -> None:
        """Move every record with nothing unresolved to its left into the output, in key order."""
        path = self._path
        while path:
            subtree = path[-1]
            items = subtree.items
            if items is None:
                return
            if subtree.pos == len(items):
                path.pop()
                subtree.items = []
                continue
            item = items[subtree.pos]
            if isinstance(item, _Record):
                if item.data is None:
                    return
                self._out.append(MstRecord(item.key.decode("ascii"), item.cid, item.data))
            elif item is not None:
                path.append(item)
            items[subtree.pos] = None  # released: let it go
            subtree.pos += 1
        self._spare.clear()
