"""MSTs that break the tree rules while every block is internally consistent (its CID matches its bytes).

Both break the root node, so that every walk, whatever collections it reads and however it fetches, meets
the fault: :func:`unordered_tree` puts two root entries out of key order, :func:`wrong_layer_tree` puts a
key of another layer into the root. Where the canonical root has too few entries to break that way, keys
that no record has are added (the value of an added key is a record of the repo, or a filler record).
:func:`lenient_path` searches a tree without checking it, so that getRecord can serve broken trees too.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from typing import Final

from daemon.atproto.cbor import decode_dag_cbor, encode_record
from daemon.atproto.cid import Cid, cid_for_block
from daemon.atproto.mst import build_mst, encode_node, key_layer
from daemon.simnet.ids import tid_from_int

NodeItems = list[tuple[bytes, Cid, Cid | None]]
_MAX_DEPTH: Final = 64


def raw_node(block: bytes) -> tuple[Cid | None, NodeItems]:
    """A node's left subtree and ``(key, value, right subtree)`` entries, decoded without any check."""
    value = decode_dag_cbor(block)
    left = value["l"]
    items: NodeItems = []
    previous = b""
    for entry in value["e"]:
        key = previous[: entry["p"]] + entry["k"]
        right = entry["t"]
        items.append((key, bytes(entry["v"]), None if right is None else bytes(right)))
        previous = key
    return (None if left is None else bytes(left)), items


def lenient_path(root: Cid, blocks: Mapping[Cid, bytes], key: bytes) -> tuple[list[Cid], Cid | None]:
    """The node CIDs from ``root`` to where ``key`` is or would be (as far as the blocks go), and the
    record CID when the key is there; a search, not a check (the nodes may break every MST rule)."""
    path: list[Cid] = []
    cid: Cid | None = root
    while cid is not None and cid in blocks and len(path) < _MAX_DEPTH:
        path.append(cid)
        below, items = raw_node(blocks[cid])
        for entry_key, value, right in items:
            if entry_key == key:
                return path, value
            if entry_key > key:
                break
            below = right
        cid = below
    return path, None


def _keys_on_layer(collection: bytes, layer: int) -> Iterator[bytes]:
    """Keys ``<collection>/<early TID>`` on ``layer``, ascending (the early TIDs sort before every record's)."""
    for number in itertools.count():
        key = collection + b"/" + tid_from_int(number).encode()
        if key_layer(key) == layer:
            yield key


def _key_off_layer(base: bytes, layer: int) -> bytes:
    """A key after ``base`` (``base~<n>``) on any layer but ``layer``."""
    number = 0
    while key_layer(candidate := base + b"~" + str(number).encode()) == layer:
        number += 1
    return candidate


def _filler(blocks: dict[Cid, bytes], collection: str) -> Cid:
    block = encode_record({"$type": collection, "name": "simnet filler"})
    cid = cid_for_block(block)
    blocks[cid] = block
    return cid


def _with_root(left: Cid | None, items: NodeItems, blocks: dict[Cid, bytes]) -> tuple[Cid, dict[Cid, bytes]]:
    block = encode_node(left, items)
    root = cid_for_block(block)
    blocks[root] = block
    return root, blocks


def unordered_tree(entries: list[tuple[bytes, Cid]], collection: str) -> tuple[Cid, dict[Cid, bytes]]:
    """The MST of ``entries`` with the root's first two entries swapped (or, for a root of one entry, an
    added key of the same layer after it that sorts before it): keys not strictly increasing."""
    root, blocks = build_mst(entries)
    left, items = raw_node(blocks.pop(root))
    if len(items) >= 2:
        items[0], items[1] = items[1], items[0]
    elif items:
        key, value, _ = items[0]
        added = next(k for k in _keys_on_layer(key.split(b"/")[0], key_layer(key)) if k < key)
        items.append((added, value, None))
    else:
        value = _filler(blocks, collection)
        first, second = itertools.islice(_keys_on_layer(collection.encode(), 0), 2)
        items = [(second, value, None), (first, value, None)]
    return _with_root(left, items, blocks)


def wrong_layer_tree(entries: list[tuple[bytes, Cid]], collection: str) -> tuple[Cid, dict[Cid, bytes]]:
    """The MST of ``entries`` with an added key, greater than every key, on another layer appended to the
    root (keys stay in order; the root mixes layers)."""
    root, blocks = build_mst(entries)
    left, items = raw_node(blocks.pop(root))
    if items:
        layer = key_layer(items[0][0])
        items.append((_key_off_layer(entries[-1][0], layer), items[-1][1], None))
    else:
        value = _filler(blocks, collection)
        first = next(_keys_on_layer(collection.encode(), 0))
        items = [(first, value, None), (_key_off_layer(first, 0), value, None)]
    return _with_root(left, items, blocks)
