"""The HTTP status endpoint: ``/healthz``, ``/status`` and ``/metrics``.

The bounded h11 loop is :mod:`floatd.http11`.  The handlers only read
in-memory state, and the metrics text is cached for a moment, so a flood costs
little more than the accepts; the lease port never waits on this one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from floatd.daemon.metrics import exposition, registry_for
from floatd.http11 import HttpServer, Reply, json_reply

if TYPE_CHECKING:
    from floatd.daemon.views import StatusView

METRICS_CACHE = 0.5  # seconds a rendered /metrics is reused
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class StatusServer(HttpServer):
    name = "status"

    def __init__(self, server: StatusView) -> None:
        super().__init__()
        self.server = server
        self._registry = registry_for(server)
        self._metrics: tuple[float, bytes] = (-1.0, b"")
        self._routes: dict[bytes, Callable[[], Reply]] = {
            b"/healthz": self._healthz,
            b"/status": self._status,
            b"/metrics": self._metrics_reply,
        }

    # --- handlers -------------------------------------------------------------

    def _healthz(self) -> Reply:
        node = self.server.node
        if node is not None and not node.serving.is_set():
            return json_reply(503, {"status": "node_limit"})
        if not self.server.service.writable:
            return json_reply(503, {"status": "state_unavailable"})
        state = self.server.service.activation_state(self.server.clock())
        if state == "active":
            return json_reply(200, {"status": "ok"})
        return json_reply(503, {"status": state})

    def _status(self) -> Reply:
        return json_reply(200, self.server.status_document())

    def _metrics_reply(self) -> Reply:
        now = trio.current_time()
        at, text = self._metrics
        if now - at > METRICS_CACHE or at < 0:
            text = exposition(self._registry)
            self._metrics = (now, text)
        return Reply(200, text, METRICS_TYPE)

    async def respond(self, method: bytes, target: bytes, body: bytes) -> Reply:
        return self.route(method, target)

    def route(self, method: bytes, target: bytes) -> Reply:
        path = target.split(b"?", 1)[0]
        handler = self._routes.get(path)
        if handler is None:
            return json_reply(404, {"error": "not found"})
        if method not in (b"GET", b"HEAD"):
            return json_reply(405, {"error": "method not allowed"}, allow="GET, HEAD")
        return handler()
