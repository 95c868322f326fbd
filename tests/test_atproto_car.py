"""daemon.atproto.car: the incremental CAR v1 reader, every refusal, and fuzzing of its input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.atproto.car import CarReader, encode_car, read_car
from daemon.atproto.cbor import Link, encode_dag_cbor
from daemon.atproto.cid import RAW, cid_for_block
from daemon.errors import ProtocolViolation

BLOCKS = [(cid_for_block(data), data) for data in (encode_dag_cbor({"a": 1}), encode_dag_cbor("b" * 300))]
BLOCKS.append((cid_for_block(b"raw bytes", RAW), b"raw bytes"))
ROOT = BLOCKS[0][0]
CAR = encode_car([ROOT], BLOCKS)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    return bytes(out) + bytes([value])


def _header(value: object) -> bytes:
    header = encode_dag_cbor(value)
    return _varint(len(header)) + header


def _section(cid: bytes, data: bytes) -> bytes:
    return _varint(len(cid) + len(data)) + cid + data


def _refused(data: bytes, code: str = "invalid_car", **limits: int) -> None:
    reader = CarReader(**limits)
    with pytest.raises(ProtocolViolation) as excinfo:
        reader.feed(data)
        reader.finish()
    assert excinfo.value.code == code


def test_reads_roots_and_blocks() -> None:
    roots, blocks = read_car(CAR)
    assert roots == (ROOT,)
    assert blocks == BLOCKS


def test_zero_and_several_roots() -> None:
    assert read_car(encode_car([], BLOCKS))[0] == ()
    roots = [BLOCKS[0][0], BLOCKS[2][0]]
    assert read_car(encode_car(roots, []))[0] == tuple(roots)


def test_byte_by_byte_releases_each_block_with_its_last_byte() -> None:
    ends, position = [], len(encode_car([ROOT], []))
    for cid, data in BLOCKS:
        position += len(_section(cid, data))
        ends.append(position)
    reader = CarReader()
    seen, released_at = [], []
    for index in range(len(CAR)):
        new = reader.feed(CAR[index : index + 1])
        seen += new
        released_at += [index + 1] * len(new)
    reader.finish()
    assert reader.roots == (ROOT,)
    assert seen == BLOCKS
    assert released_at == ends


def test_roots_before_the_header_is_an_error() -> None:
    reader = CarReader()
    reader.feed(CAR[:1])
    with pytest.raises(ProtocolViolation):
        _ = reader.roots


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("non-minimal varint", b"\x80\x00" + CAR[1:]),
        ("non-minimal varint, more bytes", b"\xa3\x80\x00" + CAR[1:]),
        ("over-long varint", b"\xff" * 9 + b"\x01"),
        ("truncated varint", CAR + b"\x80"),
        ("truncated header", CAR[:5]),
        ("truncated final section", CAR[:-1]),
        ("trailing garbage", CAR + b"\x01"),
        ("empty body", b""),
        ("zero-length section", CAR + b"\x00"),
        ("section shorter than a CID", CAR + _varint(10) + bytes(10)),
        ("CIDv0 section", CAR + _varint(40) + b"\x12\x20" + bytes(38)),
        ("dag-pb CID", CAR + _varint(40) + b"\x01\x70\x12\x20" + bytes(36)),
        ("identity hash CID", CAR + _varint(40) + b"\x01\x71\x00\x20" + bytes(36)),
        ("header not a map", _header([1])),
        ("header version 2", _header({"version": 2, "roots": []})),
        ("header version missing", _header({"roots": []})),
        ("header version true", _header({"version": True, "roots": []})),
        ("header roots missing", _header({"version": 1})),
        ("header roots not links", _header({"version": 1, "roots": [ROOT]})),
        ("header roots not an array", _header({"version": 1, "roots": Link(ROOT)})),
        (
            "header root not blessed",
            _header({"version": 1, "roots": [Link(b"\x01\x70\x12\x20" + bytes(32))]}),
        ),
        ("header not canonical", _varint(5) + b"\xa1\x61a\x18\x01"),
        ("header with trailing bytes", _varint(2) + b"\xa0\x00"),
    ],
)
def test_malformed_cars_are_invalid_car(name: str, data: bytes) -> None:
    _refused(data)


def test_block_not_matching_its_cid() -> None:
    cid, data = BLOCKS[1]
    bad = encode_car([ROOT], []) + _section(cid, data[:-1] + b"!")
    _refused(bad, "cid_mismatch")


def test_oversize_section_is_refused_before_it_arrives() -> None:
    cid, data = BLOCKS[1]
    reader = CarReader(max_block_size=len(data) - 1)
    reader.feed(encode_car([ROOT], []))
    with pytest.raises(ProtocolViolation) as excinfo:
        reader.feed(_varint(len(cid) + len(data)))  # the length alone is enough to refuse it
    assert excinfo.value.code == "invalid_car"
    assert read_car(encode_car([], [(cid, data)]), max_block_size=len(data))[1] == [(cid, data)]


def test_oversize_header() -> None:
    _refused(_varint(10_000_000) + b"\xa0")


def test_byte_cap() -> None:
    assert read_car(CAR, max_bytes=len(CAR))[1] == BLOCKS
    reader = CarReader(max_bytes=len(CAR) - 1)
    reader.feed(CAR[:10])
    with pytest.raises(ProtocolViolation) as excinfo:
        reader.feed(CAR[10:])
    assert excinfo.value.code == "car_too_large"


def test_feed_after_finish_is_a_bug() -> None:
    reader = CarReader()
    reader.feed(CAR)
    reader.finish()
    with pytest.raises(RuntimeError):
        reader.feed(b"")


@settings(deadline=None, max_examples=200)
@given(st.lists(st.integers(1, 64), max_size=40))
def test_any_chunking_gives_the_same_blocks(sizes: list[int]) -> None:
    reader = CarReader()
    blocks, position = [], 0
    for size in sizes:
        blocks += reader.feed(CAR[position : position + size])
        position += size
    blocks += reader.feed(CAR[position:])
    reader.finish()
    assert blocks == BLOCKS


@settings(deadline=None, max_examples=300)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_protocol_violations(data: bytes) -> None:
    reader = CarReader(max_block_size=1000, max_bytes=250)
    try:
        reader.feed(data)
        reader.finish()
    except ProtocolViolation as exc:
        assert exc.code in ("invalid_car", "cid_mismatch", "car_too_large")


@settings(deadline=None, max_examples=300)
@given(st.data())
def test_mutated_cars_raise_only_protocol_violations(data: st.DataObject) -> None:
    car = bytearray(CAR)
    for _ in range(data.draw(st.integers(1, 3))):
        car[data.draw(st.integers(0, len(car) - 1))] = data.draw(st.integers(0, 255))
    try:
        read_car(bytes(car))
    except ProtocolViolation as exc:
        assert exc.code in ("invalid_car", "cid_mismatch")
