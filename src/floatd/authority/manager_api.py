"""The license managers' API, ``/v1/manager/...``: enrol, sign in, see the
licenses of their orders, assign and unassign their users.

A session token (``POST /v1/manager/session``) goes in ``Authorization: Bearer``.
Everything a manager may do is in :class:`floatd.authority.managers.Managers`;
this module maps HTTP onto it, and the portal (:mod:`floatd.authority.portal`)
does the same for a browser.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

from floatd.authority.documents import managed_license_doc
from floatd.authority.managers import Managers
from floatd.errors import AuthorityError
from floatd.http11 import Reply, headers, json_reply, peer
from floatd.store.audit import iso

Run = Callable[..., Awaitable[Any]]

_LICENSE_USER = re.compile(r"^/v1/manager/licenses/([^/]{1,254})/users/([^/]{1,254})$")

#: (method, path, summary, status, needs a session): for the OpenAPI document.
DOCUMENTED: tuple[tuple[str, str, str, int, bool], ...] = (
    ("POST", "/v1/manager/enrol", "Set a password with an enrolment token", 200, False),
    ("POST", "/v1/manager/session", "Sign in: a session token", 201, False),
    ("DELETE", "/v1/manager/session", "Sign out", 204, True),
    ("GET", "/v1/manager/licenses", "The licenses of the manager's orders", 200, True),
    (
        "POST",
        "/v1/manager/licenses/{license_id}/users/{email}",
        "Assign a license user",
        200,
        True,
    ),
    (
        "DELETE",
        "/v1/manager/licenses/{license_id}/users/{email}",
        "Unassign a license user",
        200,
        True,
    ),
)


def bearer() -> str:
    value = headers.get({}).get("authorization", b"").decode("latin-1")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _text(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not 1 <= len(value) <= 1024:
        raise AuthorityError(400, "BAD_REQUEST", f"{name!r} must be a non-empty string")
    return value


async def manager_reply(managers: Managers, run: Run, method: str, path: str, body: Any) -> Reply:
    """The answer to one ``/v1/manager/`` request (``body``: the parsed JSON)."""
    if path == "/v1/manager/enrol":
        if method != "POST":
            raise AuthorityError(405, "METHOD_NOT_ALLOWED", "use POST")
        email = await run(managers.enrol, _text(body, "token"), _text(body, "password"))
        return json_reply(200, {"email": email})
    if path == "/v1/manager/session":
        if method == "POST":
            token, session = await run(
                managers.sign_in, _text(body, "email"), _text(body, "password"), peer.get()
            )
            return json_reply(201, {"token": token, "expires_at": iso(session.expires_at)})
        if method == "DELETE":
            token = bearer()
            await run(managers.session, token)
            await run(managers.sign_out, token)
            return Reply(204, b"")
        raise AuthorityError(405, "METHOD_NOT_ALLOWED", "use POST, DELETE")
    if path == "/v1/manager/licenses":
        if method != "GET":
            raise AuthorityError(405, "METHOD_NOT_ALLOWED", "use GET")
        session = await run(managers.session, bearer())

        def listing() -> list[dict[str, Any]]:
            return [
                managed_license_doc(managers.authority, x) for x in managers.licenses(session.email)
            ]

        return json_reply(200, await run(listing))
    match = _LICENSE_USER.match(path)
    if match is None:
        raise AuthorityError(404, "NOT_FOUND", f"no route {path[:100]!r}")
    if method not in ("POST", "DELETE"):
        raise AuthorityError(405, "METHOD_NOT_ALLOWED", "use POST, DELETE")
    session = await run(managers.session, bearer())
    license_id, user = unquote(match.group(1)), unquote(match.group(2))
    change = managers.assign if method == "POST" else managers.unassign

    def apply() -> dict[str, Any]:
        return managed_license_doc(managers.authority, change(session.email, license_id, user))

    return json_reply(200, await run(apply))
