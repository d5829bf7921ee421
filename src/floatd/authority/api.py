"""The authority's HTTP API (JSON over HTTP/1.1, served by h11 on trio).

h11 rather than hypercorn: the API is four small routes, floatd already serves
HTTP with h11 (:mod:`floatd.http11`, with its size and time bounds), and one
code path for both keeps the dependency list short.  Database work runs in one
worker thread at a time (``CapacityLimiter(1)``), so SQLite sees one writer.

Every error body is ``{"error": {"code", "message"}}``.  Unknown fields in a
request body are ignored, for forward compatibility; missing or mistyped ones
are ``400 BAD_REQUEST``.
"""

from __future__ import annotations

import json
import re
import ssl
import time
from collections.abc import Callable
from typing import Any

import trio

from floatd.authority.admin_api import admin_reply, openapi
from floatd.authority.logic import Authority
from floatd.authority.manager_api import manager_reply
from floatd.authority.managers import Managers
from floatd.authority.portal import Portal
from floatd.core.entitlement import check_email, parse_public_key
from floatd.errors import AuthorityError
from floatd.http11 import HttpServer, Reply, json_reply, peer
from floatd.logs import get_logger

log = get_logger()

_ACTIVATION = re.compile(r"^/v1/activations/([A-Za-z0-9_-]{1,64})(/refresh)?$")
_CODES = {
    400: "BAD_REQUEST",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    408: "REQUEST_TIMEOUT",
    413: "BODY_TOO_LARGE",
    431: "HEADERS_TOO_LARGE",
}


def _error(status: int, code: str, message: str, **headers: str) -> Reply:
    return json_reply(status, {"error": {"code": code, "message": message}}, **headers)


def _field(body: dict[str, Any], name: str, required: bool = True) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= 512:
        raise AuthorityError(400, "BAD_REQUEST", f"field {name!r} must be a non-empty string")
    return value


#: Bounds of a refresh's local_users (the body is 64 KiB at most anyway).
MAX_LOCAL_PRODUCTS = 256
MAX_LOCAL_USERS = 10_000


def _local_users(value: Any) -> dict[str, list[str]] | None:
    """The refresh body's ``local_users``: {product: [e-mail, ...]}, or None
    when a (older) server sends none; BAD_REQUEST when it is malformed."""
    if value is None:
        return None
    bad = AuthorityError(400, "BAD_REQUEST", "local_users must map product codes to e-mails")
    if not isinstance(value, dict) or len(value) > MAX_LOCAL_PRODUCTS:
        raise bad
    out: dict[str, list[str]] = {}
    total = 0
    for product, emails in value.items():
        if not isinstance(product, str) or not 1 <= len(product) <= 128:
            raise bad
        if not isinstance(emails, list):
            raise bad
        total += len(emails)
        if total > MAX_LOCAL_USERS:
            raise bad
        try:
            out[product] = sorted({check_email(e) for e in emails if isinstance(e, str)})
        except ValueError:
            raise bad from None
        if len(out[product]) != len(set(emails)):
            raise bad  # a value that is not a string
    return out


class AuthorityApi(HttpServer):
    name = "authority"
    max_body = 64 * 1024
    max_connections = 256

    def __init__(
        self,
        authority: Authority,
        *,
        clock: Callable[[], float] = time.time,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(tls)
        self.authority = authority
        self.clock = clock
        self._limiter = trio.CapacityLimiter(1)
        self.managers = Managers(authority)
        self.portal = Portal(self.managers, self._run, secure=tls is not None)

    def error_reply(self, status: int, **headers: str) -> Reply:
        code = _CODES.get(status, "BAD_REQUEST")
        return _error(status, code, code.lower().replace("_", " "), **headers)

    async def respond(self, method: bytes, target: bytes, body: bytes) -> Reply:
        text = target.decode("ascii", "replace")
        path = text.split("?", 1)[0]
        try:
            if path.startswith("/v1/manager/"):
                doc = _json_body(body) if body else {}
                return await manager_reply(self.managers, self._run, method.decode(), path, doc)
            if path == "/portal" or path.startswith("/portal/"):
                return await self.portal.respond(method.decode(), text, body)
            if path.startswith("/v1/admin/"):
                doc = _json_body(body) if body else {}
                return await admin_reply(self.authority, self._run, method.decode(), text, doc)
            if path == "/v1/openapi.json":
                if method not in (b"GET", b"HEAD"):
                    return self._not_allowed("GET, HEAD")
                return json_reply(200, openapi())
            if path == "/v1/health":
                if method not in (b"GET", b"HEAD"):
                    return self._not_allowed("GET, HEAD")
                return json_reply(200, {"status": "ok"})
            if path == "/v1/activations":
                if method != b"POST":
                    return self._not_allowed("POST")
                return await self._activate(_json_body(body))
            match = _ACTIVATION.match(path)
            if match is None:
                return _error(404, "NOT_FOUND", f"no route {path[:100]!r}")
            activation_id, refresh = match.group(1), match.group(2)
            if refresh:
                if method != b"POST":
                    return self._not_allowed("POST")
                return await self._refresh(activation_id, _json_body(body))
            if method != b"DELETE":
                return self._not_allowed("DELETE")
            return await self._deactivate(activation_id, _json_body(body))
        except AuthorityError as exc:
            return json_reply(exc.status, exc.body())
        except Exception as exc:  # a bug must cost one request, never the server
            log.error("authority_request_failed", path=path[:100], error=repr(exc)[:500])
            return _error(500, "INTERNAL", "the authority failed to answer; see its log")

    def _not_allowed(self, allow: str) -> Reply:
        return _error(405, "METHOD_NOT_ALLOWED", f"use {allow}", allow=allow)

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def _activate(self, body: dict[str, Any]) -> Reply:
        key = _field(body, "license_key")
        server = _field(body, "server")
        hostname = _field(body, "hostname", required=False)
        floatd = _field(body, "floatd", required=False)
        server_key = _server_key(body)
        try:
            activation_id, entitlement = await self._run(
                self.authority.activate, key, server, hostname, floatd, self.clock(), server_key
            )
        except AuthorityError as exc:
            log.info("activation_refused", server=server, code=exc.error_code)
            raise
        log.info("activated", activation=activation_id, server=server, hostname=hostname)
        return json_reply(201, {"activation_id": activation_id, "entitlement": entitlement})

    async def _refresh(self, activation_id: str, body: dict[str, Any]) -> Reply:
        server = _field(body, "server")
        floatd = _field(body, "floatd", required=False)
        local = _local_users(body.get("local_users"))
        address = peer.get()
        entitlement = await self._run(
            self.authority.refresh,
            activation_id,
            server,
            self.clock(),
            address,
            floatd,
            local,
            _server_key(body),
        )
        return json_reply(200, {"entitlement": entitlement})

    async def _deactivate(self, activation_id: str, body: dict[str, Any]) -> Reply:
        server = _field(body, "server")
        await self._run(self.authority.deactivate, activation_id, server)
        log.info("deactivated", activation=activation_id, server=server)
        return Reply(204, b"")


def _server_key(body: dict[str, Any]) -> str | None:
    """The body's ``server_key`` (the floatd server's own public key), checked."""
    text = _field(body, "server_key", required=False)
    if text is not None:
        try:
            parse_public_key(text)
        except ValueError as exc:
            raise AuthorityError(400, "BAD_REQUEST", f"'server_key': {exc}") from None
    return text


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise AuthorityError(400, "BAD_REQUEST", "the body is not JSON") from None
    if not isinstance(doc, dict):
        raise AuthorityError(400, "BAD_REQUEST", "the body must be a JSON object")
    return doc
