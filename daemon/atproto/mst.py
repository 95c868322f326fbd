"""The repo's Merkle Search Tree: key layers, node blocks and their checks, building a tree (SPEC 6.2).

Every key sits on the layer given by the leading zero bits of ``sha256(key)`` counted two at a time (so
each layer holds about a quarter of the keys below it). A node holds the keys of one layer in a key range,
in order, with the subtrees (one layer lower) between and around them::

    node  = {"l": CID | null, "e": [entry, ...]}        "l": the subtree left of the first key
    entry = {"p": int, "k": bytes, "v": CID, "t": CID | null}
            key = previous key[:p] + k; "v": the record; "t": the subtree right of this key

:func:`decode_node` checks what one block alone can show: the structure, that each ``p`` is 0 for the first
entry and at most the previous key's length, that keys are valid MST keys, strictly increasing and all on one
layer. :func:`check_node` checks a node against its place in the tree: the layer carried down from the root
(a child is exactly one layer lower; layer 0 has no children), the key bounds its parent's entries set, and
that only the root of an entirely empty tree has neither entries nor a left subtree. Together they make a
tree canonical for its key set. Keys follow the reference implementation's MST key rule (``<a>/<b>``, at
most 1024 characters of ``[A-Za-z0-9_~:.-]``); whether ``<a>/<b>`` is a valid NSID and record key is the
reader's business (an invalid record key is skipped, not a broken tree). Unknown node fields are ignored, as
the reference does.

Error code (ProtocolViolation): ``invalid_mst``; ``invalid_cbor`` for a block that is not canonical DAG-CBOR.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from daemon.atproto.cbor import Link, decode_dag_cbor, encode_dag_cbor
from daemon.atproto.cid import Cid, cid_for_block, format_cid, is_dag_cbor_cid
from daemon.errors import ProtocolViolation

MAX_KEY_LENGTH = 1024
_KEY_RE = re.compile(rb"[a-zA-Z0-9_~:.-]+/[a-zA-Z0-9_~:.-]+")


@dataclass(frozen=True, slots=True)
class MstEntry:
    """One key of a node: the full ``key``, the record CID ``value``, the subtree to its ``right``."""

    key: bytes
    value: Cid
    right: Cid | None


@dataclass(frozen=True, slots=True)
class MstNode:
    """A decoded node; ``layer`` is its keys' layer (None for a node without entries)."""

    left: Cid | None
    entries: tuple[MstEntry, ...]
    layer: int | None


def key_layer(key: bytes | str) -> int:
    """The MST layer of ``key``: leading zero bits of its SHA-256, halved (rounded down)."""
    raw = key.encode() if isinstance(key, str) else key
    return (256 - int.from_bytes(hashlib.sha256(raw).digest(), "big").bit_length()) >> 1


def is_valid_mst_key(key: bytes) -> bool:
    """Whether ``key`` is a valid MST key: ``<collection>/<rkey>`` in the reference implementation's rule."""
    return len(key) <= MAX_KEY_LENGTH and _KEY_RE.fullmatch(key) is not None


def common_prefix_length(a: bytes, b: bytes) -> int:
    """How many leading bytes ``a`` and ``b`` share."""
    limit = min(len(a), len(b))
    index = 0
    while index < limit and a[index] == b[index]:
        index += 1
    return index


def decode_node(block: bytes) -> MstNode:
    """Decode an MST node block and check what the block alone can show (see the module docstring)."""
    value = decode_dag_cbor(block)
    if type(value) is not dict or "l" not in value or type(value.get("e")) is not list:
        raise _invalid("MST node is not a map with l and an e array")
    left = _pointer(value["l"], "l")
    entries: list[MstEntry] = []
    previous = b""
    layer: int | None = None
    for item in value["e"]:
        key = _entry_key(item, previous, first=not entries)
        key_layer_ = key_layer(key)
        if layer is None:
            layer = key_layer_
        elif key_layer_ != layer:
            raise _invalid(f"MST node mixes layers {layer} and {key_layer_} (key {_key(key)})")
        entries.append(MstEntry(key, _link(item.get("v"), "v"), _pointer(item["t"], "t")))
        previous = key
    return MstNode(left, tuple(entries), layer)


def check_node(
    node: MstNode, *, layer: int | None, lower: bytes | None, upper: bytes | None, cid: Cid
) -> int:
    """Check a node against its place in the tree; returns its layer.

    ``layer`` is the layer its parent puts it on (None for the root, whose layer comes from its keys);
    ``lower``/``upper`` are the exclusive key bounds its parent's entries set (None: unbounded).
    """
    where = f"MST node {format_cid(cid)}"
    if node.layer is None:
        if layer is None and node.left is not None:
            raise _invalid(f"{where}: a root without entries must be an empty tree, not point to a subtree")
        if layer is not None and node.left is None:
            raise _invalid(f"{where}: an empty node below the root")
        actual = 0 if layer is None else layer
    else:
        actual = node.layer
        if layer is not None and actual != layer:
            raise _invalid(f"{where}: its keys are on layer {actual}, its place is layer {layer}")
        first, last = node.entries[0].key, node.entries[-1].key
        if (lower is not None and first <= lower) or (upper is not None and last >= upper):
            raise _invalid(f"{where}: keys outside the bounds its parent sets")
    if actual == 0 and (node.left is not None or any(entry.right is not None for entry in node.entries)):
        raise _invalid(f"{where}: a layer-0 node points to a subtree")
    return actual


def encode_node(left: Cid | None, entries: Sequence[tuple[bytes, Cid, Cid | None]]) -> bytes:
    """The canonical block of a node from its left subtree and ``(key, value, right subtree)`` entries."""
    encoded: list[dict[str, Any]] = []
    previous = b""
    for key, value, right in entries:
        prefix = common_prefix_length(previous, key)
        encoded.append(
            {"k": key[prefix:], "p": prefix, "t": None if right is None else Link(right), "v": Link(value)}
        )
        previous = key
    return encode_dag_cbor({"e": encoded, "l": None if left is None else Link(left)})


def build_mst(entries: Sequence[tuple[bytes | str, Cid]]) -> tuple[Cid, dict[Cid, bytes]]:
    """Build the canonical MST of ``entries`` (strictly increasing keys): ``(root CID, {CID: node block})``.

    Raises ValueError for keys out of order or not valid MST keys.
    """
    keys = [key.encode() if isinstance(key, str) else key for key, _ in entries]
    values = [value for _, value in entries]
    for index, key in enumerate(keys):
        if not is_valid_mst_key(key):
            raise ValueError(f"not a valid MST key: {key[:120]!r}")
        if index and key <= keys[index - 1]:
            raise ValueError(f"MST keys are not strictly increasing at {key[:120]!r}")
    layers = [key_layer(key) for key in keys]
    blocks: dict[Cid, bytes] = {}

    def node(lo: int, hi: int, layer: int) -> Cid:
        # The node on ``layer`` holding keys[lo:hi], whose layers are all <= layer.
        left: Cid | None = None
        node_entries: list[tuple[bytes, Cid, Cid | None]] = []
        start = lo
        for index in range(lo, hi):
            if layers[index] == layer:
                below = node(start, index, layer - 1) if index > start else None
                if node_entries:
                    node_entries[-1] = (*node_entries[-1][:2], below)
                else:
                    left = below
                node_entries.append((keys[index], values[index], None))
                start = index + 1
        if hi > start:
            below = node(start, hi, layer - 1)
            if node_entries:
                node_entries[-1] = (*node_entries[-1][:2], below)
            else:
                left = below
        block = encode_node(left, node_entries)
        cid = cid_for_block(block)
        blocks[cid] = block
        return cid

    root = node(0, len(keys), max(layers, default=0))
    return root, blocks


def proof_path(root: Cid, blocks: Mapping[Cid, bytes], key: bytes | str) -> list[Cid]:
    """The node CIDs from the root down to where ``key`` is or would be: an inclusion or absence proof.

    ``blocks`` must hold the nodes on the path (a tree :func:`build_mst` made); KeyError if one is missing.
    """
    target = key.encode() if isinstance(key, str) else key
    path: list[Cid] = []
    cid: Cid | None = root
    while cid is not None:
        path.append(cid)
        node = decode_node(blocks[cid])
        below = [entry for entry in node.entries if entry.key < target]
        if len(below) < len(node.entries) and node.entries[len(below)].key == target:
            break
        cid = below[-1].right if below else node.left
    return path


def _entry_key(item: Any, previous: bytes, *, first: bool) -> bytes:
    if type(item) is not dict or "t" not in item:
        raise _invalid("MST entry is not a map with p, k, v and t")
    prefix, suffix = item.get("p"), item.get("k")
    if type(prefix) is not int or type(suffix) is not bytes:
        raise _invalid("MST entry p is not an integer or k not a byte string")
    if prefix < 0 or prefix > len(previous) or (first and prefix != 0):
        raise _invalid(f"MST entry prefix length {prefix} does not fit the previous key")
    key = previous[:prefix] + suffix
    if not is_valid_mst_key(key):
        raise _invalid(f"not a valid MST key: {_key(key)}")
    if key <= previous:
        raise _invalid(f"MST keys are not strictly increasing at {_key(key)}")
    return key


def _pointer(value: Any, name: str) -> Cid | None:
    return None if value is None else _link(value, name)


def _link(value: Any, name: str) -> Cid:
    if type(value) is not Link or not is_dag_cbor_cid(value):
        raise _invalid(f"MST {name} is not a dag-cbor sha2-256 CID link")
    return bytes(value)


def _key(key: bytes) -> str:
    return repr(key[:120])


def _invalid(message: str) -> ProtocolViolation:
    return ProtocolViolation(message, code="invalid_mst")
