"""License managers: the customer's people who assign a license's users.

An order may name one manager (an e-mail).  The vendor appoints them (CLI or
management API) and hands over a one-time enrolment token; with it the manager
sets a password, then signs in (API or portal) for a session that expires.  A
manager sees the licenses of the orders that name them and does one thing to
them: assign and unassign license users, within ``max_users``, through the same
:meth:`Authority.assign_user` the vendor uses, recorded in the change trail as
``manager:<email>``.  A license outside their orders answers as if it did not
exist, so a manager learns nothing about other customers.

Secrets are never stored: the enrolment token and session tokens as SHA-256
(they carry 256 random bits), the password as scrypt, as floatd's own license
users.  Synchronous, with the clock passed in, like :mod:`floatd.authority.logic`.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from floatd.authority.logic import Authority
from floatd.authority.store import License
from floatd.core.entitlement import check_email
from floatd.core.limits import RateLimiter, limit_key
from floatd.errors import AuthorityError
from floatd.store.users import hash_password, verify_password

#: How long an enrolment token can be used.
ENROL_TTL = 7 * 86400.0
#: How long a session lasts after sign-in.
SESSION_TTL = 8 * 3600.0
ENROL_PREFIX = "FLE-"
SESSION_PREFIX = "FLS-"
#: Shortest password a manager may set.
MIN_PASSWORD = 10
#: Failed sign-ins allowed per e-mail and per address: this many at once, then
#: one a minute.  Past that, sign-ins (right or wrong) get 429 until it refills,
#: so guessing costs a guesser far more than scrypt costs the authority.
FAILED_BURST = 10
FAILED_PER_SECOND = 1 / 60


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class Session:
    email: str
    #: The CSRF token of the portal's forms in this session.
    csrf: str
    expires_at: float


@dataclass(frozen=True)
class Manager:
    email: str
    enrolled: bool
    orders: list[str]


def _normal(email: str) -> str:
    """A manager's e-mail as stored and looked up: people type their address in
    any case when they sign in, and expect it to work."""
    return email.strip().lower()


def _unauthorized(message: str = "sign in first") -> AuthorityError:
    return AuthorityError(401, "UNAUTHORIZED", message)


class Managers:
    def __init__(self, authority: Authority) -> None:
        self.authority = authority
        self.db = authority.store.db
        self._clock = authority.now
        #: Failed sign-ins by e-mail and by address (kept by the one instance the
        #: HTTP server holds; sign-ins run one at a time in its database thread).
        self.failures = RateLimiter(FAILED_PER_SECOND, FAILED_BURST, max_keys=10_000)

    # --- the vendor's side ---------------------------------------------------------

    def appoint(self, order_id: str, email: str) -> str | None:
        """Name ``email`` the manager of ``order_id`` (one per order: this replaces
        any other).  Returns an enrolment token when the account has no password
        yet, else None (the manager signs in as before)."""
        try:
            email = _normal(check_email(email))
        except ValueError as exc:
            raise AuthorityError(400, "BAD_REQUEST", str(exc)) from None
        row = self.db.execute("SELECT manager FROM orders WHERE id = ?", (order_id,)).fetchone()
        if row is None:
            raise AuthorityError(404, "ORDER_NOT_FOUND", f"no order {order_id!r}")
        token = None
        with self.authority.store.transaction():
            known = self._account(email)
            if known is None:
                self.db.execute(
                    "INSERT INTO managers (email, created_at) VALUES (?, ?)", (email, self._clock())
                )
            if known is None or known[0] is None:
                token = self._new_enrolment(email)
            self.db.execute("UPDATE orders SET manager = ? WHERE id = ?", (email, order_id))
            self.authority.record_change(
                "order.manager", f"order:{order_id}", {"manager": row[0]}, {"manager": email}
            )
        return token

    def dismiss(self, order_id: str) -> None:
        """The order has no manager any more (the account stays, for their other orders)."""
        row = self.db.execute("SELECT manager FROM orders WHERE id = ?", (order_id,)).fetchone()
        if row is None:
            raise AuthorityError(404, "ORDER_NOT_FOUND", f"no order {order_id!r}")
        if row[0] is None:
            raise AuthorityError(404, "MANAGER_NOT_FOUND", f"order {order_id!r} has no manager")
        with self.authority.store.transaction():
            self.db.execute("UPDATE orders SET manager = NULL WHERE id = ?", (order_id,))
            self.authority.record_change(
                "order.manager", f"order:{order_id}", {"manager": row[0]}, {"manager": None}
            )

    def reset(self, email: str) -> str:
        """A new enrolment token (a forgotten password): the old password and every
        session end now."""
        email = _normal(email)
        with self.authority.store.transaction():
            if self._account(email) is None:
                raise AuthorityError(404, "MANAGER_NOT_FOUND", f"no license manager {email!r}")
            self.db.execute("UPDATE managers SET password_hash = NULL WHERE email = ?", (email,))
            self.db.execute("DELETE FROM manager_sessions WHERE email = ?", (email,))
            token = self._new_enrolment(email)
            self.authority.record_change("manager.reset", f"manager:{email}", None, None)
        return token

    def all(self) -> list[Manager]:
        rows = self.db.execute(
            "SELECT m.email, m.password_hash IS NOT NULL, o.id FROM managers m"
            " LEFT JOIN orders o ON o.manager = m.email ORDER BY m.email, o.id"
        ).fetchall()
        out: dict[str, Manager] = {}
        for email, enrolled, order in rows:
            manager = out.setdefault(email, Manager(email, bool(enrolled), []))
            if order is not None:
                manager.orders.append(order)
        return list(out.values())

    def _new_enrolment(self, email: str) -> str:
        token = ENROL_PREFIX + secrets.token_urlsafe(32)
        self.db.execute(
            "UPDATE managers SET enrol_hash = ?, enrol_expires = ? WHERE email = ?",
            (_digest(token), self._clock() + ENROL_TTL, email),
        )
        return token

    def _account(self, email: str) -> tuple[str | None] | None:
        """(password hash or None before enrolment,) of a manager; None: no such account."""
        row = self.db.execute(
            "SELECT password_hash FROM managers WHERE email = ?", (email,)
        ).fetchone()
        return None if row is None else (row[0],)

    # --- the manager's side ---------------------------------------------------------

    def enrol(self, token: str, password: str) -> str:
        """Set the password with a one-time token; the manager's e-mail."""
        if len(password) < MIN_PASSWORD or len(password) > 1024:
            raise AuthorityError(
                400, "BAD_REQUEST", f"a password has {MIN_PASSWORD} to 1024 characters"
            )
        row = self.db.execute(
            "SELECT email, enrol_expires FROM managers WHERE enrol_hash = ?", (_digest(token),)
        ).fetchone()
        if row is None or row[1] is None or row[1] <= self._clock():
            raise AuthorityError(
                403, "ENROLMENT_INVALID", "this enrolment token is unknown, used or expired"
            )
        encoded = hash_password(password)
        with self.authority.store.transaction():
            self.db.execute(
                "UPDATE managers SET password_hash = ?, enrol_hash = NULL, enrol_expires = NULL"
                " WHERE email = ?",
                (encoded, row[0]),
            )
            self.authority.record_change("manager.enrol", f"manager:{row[0]}", None, None)
        return str(row[0])

    def sign_in(self, email: str, password: str, address: str | None = None) -> tuple[str, Session]:
        """A new session token (shown once) and its session; 401 for an unknown
        e-mail and a wrong password alike, 429 after too many failures from
        the e-mail or the address."""
        now = self._clock()
        email = _normal(email)
        keys = [f"email:{email}"]
        if address is not None:
            keys.append(f"address:{limit_key(address)}")
        if any(self.failures.blocked(key, now) for key in keys):
            raise AuthorityError(
                429, "RATE_LIMITED", "too many failed sign-ins: wait a minute and try again"
            )
        account = self._account(email)
        # An unknown e-mail checks a dummy hash: as slow as a wrong password.
        if not verify_password(password, account[0] if account is not None else None):
            for key in keys:
                self.failures.allow(key, now)
            raise _unauthorized("unknown e-mail or wrong password")
        token = SESSION_PREFIX + secrets.token_urlsafe(32)
        session = Session(email, secrets.token_urlsafe(24), now + SESSION_TTL)
        with self.authority.store.transaction():
            self.db.execute("DELETE FROM manager_sessions WHERE expires_at <= ?", (now,))
            self.db.execute(
                "INSERT INTO manager_sessions VALUES (?, ?, ?, ?)",
                (_digest(token), email, session.csrf, session.expires_at),
            )
        return token, session

    def session(self, token: str) -> Session:
        """The live session of ``token``, else 401."""
        if not token:
            raise _unauthorized()
        row = self.db.execute(
            "SELECT email, csrf, expires_at FROM manager_sessions WHERE token_hash = ?",
            (_digest(token),),
        ).fetchone()
        if row is None or row[2] <= self._clock():
            raise _unauthorized("the session is unknown or has expired: sign in again")
        return Session(str(row[0]), str(row[1]), float(row[2]))

    def sign_out(self, token: str) -> None:
        with self.authority.store.transaction():
            self.db.execute("DELETE FROM manager_sessions WHERE token_hash = ?", (_digest(token),))

    def licenses(self, email: str) -> list[License]:
        store = self.authority.store
        orders = [
            r[0]
            for r in self.db.execute(
                "SELECT id FROM orders WHERE manager = ? ORDER BY id", (email,)
            )
        ]
        return [lic for order in orders for lic in store.licenses(order)]

    def license(self, email: str, license_id: str) -> License:
        """One of the manager's licenses; any other is 404, as if it did not exist."""
        lic = self.authority.store.license(license_id)
        if lic is not None:
            row = self.db.execute(
                "SELECT manager FROM orders WHERE id = ?", (lic.order_id,)
            ).fetchone()
            if row is not None and row[0] == email:
                return lic
        raise AuthorityError(404, "LICENSE_NOT_FOUND", f"no license {license_id!r}")

    def assign(self, email: str, license_id: str, user: str) -> License:
        self.license(email, license_id)
        return self.authority.as_actor(f"manager:{email}").assign_user(license_id, user)

    def unassign(self, email: str, license_id: str, user: str) -> License:
        self.license(email, license_id)
        return self.authority.as_actor(f"manager:{email}").unassign_user(license_id, user)
