"""The one frame-reading loop (floatd.client.frames) over a trio stream and a socket."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from floatd.client.frames import receive_frame, receive_frame_blocking
from floatd.core.codec import FrameDecoder, encode_frame
from floatd.errors import BadFrame


async def test_whole_frames_from_any_split_and_none_at_the_end() -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    one, two = encode_frame({"n": 1}), encode_frame({"n": 2, "pad": "x" * 35_000})
    decoder = FrameDecoder()
    await send.send_all(one + two[:3])  # a frame and the start of the next in one read
    assert await receive_frame(receive, decoder) == {"n": 1}
    await send.send_all(two[3:])
    assert (await receive_frame(receive, decoder) or {}).get("n") == 2
    await send.send_all(one[:5])
    await send.aclose()  # the end of the stream in the middle of a frame
    assert await receive_frame(receive, decoder) is None


async def test_a_bad_frame_raises() -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    await send.send_all(b"\x00\x00\x00\x00")  # length 0
    with pytest.raises(BadFrame):
        await receive_frame(receive, FrameDecoder())


def test_the_blocking_reader_over_a_socket() -> None:
    a, b = socket.socketpair()
    with a, b:
        frame = encode_frame({"op": "ping", "id": 1})
        for byte in frame:  # byte by byte, as a slow network would
            a.send(bytes([byte]))
        a.send(frame)
        a.shutdown(socket.SHUT_WR)
        decoder = FrameDecoder()
        assert receive_frame_blocking(b.recv, decoder) == {"op": "ping", "id": 1}
        assert receive_frame_blocking(b.recv, decoder) == {"op": "ping", "id": 1}
        assert receive_frame_blocking(b.recv, decoder) is None
