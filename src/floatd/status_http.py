"""The HTTP status endpoint: ``/healthz``, ``/status`` and ``/metrics``, on h11.

h11 keeps HTTP parsing sans-IO; this module is the small trio loop around it.
The port faces monitoring, but anything on the network can reach it, so every
resource is bounded: a request's head (8 KiB), the time to send it (5 s), the
requests per connection, and the connections served at once (beyond that a
connection is closed on accept).  The handlers only read in-memory state, and
the metrics text is cached for a moment, so a flood costs little more than the
accepts; the lease port never waits on this one.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import h11
import trio

from floatd.logs import get_logger
from floatd.metrics import exposition, registry_for

if TYPE_CHECKING:
    from floatd.server import Server

MAX_HEAD = 8 * 1024
MAX_BODY = 8 * 1024  # GET and HEAD carry none; a little is read and dropped
REQUEST_TIMEOUT = 5.0
KEEPALIVE_TIMEOUT = 15.0
MAX_REQUESTS_PER_CONNECTION = 100
MAX_CONNECTIONS = 32
METRICS_CACHE = 0.5  # seconds a rendered /metrics is reused

log = get_logger()

JSON = "application/json"
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Reply:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: bytes, content_type: str = JSON, **headers: str) -> None:
        self.status = status
        self.body = body
        self.headers = [("content-type", content_type), *headers.items()]


def _json(status: int, doc: Any, **headers: str) -> _Reply:
    return _Reply(status, json.dumps(doc, separators=(",", ":")).encode() + b"\n", **headers)


class StatusServer:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.connections = 0
        self._registry = registry_for(server)
        self._metrics: tuple[float, bytes] = (-1.0, b"")
        self._routes: dict[bytes, Callable[[], _Reply]] = {
            b"/healthz": self._healthz,
            b"/status": self._status,
            b"/metrics": self._metrics_reply,
        }

    # --- handlers -------------------------------------------------------------

    def _healthz(self) -> _Reply:
        state = self.server.service.activation_state(self.server.clock())
        if state == "active":
            return _json(200, {"status": "ok"})
        return _json(503, {"status": state})

    def _status(self) -> _Reply:
        return _json(200, self.server.status_document())

    def _metrics_reply(self) -> _Reply:
        now = trio.current_time()
        at, text = self._metrics
        if now - at > METRICS_CACHE or at < 0:
            text = exposition(self._registry)
            self._metrics = (now, text)
        return _Reply(200, text, METRICS_TYPE)

    def route(self, method: bytes, target: bytes) -> _Reply:
        path = target.split(b"?", 1)[0]
        handler = self._routes.get(path)
        if handler is None:
            return _json(404, {"error": "not found"})
        if method not in (b"GET", b"HEAD"):
            return _json(405, {"error": "method not allowed"}, allow="GET, HEAD")
        return handler()

    # --- the loop ---------------------------------------------------------------

    async def serve(self, listener: trio.SocketListener) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    log.error("status_accept_failed", reason=exc.strerror)
                    await trio.sleep(0.1)
                    continue
                if self.connections >= MAX_CONNECTIONS:
                    await trio.aclose_forcefully(stream)
                    continue
                nursery.start_soon(self._handle, stream)

    async def _handle(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        try:
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
            request = await self._read_request(stream, conn, timeout)
            if request is None:
                return
            reply = self.route(request.method, request.target)
            await self._send(stream, conn, request.method, reply)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _read_request(
        self, stream: trio.abc.Stream, conn: h11.Connection, timeout: float
    ) -> h11.Request | None:
        """The next request with its (dropped) body, or None to close."""
        request: h11.Request | None = None
        started = False  # any byte of this request seen yet
        body = 0
        deadline = trio.current_time() + timeout
        scope = trio.CancelScope(deadline=deadline)
        with scope:
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    await self._refuse(stream, conn, exc.error_status_hint)
                    return None
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(4096)
                    started = started or bool(data)
                    conn.receive_data(bytes(data))  # b"" is EOF
                    continue
                if isinstance(event, h11.Request):
                    request = event
                    # From here the rest of the request gets the request timeout.
                    scope.deadline = min(deadline, trio.current_time() + REQUEST_TIMEOUT)
                elif isinstance(event, h11.Data):
                    body += len(event.data)
                    if body > MAX_BODY:
                        await self._refuse(stream, conn, 413)
                        return None
                elif isinstance(event, h11.EndOfMessage):
                    return request
                else:  # ConnectionClosed, or PAUSED mid-cycle
                    return None
        # Too slow: a request that started gets 408, an idle connection just closes.
        if started:
            await self._refuse(stream, conn, 408)
        return None

    async def _refuse(self, stream: trio.abc.Stream, conn: h11.Connection, status: int) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        reply = _json(status, {"error": h11_reason(status)}, connection="close")
        with trio.move_on_after(REQUEST_TIMEOUT), contextlib.suppress(h11.LocalProtocolError):
            await self._send(stream, conn, b"GET", reply)

    async def _send(
        self, stream: trio.abc.Stream, conn: h11.Connection, method: bytes, reply: _Reply
    ) -> None:
        headers = [*reply.headers, ("content-length", str(len(reply.body)))]
        out = conn.send(h11.Response(status_code=reply.status, headers=headers)) or b""
        if method != b"HEAD":
            out += conn.send(h11.Data(data=reply.body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        with trio.move_on_after(REQUEST_TIMEOUT):  # a client that will not read
            await stream.send_all(out)


def h11_reason(status: int) -> str:
    return {
        400: "bad request",
        408: "request timeout",
        413: "request too large",
        431: "request header fields too large",
    }.get(status, "error")
