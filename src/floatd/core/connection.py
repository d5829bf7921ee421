"""Per-connection protocol state, without I/O.

Like h11's state machine, this object only turns bytes into events and knows
the rules that depend on what came before on *this* connection: hello must come
first, framing errors poison the stream, and some errors close it.  The trio
server feeds it bytes and acts on its events.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, final

from floatd.core.codec import FrameDecoder
from floatd.core.messages import Hello, Request, failure, parse_request, request_id
from floatd.errors import (
    FloatdError,
    Forbidden,
    HelloRequired,
    UnsupportedVersion,
)

PROTOCOL_VERSION = 1


@final  # the shell tells it apart by type() alone
@dataclass(frozen=True, slots=True)
class Refusal:
    """A request answered with an error by the protocol layer itself."""

    response: dict[str, Any]
    close: bool
    code: str


Event = Request | Refusal


class ServerConnection:
    """Turns a byte stream into validated requests or protocol refusals."""

    __slots__ = ("_decoder", "_tokens", "closed", "greeted")

    def __init__(self, client_tokens: Sequence[str] = ()) -> None:
        self._decoder = FrameDecoder()
        self._tokens = tuple(t.encode() for t in client_tokens)
        self.greeted = False
        self.closed = False

    def receive_data(self, data: bytes) -> None:
        self._decoder.feed(data)

    def release(self) -> None:
        """Drop what is buffered (the connection is over).  The owner may be
        kept alive a while longer (by a timer's heap entry); its buffer not."""
        self._decoder = FrameDecoder()

    def partial(self) -> bool:
        """Whether part of a frame is buffered (the rest has not come yet)."""
        return self._decoder.buffered > 0

    def next_event(self) -> Event | None:
        """The next event, or None if more bytes are needed or the stream is closed."""
        if self.closed:
            return None
        try:
            obj = self._decoder.next_frame()
        except FloatdError as exc:
            return self._refuse(None, exc)
        if obj is None:
            return None
        try:
            req = parse_request(obj)
        except FloatdError as exc:
            refusal: FloatdError = exc
            if not self.greeted and obj.get("op") != "hello":
                # Whatever else is wrong, a request before hello is refused as such.
                refusal = HelloRequired("hello must be the first request")
            return self._refuse(request_id(obj), refusal)
        if isinstance(req, Hello):
            return self._hello(req)
        if not self.greeted:
            return self._refuse(req.id, HelloRequired("hello must be the first request"))
        return req

    def _hello(self, req: Hello) -> Event:
        if PROTOCOL_VERSION not in req.versions:
            return self._refuse(
                req.id, UnsupportedVersion("no common protocol version", supported=[1])
            )
        if self._tokens and not self._token_ok(req.token):
            return self._refuse(req.id, Forbidden("missing or wrong client token"))
        self.greeted = True
        return req

    def _token_ok(self, token: str | None) -> bool:
        given = (token or "").encode()
        # Compare against every token so timing does not reveal which one matched.
        matched = False
        for expected in self._tokens:
            matched |= hmac.compare_digest(given, expected)
        return matched

    def _refuse(self, rid: int | None, exc: FloatdError) -> Refusal:
        if exc.closes:
            self.closed = True
        return Refusal(failure(rid, exc.to_wire()), exc.closes, exc.code)
