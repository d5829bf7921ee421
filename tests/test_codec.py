"""Frame codec: limits, strictness, and garbage handling (whole or byte by byte)."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from floatd.core.codec import MAX_FRAME, FrameDecoder, encode_frame, pack
from floatd.errors import BadFrame


def frame_of(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def test_round_trip() -> None:
    msg = {"op": "ping", "id": 7, "nested": {"a": [1, 2.5, None, True, "x"]}}
    dec = FrameDecoder()
    dec.feed(encode_frame(msg) * 3)
    assert [dec.next_frame() for _ in range(3)] == [msg, msg, msg]
    assert dec.next_frame() is None


def test_shared_packer_leaves_nothing_behind_after_a_failed_value() -> None:
    """``pack`` reuses one Packer per thread: a value that fails half-way must
    not leave its first half in front of the next one."""
    with pytest.raises(TypeError):
        pack({"ok": True, "bad": [1, object()]})
    with pytest.raises(OverflowError):
        pack({"ok": True, "big": 2**70})
    assert pack({"id": 3, "ok": True}) == msgpack.packb({"id": 3, "ok": True})
    assert pack([1, "x"]) == msgpack.packb([1, "x"])


def test_partial_frame_waits_for_more() -> None:
    data = encode_frame({"op": "ping", "id": 1})
    dec = FrameDecoder()
    for i, byte in enumerate(data):
        assert dec.next_frame() is None, f"frame complete early at byte {i}"
        dec.feed(bytes([byte]))
    assert dec.next_frame() == {"op": "ping", "id": 1}


@pytest.mark.parametrize("length", [0, MAX_FRAME + 1, 2**32 - 1])
def test_length_out_of_range_is_bad_frame(length: int) -> None:
    dec = FrameDecoder()
    dec.feed(struct.pack(">I", length))
    with pytest.raises(BadFrame):
        dec.next_frame()


def test_largest_frame_is_accepted() -> None:
    filler = "x" * (MAX_FRAME - 64)
    body = msgpack.packb({"op": "ping", "id": 1, "pad": filler})
    body = msgpack.packb({"op": "ping", "id": 1, "pad": filler + "y" * (MAX_FRAME - len(body))})
    assert len(body) == MAX_FRAME
    dec = FrameDecoder()
    dec.feed(frame_of(body))
    frame = dec.next_frame()
    assert frame is not None and frame["id"] == 1


@pytest.mark.parametrize(
    "body",
    [
        msgpack.packb([1, 2, 3]),  # not a map
        msgpack.packb("hello"),
        msgpack.packb({1: "int key"}),
        msgpack.packb({b"bytes": 1}, use_bin_type=True),  # bin keys are not strings
        msgpack.packb({"a": 1}) + msgpack.packb({"b": 2}),  # two values in one frame
        b"\xc1",  # never-used msgpack byte
        b"\x81\xa1",  # truncated map
        b"\x81\xa2\xff\xfe\x01",  # invalid UTF-8 in a str
    ],
)
def test_malformed_bodies_are_bad_frame(body: bytes) -> None:
    dec = FrameDecoder()
    dec.feed(frame_of(body))
    with pytest.raises(BadFrame):
        dec.next_frame()


def test_decoder_stays_broken_after_bad_frame() -> None:
    dec = FrameDecoder()
    dec.feed(frame_of(b"\xc1") + encode_frame({"op": "ping", "id": 1}))
    with pytest.raises(BadFrame):
        dec.next_frame()
    with pytest.raises(BadFrame):
        dec.next_frame()


def test_encode_refuses_oversized() -> None:
    with pytest.raises(ValueError):
        encode_frame({"pad": "x" * MAX_FRAME})


def test_buffer_is_compacted() -> None:
    dec = FrameDecoder()
    one = encode_frame({"op": "ping", "id": 1})
    for _ in range(10_000):
        dec.feed(one)
        assert dec.next_frame() is not None
    assert dec.buffered == 0
    assert len(dec._buf) <= len(one)


def drain(dec: FrameDecoder) -> list[dict[str, Any]]:
    out = []
    while (frame := dec.next_frame()) is not None:
        out.append(frame)
    return out


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_whole_gives_only_bad_frame(data: bytes) -> None:
    dec = FrameDecoder()
    dec.feed(data)
    try:
        frames = drain(dec)
    except BadFrame:
        return
    for frame in frames:
        assert isinstance(frame, dict) and all(isinstance(k, str) for k in frame)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_byte_by_byte_matches_whole(data: bytes) -> None:
    """Feeding byte by byte yields the same frames, and fails where whole feeding fails."""
    whole = FrameDecoder()
    whole.feed(data)
    try:
        expected: list[dict[str, Any]] | None = drain(whole)
    except BadFrame:
        expected = None
    piecewise = FrameDecoder()
    got: list[dict[str, Any]] = []
    failed = False
    for byte in data:
        piecewise.feed(bytes([byte]))
        try:
            got.extend(drain(piecewise))
        except BadFrame:
            failed = True
            break
    if expected is None:
        assert failed
    else:
        assert not failed and got == expected


json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=10), json_like, max_size=6))
def test_any_string_keyed_map_round_trips(msg: dict[str, Any]) -> None:
    dec = FrameDecoder()
    dec.feed(encode_frame(msg))
    assert dec.next_frame() == msg


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=100))
def test_valid_length_prefix_with_garbage_body(body: bytes) -> None:
    dec = FrameDecoder()
    dec.feed(frame_of(body))
    try:
        frame = dec.next_frame()
    except BadFrame:
        return
    assert isinstance(frame, dict)
