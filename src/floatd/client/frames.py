"""Reading whole frames from a trio stream or a blocking socket.

The one loop around the sans-IO :class:`~floatd.core.codec.FrameDecoder`
that every reader of the protocol's framing uses (the client library, the
simple client, the admin socket on both sides, the server's busy refusal): the
decoder holds what arrived, and a frame is taken out once it is whole.  The
server's connections read through their own state machine instead
(:class:`~floatd.core.connection.ServerConnection`), since they pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from floatd.core.codec import MAX_FRAME, FrameDecoder

if TYPE_CHECKING:  # the blocking clients run without importing trio
    import trio

READ_SIZE = MAX_FRAME + 4


async def receive_frame(
    stream: trio.abc.ReceiveStream, decoder: FrameDecoder
) -> dict[str, Any] | None:
    """The next whole frame, or None if the stream ends first.  The decoder's
    BadFrame propagates; what comes after a frame stays in the decoder."""
    while (frame := decoder.next_frame()) is None:
        data = await stream.receive_some(READ_SIZE)
        if not data:
            return None
        decoder.feed(bytes(data))
    return frame


def receive_frame_blocking(
    recv: Callable[[int], bytes], decoder: FrameDecoder
) -> dict[str, Any] | None:
    """:func:`receive_frame` over a blocking socket's ``recv``."""
    while (frame := decoder.next_frame()) is None:
        data = recv(READ_SIZE)
        if not data:
            return None
        decoder.feed(data)
    return frame
