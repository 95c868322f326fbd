"""daemon.atproto.mstwalk: the range-restricted, block-fed MST walk.

Trees are built with build_mst over real record blocks; the walk is driven the two ways the daemon drives
it: in getBlocks batches (``needed`` / ``feed`` / ``check_delivered``) and with a whole repo fed in any
order (``feed(keep=True)`` / ``finish``).
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.atproto.cbor import encode_record
from daemon.atproto.cid import cid_for_block, is_dag_cbor_cid
from daemon.atproto.mst import build_mst, decode_node
from daemon.atproto.mstwalk import KeyRange, MstRecord, MstWalk
from daemon.errors import ProtocolViolation

COLLECTIONS = ("app.bsky.feed.like", "app.bsky.feed.post", "com.example.thing", "com.example.thing2")


class Repo:
    """A built tree with a distinct record block per key, and counters of what a walk asked for."""

    def __init__(self, keys: list[str], *, shared_record: bool = False) -> None:
        self.keys = sorted(set(keys))
        self.records: dict[str, tuple[bytes, bytes]] = {}
        for index, key in enumerate(self.keys):
            data = encode_record({"$type": key.partition("/")[0], "n": 0 if shared_record else index})
            self.records[key] = (cid_for_block(data), data)
        self.root, self.nodes = build_mst([(key, cid) for key, (cid, _) in self.records.items()])
        self.blocks = dict(self.nodes) | {cid: data for cid, data in self.records.values()}
        self.fetched: list[bytes] = []

    def in_range(self, key_range: KeyRange) -> list[str]:
        return [key for key in self.keys if key_range.start <= key.encode() < key_range.end]

    def walk_in_batches(self, walk: MstWalk, batch: int = 100) -> list[MstRecord]:
        records: list[MstRecord] = []
        while not walk.done:
            wanted = walk.needed(batch)
            assert wanted and len(wanted) <= batch
            for cid in wanted:
                self.fetched.append(cid)
                walk.feed(cid, self.blocks[cid])
            walk.check_delivered(wanted)
            records += walk.take_records()
        return records + walk.take_records()


def _keys(count: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(COLLECTIONS)}/3l{rng.getrandbits(48):012x}" for _ in range(count)]


REPO = Repo(_keys(3000))


@pytest.mark.parametrize("collection", COLLECTIONS)
def test_collection_walk_returns_exactly_its_records_in_order(collection: str) -> None:
    key_range = KeyRange.collection(collection)
    records = REPO.walk_in_batches(MstWalk(REPO.root, [key_range]))
    assert [record.key for record in records] == REPO.in_range(key_range)
    for record in records:
        assert (record.cid, record.data) == REPO.records[record.key]
        assert record.collection == collection and f"{collection}/{record.rkey}" == record.key


def test_prefix_collections_do_not_leak_into_each_other() -> None:
    # "com.example.thing2/..." sorts after "com.example.thing/..." and must not be in its range.
    records = REPO.walk_in_batches(MstWalk(REPO.root, [KeyRange.collection("com.example.thing")]))
    assert records and all(record.collection == "com.example.thing" for record in records)


def test_walk_descends_only_where_the_range_can_be() -> None:
    repo = Repo([*_keys(3000), "zz.rare.thing/a", "zz.rare.thing/b"])
    records = repo.walk_in_batches(MstWalk(repo.root, [KeyRange.collection("zz.rare.thing")]))
    assert [record.key for record in records] == ["zz.rare.thing/a", "zz.rare.thing/b"]
    nodes_fetched = [cid for cid in repo.fetched if cid in repo.nodes]
    depth = decode_node(repo.nodes[repo.root]).layer
    assert depth is not None and len(nodes_fetched) <= 2 * (depth + 1)
    assert len(repo.fetched) - len(nodes_fetched) == 2


def test_resume_after_a_checkpoint() -> None:
    posts = REPO.in_range(KeyRange.collection("app.bsky.feed.post"))
    checkpoint = posts[len(posts) // 2]
    key_range = KeyRange.collection("app.bsky.feed.post", after=checkpoint.partition("/")[2])
    records = REPO.walk_in_batches(MstWalk(REPO.root, [key_range]))
    assert [record.key for record in records] == posts[len(posts) // 2 + 1 :]


def test_several_ranges_at_once() -> None:
    ranges = [KeyRange.collection("app.bsky.feed.like"), KeyRange.collection("com.example.thing")]
    records = REPO.walk_in_batches(MstWalk(REPO.root, ranges))
    assert [record.key for record in records] == REPO.in_range(ranges[0]) + REPO.in_range(ranges[1])


def test_whole_repo_in_any_order() -> None:
    blocks = list(REPO.blocks.items())
    random.Random(7).shuffle(blocks)
    walk = MstWalk(REPO.root, [KeyRange.collection("app.bsky.feed.post")])
    for cid, data in blocks:
        walk.feed(cid, data, keep=True)
    walk.finish()
    assert walk.done
    assert [record.key for record in walk.take_records()] == REPO.in_range(
        KeyRange.collection("app.bsky.feed.post")
    )
    assert walk._spare == {}  # nothing is held once the walk is done


def test_needed_lists_nodes_first_and_respects_the_limit() -> None:
    walk = MstWalk(REPO.root, [KeyRange(b"", b"\xff")])
    assert walk.needed() == [REPO.root]
    walk.feed(REPO.root, REPO.blocks[REPO.root])
    wanted = walk.needed()
    kinds = [cid in REPO.nodes for cid in wanted]
    assert kinds == sorted(kinds, reverse=True) and True in kinds and False in kinds
    assert walk.needed(3) == wanted[:3]
    assert all(is_dag_cbor_cid(cid) for cid in wanted)


def test_records_are_released_once_everything_left_of_them_is_resolved() -> None:
    keys = ["com.example.thing/a", "com.example.thing/b", "com.example.thing/c"]
    repo = Repo(keys)
    walk = MstWalk(repo.root, [KeyRange.collection("com.example.thing")])
    while any(cid in repo.nodes for cid in walk.needed()):
        for cid in [cid for cid in walk.needed() if cid in repo.nodes]:
            walk.feed(cid, repo.blocks[cid])
    cid_of = {key: repo.records[key][0] for key in keys}
    walk.feed(cid_of[keys[2]], repo.records[keys[2]][1])
    walk.feed(cid_of[keys[1]], repo.records[keys[1]][1])
    assert walk.take_records() == []
    walk.feed(cid_of[keys[0]], repo.records[keys[0]][1])
    assert [record.key for record in walk.take_records()] == keys
    assert walk.done


def test_a_block_never_delivered_is_an_error() -> None:
    walk = MstWalk(REPO.root, [KeyRange.collection("app.bsky.feed.post")])
    walk.feed(REPO.root, REPO.blocks[REPO.root])
    wanted = walk.needed(10)
    for cid in wanted[1:]:
        walk.feed(cid, REPO.blocks[cid])
    with pytest.raises(ProtocolViolation) as excinfo:
        walk.check_delivered(wanted)
    assert excinfo.value.code == "block_missing"
    with pytest.raises(ProtocolViolation) as excinfo:
        walk.finish()
    assert excinfo.value.code == "block_missing"


def test_a_block_that_does_not_hash_to_its_cid() -> None:
    walk = MstWalk(REPO.root, [KeyRange.collection("app.bsky.feed.post")])
    with pytest.raises(ProtocolViolation) as excinfo:
        walk.feed(REPO.root, REPO.blocks[REPO.root] + b"\x00")
    assert excinfo.value.code == "cid_mismatch"


def test_unneeded_blocks_are_dropped_unless_kept() -> None:
    walk = MstWalk(REPO.root, [KeyRange.collection("app.bsky.feed.post")])
    stray = next(iter(REPO.records.values()))
    walk.feed(*stray)
    assert walk._spare == {}
    walk.feed(*stray, keep=True)
    assert walk._spare == {stray[0]: stray[1]}


def test_empty_tree() -> None:
    repo = Repo([])
    walk = MstWalk(repo.root, [KeyRange.collection("app.bsky.feed.post")])
    assert repo.walk_in_batches(walk) == []
    assert walk.done


def test_range_with_no_keys_finishes() -> None:
    records = REPO.walk_in_batches(MstWalk(REPO.root, [KeyRange.collection("org.nothing.here")]))
    assert records == []


def test_the_same_record_under_several_keys() -> None:
    keys = [f"com.example.thing/{index:04d}" for index in range(50)]
    repo = Repo(keys, shared_record=True)
    assert len({cid for cid, _ in repo.records.values()}) == 1
    records = repo.walk_in_batches(MstWalk(repo.root, [KeyRange.collection("com.example.thing")]))
    assert [record.key for record in records] == keys
    blocks = list(repo.blocks.items())
    random.Random(3).shuffle(blocks)
    walk = MstWalk(repo.root, [KeyRange.collection("com.example.thing")])
    for cid, data in blocks:
        walk.feed(cid, data, keep=True)
    walk.finish()
    assert [record.key for record in walk.take_records()] == keys


_key_sets = st.lists(
    st.tuples(st.sampled_from(COLLECTIONS), st.text("abcdefghij234567", min_size=1, max_size=6)).map(
        "/".join
    ),
    max_size=120,
)


@settings(deadline=None, max_examples=60)
@given(
    _key_sets,
    st.sampled_from(COLLECTIONS),
    st.text("abcdefghij234567", max_size=3) | st.none(),
    st.integers(1, 30),
)
def test_range_walk_returns_exactly_the_keys_in_range(
    keys: list[str], collection: str, after: str | None, batch: int
) -> None:
    repo = Repo(keys)
    key_range = KeyRange.collection(collection, after=after)
    records = repo.walk_in_batches(MstWalk(repo.root, [key_range]), batch)
    assert [record.key for record in records] == repo.in_range(key_range)
    full = repo.walk_in_batches(MstWalk(repo.root, [KeyRange(b"", b"\xff")]), batch)
    assert [record.key for record in full] == repo.keys


@settings(deadline=None, max_examples=40)
@given(_key_sets, st.randoms(use_true_random=False))
def test_whole_repo_feeding_in_any_order(keys: list[str], rng: random.Random) -> None:
    repo = Repo(keys)
    blocks = list(repo.blocks.items())
    rng.shuffle(blocks)
    walk = MstWalk(repo.root, [KeyRange(b"", b"\xff")])
    for cid, data in blocks:
        walk.feed(cid, data, keep=True)
    walk.finish()
    assert [record.key for record in walk.take_records()] == repo.keys
