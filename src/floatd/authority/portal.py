"""The license managers' portal at ``/portal/``: server-rendered pages for what
the manager API does (enrol, sign in, see the licenses, assign, unassign).

Plain HTML forms, no script.  The session is a cookie (HttpOnly,
SameSite=Strict, Secure when the listener speaks TLS) holding the same kind of
session token the API answers.  Every form carries a CSRF token: a signed-in
form the session's own (kept with the session), a sign-in or enrolment form the
value of a second cookie set with the page (double submit).  A successful
change answers with a redirect (303), so reloading the page repeats nothing.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Awaitable, Callable
from html import escape
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qs, quote

from floatd.authority.documents import managed_license_doc
from floatd.authority.managers import SESSION_TTL, Managers, Session
from floatd.errors import AuthorityError
from floatd.http11 import Reply, headers, peer

Run = Callable[..., Awaitable[Any]]

SESSION_COOKIE = "floatd_portal"
CSRF_COOKIE = "floatd_portal_csrf"
HTML = "text/html; charset=utf-8"
#: Messages a redirect may ask the next page to show (never text from the request).
NOTICES = {
    "assigned": "User assigned.",
    "unassigned": "User unassigned.",
    "enrolled": "Your password is set: sign in.",
    "signed-out": "Signed out.",
}
_STYLE = (
    "body{font-family:sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
    "table{border-collapse:collapse;width:100%}td,th{border:1px solid #ccc;padding:.4rem;"
    "text-align:left;vertical-align:top}.notice{background:#e8f5e9;padding:.5rem}"
    ".error{background:#ffebee;padding:.5rem}.na{color:#b00;font-weight:bold}"
    "form.inline{display:inline}"
)


def _page(title: str, body: str, status: int = 200, notice: str = "", error: str = "") -> Reply:
    banner = ""
    if notice:
        banner += f'<p class="notice" role="status">{escape(notice)}</p>'
    if error:
        banner += f'<p class="error" role="alert">{escape(error)}</p>'
    text = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}'
        f" - floatd license portal</title><style>{_STYLE}</style></head><body>"
        f"<h1>{escape(title)}</h1>{banner}{body}</body></html>"
    )
    reply = Reply(status, text.encode(), HTML)
    reply.headers += [
        ("cache-control", "no-store"),
        ("referrer-policy", "no-referrer"),  # an enrolment link carries its token
        ("x-frame-options", "DENY"),
        (
            "content-security-policy",
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self';"
            " frame-ancestors 'none'",
        ),
    ]
    return reply


def _redirect(location: str) -> Reply:
    reply = Reply(303, b"", HTML, location=location)
    reply.headers.append(("cache-control", "no-store"))
    return reply


def _same(given: str, expected: str) -> bool:
    """Constant-time equality of a form's token and ours (as bytes: a token a
    browser sends may hold any character, which compare_digest refuses in str)."""
    return hmac.compare_digest(given.encode(), expected.encode())


def _hidden(name: str, value: str) -> str:
    return f'<input type="hidden" name="{name}" value="{escape(value)}">'


class Portal:
    def __init__(self, managers: Managers, run: Run, *, secure: bool) -> None:
        self.managers = managers
        self.run = run
        self.secure = secure

    # --- plumbing ---------------------------------------------------------------------

    def _cookie(self, name: str, value: str, max_age: int | None = None) -> tuple[str, str]:
        parts = [f"{name}={value}", "Path=/portal", "HttpOnly", "SameSite=Strict"]
        if max_age is not None:
            parts.append(f"Max-Age={max_age}")
        if self.secure:
            parts.append("Secure")
        return ("set-cookie", "; ".join(parts))

    @staticmethod
    def _cookies() -> dict[str, str]:
        raw = headers.get({}).get("cookie", b"").decode("latin-1")
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(raw)
        except CookieError:
            return {}
        return {key: morsel.value for key, morsel in jar.items()}

    async def _session(self) -> tuple[str, Session] | None:
        token = self._cookies().get(SESSION_COOKIE, "")
        if not token:
            return None
        try:
            return token, await self.run(self.managers.session, token)
        except AuthorityError:
            return None

    def _csrf_refused(self) -> Reply:
        return _page(
            "Form refused",
            '<p>The form was stale or did not come from this page. <a href="/portal/">'
            "Reload the portal</a> and try again.</p>",
            403,
        )

    # --- requests ---------------------------------------------------------------------

    async def respond(self, method: str, target: str, body: bytes) -> Reply:
        path, _, query = target.partition("?")
        try:
            args = {k: v[-1] for k, v in parse_qs(query, max_num_fields=10).items()}
        except ValueError:  # more fields than any page of ours has
            return _page("Bad request", "<p>The address could not be read.</p>", 400)
        if path in ("/portal", "/portal/"):
            if method not in ("GET", "HEAD"):
                return _page("Not allowed", "<p>Use GET.</p>", 405)
            return await self._home(NOTICES.get(args.get("done", ""), ""))
        if path == "/portal/enrol" and method in ("GET", "HEAD"):
            return self._enrol_form(args.get("token", ""))
        if method != "POST":
            return _page("Not found", '<p><a href="/portal/">The portal</a></p>', 404)
        try:
            form = {
                k: v[-1]
                for k, v in parse_qs(
                    body.decode("utf-8"), keep_blank_values=True, max_num_fields=20
                ).items()
            }
        except (UnicodeDecodeError, ValueError):
            return _page("Bad request", "<p>The form could not be read.</p>", 400)
        if path == "/portal/sign-in":
            return await self._sign_in(form)
        if path == "/portal/enrol":
            return await self._enrol(form)
        found = await self._session()
        if found is None:
            return self._sign_in_form("Your session has ended: sign in again.", status=401)
        token, session = found
        if not _same(form.get("csrf", ""), session.csrf):
            return self._csrf_refused()
        if path == "/portal/sign-out":
            await self.run(self.managers.sign_out, token)
            reply = _redirect("/portal/?done=signed-out")
            reply.headers.append(self._cookie(SESSION_COOKIE, "", max_age=0))
            return reply
        parts = path.split("/")
        # /portal/licenses/<id>/assign | /portal/licenses/<id>/unassign
        if len(parts) == 5 and parts[2] == "licenses" and parts[4] in ("assign", "unassign"):
            change = self.managers.assign if parts[4] == "assign" else self.managers.unassign
            try:
                await self.run(change, session.email, parts[3], form.get("email", "").strip())
            except AuthorityError as exc:
                return await self._licenses(session, error=exc.message, status=exc.status)
            return _redirect(f"/portal/?done={parts[4]}ed")
        return _page("Not found", '<p><a href="/portal/">The portal</a></p>', 404)

    async def _home(self, notice: str) -> Reply:
        found = await self._session()
        if found is None:
            return self._sign_in_form(notice=notice)
        return await self._licenses(found[1], notice=notice)

    # --- signing in and enrolling ------------------------------------------------------

    def _pre_session_form(
        self, title: str, action: str, fields: str, button: str, **banner: Any
    ) -> Reply:
        csrf = secrets.token_urlsafe(24)
        reply = _page(
            title,
            f'<form method="post" action="{action}">{_hidden("csrf", csrf)}{fields}'
            f'<p><button type="submit">{escape(button)}</button></p></form>',
            **banner,
        )
        reply.headers.append(self._cookie(CSRF_COOKIE, csrf))
        return reply

    def _pre_session_csrf_ok(self, form: dict[str, str]) -> bool:
        expected = self._cookies().get(CSRF_COOKIE, "")
        return bool(expected) and _same(form.get("csrf", ""), expected)

    def _sign_in_form(self, error: str = "", notice: str = "", status: int = 200) -> Reply:
        fields = (
            '<p><label>E-mail <input type="email" name="email" autocomplete="username" '
            'required></label></p><p><label>Password <input type="password" name="password" '
            'autocomplete="current-password" required></label></p>'
        )
        return self._pre_session_form(
            "Sign in",
            "/portal/sign-in",
            fields,
            "Sign in",
            error=error,
            notice=notice,
            status=status,
        )

    def _enrol_form(self, token: str, error: str = "", status: int = 200) -> Reply:
        fields = (
            f"{_hidden('token', token)}<p>Choose the password of your license manager account "
            '(at least 10 characters).</p><p><label>Password <input type="password" '
            'name="password" autocomplete="new-password" required minlength="10"></label></p>'
        )
        return self._pre_session_form(
            "Set your password",
            "/portal/enrol",
            fields,
            "Set password",
            error=error,
            status=status,
        )

    async def _sign_in(self, form: dict[str, str]) -> Reply:
        if not self._pre_session_csrf_ok(form):
            return self._csrf_refused()
        try:
            token, _ = await self.run(
                self.managers.sign_in,
                form.get("email", "").strip(),
                form.get("password", ""),
                peer.get(),
            )
        except AuthorityError as exc:
            return self._sign_in_form(error=exc.message, status=exc.status)
        reply = _redirect("/portal/")
        reply.headers.append(self._cookie(SESSION_COOKIE, token, max_age=int(SESSION_TTL)))
        reply.headers.append(self._cookie(CSRF_COOKIE, "", max_age=0))
        return reply

    async def _enrol(self, form: dict[str, str]) -> Reply:
        if not self._pre_session_csrf_ok(form):
            return self._csrf_refused()
        token = form.get("token", "")
        try:
            await self.run(self.managers.enrol, token, form.get("password", ""))
        except AuthorityError as exc:
            return self._enrol_form(token, error=exc.message, status=exc.status)
        return _redirect("/portal/?done=enrolled")

    # --- the licenses -----------------------------------------------------------------

    async def _licenses(
        self, session: Session, notice: str = "", error: str = "", status: int = 200
    ) -> Reply:
        def docs() -> list[dict[str, Any]]:
            managers = self.managers
            return [
                managed_license_doc(managers.authority, x) for x in managers.licenses(session.email)
            ]

        rows = []
        for doc in await self.run(docs):
            rows.append(self._license_row(doc, session.csrf))
        table = (
            "<table><thead><tr><th>License</th><th>Products</th><th>User places</th>"
            f"<th>Users</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
            if rows
            else "<p>No licenses are under your orders yet.</p>"
        )
        sign_out = (
            f'<form method="post" action="/portal/sign-out">{_hidden("csrf", session.csrf)}'
            '<button type="submit">Sign out</button></form>'
        )
        body = f"<p>Signed in as {escape(session.email)}.</p>{sign_out}{table}"
        return _page("Your licenses", body, status, notice=notice, error=error)

    @staticmethod
    def _license_row(doc: dict[str, Any], csrf: str) -> str:
        license_id = quote(str(doc["id"]), safe="")
        users = []
        for email in doc["users"]:
            users.append(
                f'<li>{escape(email)} <form class="inline" method="post" '
                f'action="/portal/licenses/{license_id}/unassign">{_hidden("csrf", csrf)}'
                f'{_hidden("email", email)}<button type="submit">Unassign</button></form></li>'
            )
        for product, emails in sorted(doc["local_users"].items()):
            for email in emails:
                users.append(f"<li>{escape(email)} (assigned on the site's server, {product})</li>")
        listing = f"<ul>{''.join(users)}</ul>" if users else '<p class="na">Not assigned</p>'
        cap = doc["max_users"]
        places = "no limit" if cap <= 0 else f"{doc['places_free']} of {cap} free"
        assign = (
            f'<form method="post" action="/portal/licenses/{license_id}/assign">'
            f'{_hidden("csrf", csrf)}<label>E-mail <input type="email" name="email" required>'
            '</label> <button type="submit">Assign</button></form>'
        )
        products = ", ".join(escape(p["name"]) for p in doc["products"])
        title = escape(f"{doc['id']} (order {doc['order']}, {doc['customer'] or 'no customer'})")
        state = "" if doc["state"] == "active" else f" <em>{escape(doc['state'])}</em>"
        return (
            f'<tr data-license="{escape(str(doc["id"]))}"><td>{title}{state}</td>'
            f"<td>{products}</td><td>{places}</td><td>{listing}{assign}</td></tr>"
        )
