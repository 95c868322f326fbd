"""daemon.atproto.mst: key layers, node checks and tree building, against the vendored MST and commit-proof
interop vectors (tests/interop/mst, tests/interop/firehose), plus every node check by hand.

The checks that depend on a node's place in the tree (layer, bounds, empty nodes) are exercised through
the walk, which is where they run.
"""

from __future__ import annotations

import json
from itertools import count, islice
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.atproto.cbor import Link, decode_dag_cbor, encode_dag_cbor
from daemon.atproto.cid import RAW, cid_for_block, format_cid, parse_cid
from daemon.atproto.mst import (
    MstEntry,
    build_mst,
    common_prefix_length,
    decode_node,
    encode_node,
    key_layer,
    proof_path,
)
from daemon.atproto.mstwalk import KeyRange, MstWalk
from daemon.errors import ProtocolViolation

INTEROP = Path(__file__).resolve().parent / "interop"
LEAF = cid_for_block(b"a record")


def _load(name: str) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads((INTEROP / name).read_text(encoding="utf-8"))
    assert cases, name
    return cases


def _keys_on_layer(layer: int, how_many: int) -> list[bytes]:
    found = (key for key in (b"com.example.x/k%d" % i for i in count()) if key_layer(key) == layer)
    return sorted(islice(found, how_many))


L0 = _keys_on_layer(0, 20)
L1 = _keys_on_layer(1, 5)
L2 = _keys_on_layer(2, 2)


# --- the interop vectors -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", _load("mst/key_heights.json"), ids=lambda case: case["key"] or "empty")
def test_key_heights(case: dict[str, Any]) -> None:
    assert key_layer(case["key"]) == case["height"]
    assert key_layer(case["key"].encode()) == case["height"]


@pytest.mark.parametrize(
    "case", _load("mst/common_prefix.json"), ids=lambda case: f"{case['left']}|{case['right']}"
)
def test_common_prefix(case: dict[str, Any]) -> None:
    assert common_prefix_length(case["left"].encode(), case["right"].encode()) == case["len"]


@pytest.mark.parametrize(
    "case", _load("firehose/commit-proof-fixtures.json"), ids=lambda case: case["comment"]
)
def test_commit_proof_fixture_trees(case: dict[str, Any]) -> None:
    leaf = parse_cid(case["leafValue"])
    before = sorted(case["keys"])
    after = sorted((set(before) | set(case["adds"])) - set(case["dels"]))
    root_before, _ = build_mst([(key, leaf) for key in before])
    root_after, blocks = build_mst([(key, leaf) for key in after])
    assert format_cid(root_before) == case["rootBeforeCommit"]
    assert format_cid(root_after) == case["rootAfterCommit"]
    assert {parse_cid(cid) for cid in case["blocksInProof"]} <= blocks.keys()
    # Walking the same tree (with a leaf whose bytes are known) finds exactly its keys, in order.
    assert _walk(*build_mst([(key, LEAF) for key in after])) == after


def test_vectors_include_the_tricky_shapes() -> None:
    comments = {case["comment"] for case in _load("firehose/commit-proof-fixtures.json")}
    assert {"two deep leafless split", "add on edge with neighbor two layers down"} <= comments


# --- building ------------------------------------------------------------------------------------------


def test_empty_tree() -> None:
    root, blocks = build_mst([])
    assert blocks == {root: encode_dag_cbor({"e": [], "l": None})}
    assert decode_node(blocks[root]).entries == ()


def test_build_refuses_bad_input() -> None:
    with pytest.raises(ValueError):
        build_mst([("a.b/2", LEAF), ("a.b/1", LEAF)])
    with pytest.raises(ValueError):
        build_mst([("a.b/1", LEAF), ("a.b/1", LEAF)])
    for key in ("nokey", "a/b/c", "a b/c", "/c", "a/", "a/" + "x" * 1024):
        with pytest.raises(ValueError):
            build_mst([(key, LEAF)])


def test_nodes_are_prefix_compressed_and_decode_back() -> None:
    keys = [b"com.example.x/aaaa", b"com.example.x/aaab", b"com.example.x/abcd"]
    block = encode_node(None, [(key, LEAF, None) for key in keys])
    raw = [(entry["p"], entry["k"]) for entry in decode_dag_cbor(block)["e"]]
    assert raw == [(0, keys[0]), (17, b"b"), (15, b"bcd")]
    node = decode_node(block)
    assert node.entries == tuple(MstEntry(key, LEAF, None) for key in keys)


def test_large_tree_layers_and_proofs() -> None:
    keys = sorted({f"app.bsky.feed.post/{i:06d}" for i in range(3000)})
    root, blocks = build_mst([(key, LEAF) for key in keys])
    layers = {key_layer(key) for key in keys}
    assert decode_node(blocks[root]).layer == max(layers)
    for key in (keys[0], keys[1234], keys[-1]):
        path = proof_path(root, blocks, key)
        assert path[0] == root
        assert any(entry.key == key.encode() for entry in decode_node(blocks[path[-1]]).entries)
    absent = proof_path(root, blocks, "app.bsky.feed.post/001234x")
    assert absent[0] == root and all(cid in blocks for cid in absent)


# --- node checks of one block --------------------------------------------------------------------------


def _entry(key: bytes, p: Any = 0, **changes: Any) -> dict[str, Any]:
    entry = {"p": p, "k": key, "v": Link(LEAF), "t": None} | changes
    return {name: value for name, value in entry.items() if value is not _ABSENT}


_ABSENT = object()


def _node(entries: list[Any], left: Any = None, **changes: Any) -> bytes:
    node = {"e": entries, "l": left} | changes
    return encode_dag_cbor({name: value for name, value in node.items() if value is not _ABSENT})


BAD_NODES = {
    "not a map": encode_dag_cbor([]),
    "no l": _node([], l=_ABSENT),
    "no e": _node([], e=_ABSENT),
    "e not an array": _node([], e={}),
    "l not a link": _node([], left=b"x"),
    "l a raw CID": _node([], left=Link(cid_for_block(b"x", RAW))),
    "entry not a map": _node([[0, L0[0]]]),
    "entry without t": _node([_entry(L0[0], t=_ABSENT)]),
    "entry without v": _node([_entry(L0[0], v=_ABSENT)]),
    "entry v null": _node([{"p": 0, "k": L0[0], "v": None, "t": None}]),
    "entry v bytes": _node([_entry(L0[0], v=LEAF)]),
    "entry t not a link": _node([_entry(L0[0], t="x")]),
    "p not an int": _node([_entry(L0[0], p="0")]),
    "k not bytes": _node([_entry(L0[0], k=L0[0].decode())]),
    "first p not 0": _node([_entry(L0[0], p=3)]),
    "negative p": _node([_entry(L0[0]), _entry(L0[1], p=-1)]),
    "p longer than the previous key": _node([_entry(L0[0]), _entry(b"x", p=len(L0[0]) + 1)]),
    "entries out of order": _node([_entry(L0[1]), _entry(L0[0])]),
    "duplicate keys": _node([_entry(L0[0]), _entry(b"", p=len(L0[0]))]),
    "key without a slash": _node([_entry(b"comexample")]),
    "key with two slashes": _node([_entry(b"com.example/a/b")]),
    "key with a space": _node([_entry(b"com.example/a b")]),
    "key with non-ASCII": _node([_entry("com.example/é".encode())]),
    "mixed layers": _node([_entry(min(L0[0], L1[0])), _entry(max(L0[0], L1[0]))]),
    "trailing bytes": _node([]) + b"\x00",
}


@pytest.mark.parametrize("block", BAD_NODES.values(), ids=BAD_NODES.keys())
def test_bad_nodes(block: bytes) -> None:
    with pytest.raises(ProtocolViolation) as excinfo:
        decode_node(block)
    assert excinfo.value.code in ("invalid_mst", "invalid_cbor")


def test_unknown_node_fields_are_ignored() -> None:
    block = _node([_entry(L0[0], extra=1)], extra="x")
    assert decode_node(block).entries == (MstEntry(L0[0], LEAF, None),)


# --- node checks in their place (through the walk) -----------------------------------------------------


def _walk(root: bytes, blocks: dict[bytes, bytes]) -> list[str]:
    walk = MstWalk(root, [KeyRange(b"", b"\xff")])
    while not walk.done:
        for cid in walk.needed():
            walk.feed(cid, blocks.get(cid, b"a record"))
    return [record.key for record in walk.take_records()]


def _tree(*blocks: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    """Blocks listed children first; the last is the root."""
    by_cid = {cid_for_block(block): block for block in blocks}
    return cid_for_block(blocks[-1]), by_cid


def _leaf(*keys: bytes) -> bytes:
    return encode_node(None, [(key, LEAF, None) for key in keys])


def _link(block: bytes) -> Link:
    return Link(cid_for_block(block))


def test_a_hand_built_valid_tree_walks() -> None:
    # root (layer 2) -> left: an empty layer-1 node -> a layer-0 node; that shape is what real trees have.
    low = _leaf(L0[0])
    middle = _node([], left=_link(low))
    root_key = L2[0] if L2[0] > L0[0] else L2[1]
    assert root_key > L0[0]
    root = encode_node(cid_for_block(middle), [(root_key, LEAF, None)])
    assert _walk(*_tree(low, middle, root)) == [L0[0].decode(), root_key.decode()]


def _refused(root: bytes, blocks: dict[bytes, bytes], match: str) -> None:
    with pytest.raises(ProtocolViolation, match=match) as excinfo:
        _walk(root, blocks)
    assert excinfo.value.code == "invalid_mst"


def test_key_at_the_wrong_layer() -> None:
    # A layer-0 node placed right under a layer-2 root (it should be on layer 1).
    low = _leaf(L0[0])
    high = max(L2)
    _refused(
        *_tree(low, encode_node(cid_for_block(low), [(high, LEAF, None)])), "on layer 0, its place is layer 1"
    )


def test_key_outside_its_parents_bounds() -> None:
    pivot = next(key for key in L1 if min(L0) < key < max(L0))
    smaller, larger = _leaf(min(L0)), _leaf(max(L0))
    # The subtree right of the pivot holds a smaller key; the subtree left of it a larger one.
    _refused(*_tree(smaller, encode_node(None, [(pivot, LEAF, cid_for_block(smaller))])), "bounds")
    _refused(*_tree(larger, encode_node(cid_for_block(larger), [(pivot, LEAF, None)])), "bounds")
    # Between two entries, a key beyond the next entry.
    first, second = L1[0], L1[1]
    assert max(L0) > second
    beyond = larger
    _refused(
        *_tree(beyond, encode_node(None, [(first, LEAF, cid_for_block(beyond)), (second, LEAF, None)])),
        "bounds",
    )


def test_empty_intermediate_node_at_the_wrong_layer() -> None:
    # Under a layer-1 root, the empty node is on layer 0, which cannot point to anything.
    low = _leaf(min(L0))
    middle = _node([], left=_link(low))
    root_key = max(L1)
    _refused(
        *_tree(low, middle, encode_node(cid_for_block(middle), [(root_key, LEAF, None)])),
        "layer-0 node points",
    )


def test_empty_node_below_the_root() -> None:
    empty = _node([])
    _refused(
        *_tree(empty, encode_node(cid_for_block(empty), [(max(L1), LEAF, None)])), "empty node below the root"
    )


def test_root_without_entries_must_be_an_empty_tree() -> None:
    low = _leaf(L0[0])
    _refused(*_tree(low, _node([], left=_link(low))), "must be an empty tree")
    assert _walk(*_tree(_node([]))) == []


def test_layer_zero_node_with_a_subtree() -> None:
    low = _leaf(max(L0))
    _refused(*_tree(low, encode_node(None, [(min(L0), LEAF, cid_for_block(low))])), "layer-0 node points")


@settings(deadline=None, max_examples=300)
@given(st.binary(max_size=200))
def test_random_node_bytes_raise_only_protocol_violations(data: bytes) -> None:
    try:
        decode_node(data)
    except ProtocolViolation as exc:
        assert exc.code in ("invalid_mst", "invalid_cbor")


@settings(deadline=None, max_examples=300)
@given(st.data())
def test_mutated_nodes_raise_only_protocol_violations(data: st.DataObject) -> None:
    block = bytearray(_leaf(*L0[:4]))
    for _ in range(data.draw(st.integers(1, 3))):
        block[data.draw(st.integers(0, len(block) - 1))] = data.draw(st.integers(0, 255))
    try:
        node = decode_node(bytes(block))
    except ProtocolViolation as exc:
        assert exc.code in ("invalid_mst", "invalid_cbor")
    else:
        keys = [entry.key for entry in node.entries]
        assert keys == sorted(set(keys))
