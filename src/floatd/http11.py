"""A small HTTP/1.1 server on h11 and trio, for the status endpoint and the
reference authority's API.

h11 keeps HTTP parsing sans-IO; this is the trio loop around it.  Anything on
the network can reach these ports, so every resource is bounded: a request's
head (8 KiB), its body (``max_body``), the time to send it (5 s), requests per
connection, and connections served at once (beyond that a connection is closed
on accept).  Subclasses only say how to answer one request.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import ssl
from http import HTTPStatus
from typing import Any

import h11
import trio

from floatd.logs import get_logger

MAX_HEAD = 8 * 1024
REQUEST_TIMEOUT = 5.0
KEEPALIVE_TIMEOUT = 15.0
MAX_REQUESTS_PER_CONNECTION = 100

log = get_logger()

JSON = "application/json"


class Reply:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: bytes, content_type: str = JSON, **headers: str) -> None:
        self.status = status
        self.body = body
        self.headers = [("content-type", content_type), *headers.items()]


def json_reply(status: int, doc: Any, **headers: str) -> Reply:
    return Reply(status, json.dumps(doc, separators=(",", ":")).encode() + b"\n", **headers)


REASONS = {
    400: "bad request",
    404: "not found",
    405: "method not allowed",
    408: "request timeout",
    413: "request too large",
    431: "request header fields too large",
}


#: The address of the client whose request is being answered (each connection
#: is served in a task of its own, so each sees its own).
peer: contextvars.ContextVar[str | None] = contextvars.ContextVar("peer", default=None)
#: The headers of the request being answered (lower-case names; a repeated
#: header keeps its last value).
headers: contextvars.ContextVar[dict[str, bytes]] = contextvars.ContextVar("headers")


class HttpServer:
    max_body = 8 * 1024
    max_connections = 32
    name = "http"

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.connections = 0
        self.tls = tls
        # Connections waiting for a request that has not begun (kept alive, or
        # just opened), oldest first: at the cap they make room for a new one,
        # so a pile of idle keep-alives cannot lock monitoring out.
        self._waiting: dict[trio.CancelScope, None] = {}

    async def respond(self, method: bytes, target: bytes, body: bytes) -> Reply:
        raise NotImplementedError

    def error_reply(self, status: int, **headers: str) -> Reply:
        """The answer to a request that could not be read (400, 408, 413, 431)."""
        return json_reply(status, {"error": REASONS.get(status, "error")}, **headers)

    async def serve(self, listener: trio.SocketListener) -> None:
        await trio.serve_listeners(self._admit, [listener])

    async def _admit(self, stream: trio.SocketStream) -> None:
        """Serve a new connection, unless all places are taken by connections
        in the middle of a request; an idle one makes room for it."""
        try:
            peer.set(str(stream.socket.getpeername()[0]))
        except OSError:
            peer.set(None)
        if self.connections >= self.max_connections:
            if not self._waiting:
                await trio.aclose_forcefully(stream)
                return
            oldest = next(iter(self._waiting))
            del self._waiting[oldest]
            oldest.cancel()  # it closes at once; this one takes its place
        await self._handle(stream)

    async def _handle(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        try:
            if self.tls is not None:
                # The handshake runs on first read, inside the request timeout.
                stream = trio.SSLStream(stream, self.tls, server_side=True, https_compatible=True)
            await self.handle_stream(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.connections -= 1
            await trio.aclose_forcefully(stream)

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        for number in range(MAX_REQUESTS_PER_CONNECTION):
            # A follow-up request may be a while coming (keep-alive), but once it
            # starts it must arrive within REQUEST_TIMEOUT, like the first.
            timeout = REQUEST_TIMEOUT if number == 0 else KEEPALIVE_TIMEOUT
            got = await self._read_request(stream, conn, timeout)
            if got is None:
                return
            request, body = got
            headers.set({name.decode("latin-1"): value for name, value in request.headers})
            reply = await self.respond(request.method, request.target, body)
            await self._send(stream, conn, request.method, reply)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _read_request(
        self, stream: trio.abc.Stream, conn: h11.Connection, timeout: float
    ) -> tuple[h11.Request, bytes] | None:
        """The next request and its body, or None to close."""
        deadline = trio.current_time() + timeout
        scope = trio.CancelScope(deadline=deadline)
        self._waiting[scope] = None
        try:
            return await self._read_in(stream, conn, scope, deadline)
        finally:
            self._waiting.pop(scope, None)

    async def _read_in(
        self,
        stream: trio.abc.Stream,
        conn: h11.Connection,
        scope: trio.CancelScope,
        deadline: float,
    ) -> tuple[h11.Request, bytes] | None:
        request: h11.Request | None = None
        started = False  # any byte of this request seen yet
        body = bytearray()
        with scope:
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    await self._refuse(stream, conn, exc.error_status_hint)
                    return None
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(4096)
                    if data and not started:
                        started = True
                        self._waiting.pop(scope, None)  # a request: no longer idle
                    conn.receive_data(bytes(data))  # b"" is EOF
                    continue
                if isinstance(event, h11.Request):
                    request = event
                    # From here the rest of the request gets the request timeout.
                    scope.deadline = min(deadline, trio.current_time() + REQUEST_TIMEOUT)
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > self.max_body:
                        await self._refuse(stream, conn, 413)
                        return None
                elif isinstance(event, h11.EndOfMessage):
                    assert request is not None
                    return request, bytes(body)
                else:  # ConnectionClosed, or PAUSED mid-cycle
                    return None
        # Too slow: a request that started gets 408, an idle connection just closes.
        if started:
            await self._refuse(stream, conn, 408)
        return None

    async def _refuse(self, stream: trio.abc.Stream, conn: h11.Connection, status: int) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        reply = self.error_reply(status, connection="close")
        with trio.move_on_after(REQUEST_TIMEOUT), contextlib.suppress(h11.LocalProtocolError):
            await self._send(stream, conn, b"GET", reply)

    async def _send(
        self, stream: trio.abc.Stream, conn: h11.Connection, method: bytes, reply: Reply
    ) -> None:
        headers = list(reply.headers)
        if reply.status != 204:  # a 204 has no body, and says nothing of its length
            headers.append(("content-length", str(len(reply.body))))
        try:
            reason = HTTPStatus(reply.status).phrase.encode()
        except ValueError:
            reason = b""
        response = h11.Response(status_code=reply.status, headers=headers, reason=reason)
        out = conn.send(response) or b""
        if method != b"HEAD" and reply.body:
            out += conn.send(h11.Data(data=reply.body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        with trio.move_on_after(REQUEST_TIMEOUT):  # a client that will not read
            await stream.send_all(out)
