"""Frame codec: 4-byte big-endian length, then one msgpack map with string keys.

The decoder is a plain buffer in the style of h2's frame buffer: bytes go in,
whole decoded frames come out, and nothing here reads a socket.  It never holds
more than one partial frame plus the chunk last fed, because the caller drains it
after every ``feed``; that is what bounds a connection's memory.
"""

from __future__ import annotations

import struct
import threading
from typing import Any

import msgpack

from floatd.errors import BadFrame

MAX_FRAME = 65536
_HEADER = struct.Struct(">I")


_local = threading.local()


def pack(value: Any) -> bytes:
    """``msgpack.packb(value)``, without building a Packer on each call: that
    was half the cost of packing an answer.  A Packer is not thread-safe, so
    each thread keeps its own (it resets itself after each value, and after an
    error)."""
    try:
        packer = _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    body: bytes = packer.pack(value)
    return body


def encode_frame(message: dict[str, Any]) -> bytes:
    """One frame for ``message``; raises ValueError if it would break the size limit."""
    body = pack(message)
    if len(body) > MAX_FRAME:
        raise ValueError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    """Decode one frame body, enforcing "exactly one map with string keys"."""
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise BadFrame(f"body is not one msgpack value: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise BadFrame("body is not a msgpack map")
    for key in obj:
        if not isinstance(key, str):
            raise BadFrame("map has a non-string key")
    return obj


class FrameDecoder:
    """Accumulates bytes and yields decoded frames one at a time.

    After a :class:`BadFrame` the decoder is poisoned: the protocol closes the
    connection, so there is no resynchronisation to attempt.
    """

    __slots__ = ("_broken", "_buf", "_pos")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._broken = False

    def feed(self, data: bytes) -> None:
        if self._pos:
            # Compact before growing, so a long pipelined stream never makes the
            # buffer grow without bound.
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def next_frame(self) -> dict[str, Any] | None:
        """The next whole frame, or None when more bytes are needed."""
        if self._broken:
            raise BadFrame("connection already failed framing")
        avail = len(self._buf) - self._pos
        if avail < 4:
            return None
        (length,) = _HEADER.unpack_from(self._buf, self._pos)
        if length < 1 or length > MAX_FRAME:
            self._broken = True
            raise BadFrame(f"frame length {length} outside 1..{MAX_FRAME}")
        if avail < 4 + length:
            return None
        start = self._pos + 4
        body = bytes(self._buf[start : start + length])
        self._pos = start + length
        try:
            return decode_body(body)
        except BadFrame:
            self._broken = True
            raise
