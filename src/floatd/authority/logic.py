"""What the reference authority does: issue licenses, activate, refresh,
deactivate, sign offline requests.  Synchronous, with ``now`` passed in; the
HTTP server and the vendor CLI are both thin layers over :class:`Authority`.

A license maps onto an entitlement like this: its products (each with the
product's name and authorization method), its seat count (allowedFloatingClients),
lease duration and strategy (the license's, else the product's default),
user-locking, IP allow-list, assigned users and their cap, trial flag,
borrow_max, metadata and features; its effective date becomes ``not_before``;
its expiry (explicit, from the subscription interval, or from the trial length)
becomes ``not_after``; an online activation gets ``refresh_by`` = now + the
license's grace period, an offline one the request's nonce and no refresh_by.
"""

from __future__ import annotations

import hmac
import re
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from floatd.authority.store import Activation, AuthorityStore, License, Product, Terms
from floatd.authority.terms import (
    STATES,
    BadTerms,
    add_duration,
    check_terms,
    key_hash,
    new_license_key,
)
from floatd.core.entitlement import (
    check_email,
    parse_activation_request,
    product_payload,
    sign_entitlement,
)
from floatd.errors import AuthorityError, EntitlementError

API_KEY_PREFIX = "FLA-"
#: What a management API key may do: everything, or only read.
API_RIGHTS = ("all", "read")


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(8)


class Authority:
    def __init__(
        self,
        store: AuthorityStore,
        key: Ed25519PrivateKey | None = None,
        *,
        actor: str = "cli",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.key = key
        #: Who makes the changes this instance records ("cli:alice", "api:key-1").
        self.actor = actor
        self._clock = clock

    def record_change(
        self,
        action: str,
        subject: str,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
    ) -> None:
        """Record a change in the vendor's trail (in the caller's transaction)."""
        self.store.add_change(self._clock(), self.actor, action, subject, before, after)

    def _license_state(self, license_id: str) -> dict[str, Any]:
        lic = self.get_license(license_id)
        return {"state": lic.state, "users": list(lic.users), "terms": dict(lic.terms.__dict__)}

    # --- vendor operations ------------------------------------------------------------

    def add_product(self, product: Product) -> Product:
        if product.authorization not in ("key", "user"):
            raise AuthorityError(400, "BAD_REQUEST", "authorization must be key or user")
        if product.strategy not in ("per-machine", "per-instance"):
            raise AuthorityError(400, "BAD_REQUEST", "strategy must be per-machine or per-instance")
        if product.lease_duration < 0 or product.trial_days < 0:
            raise AuthorityError(400, "BAD_REQUEST", "durations must not be negative")
        with self.store.transaction():
            self.store.add_product(product)
            self.record_change(
                "product.add", f"product:{product.code}", None, dict(product.__dict__)
            )
        return product

    def issue_license(
        self,
        order_id: str,
        terms: Terms,
        now: float,
        *,
        order_reference: str | None = None,
        customer: str | None = None,
    ) -> tuple[License, str]:
        """A new license and its key (the only time the key is seen)."""
        check_terms(terms, now)
        for code in terms.products:
            if self.store.product(code) is None:
                raise AuthorityError(404, "PRODUCT_NOT_FOUND", f"no product {code!r}")
        self._check_trial(terms)
        if terms.interval is not None and terms.expires_at is None:
            terms.expires_at = add_duration(terms.effective_at or now, terms.interval)
        key = new_license_key()
        license_id = _new_id("lic-")
        with self.store.transaction():
            self.store.ensure_order(order_id, order_reference, customer)
            self.store.add_license(license_id, order_id, key_hash(key), terms, now)
            self.record_change(
                "license.issue",
                f"license:{license_id}",
                None,
                {"order": order_id, **self._license_state(license_id)},
            )
        lic = self.store.license(license_id)
        assert lic is not None
        return lic, key

    def _check_trial(self, terms: Terms) -> None:
        """A trial must end: each of its products needs a trial length, unless
        the license has an expiry of its own."""
        if terms.trial and terms.expires_at is None and terms.interval is None:
            endless = [p.code for p in self._products(terms.products) if not p.trial_days]
            if endless:
                raise BadTerms(
                    "--trial",
                    f"product {endless[0]!r} has no trial length: a trial of it would never "
                    "end (give --expires, or the product --trial-days)",
                )

    def get_license(self, license_id: str) -> License:
        lic = self.store.license(license_id)
        if lic is None:
            raise AuthorityError(404, "LICENSE_NOT_FOUND", f"no license {license_id!r}")
        return lic

    def update_license(
        self,
        license_id: str,
        now: float,
        *,
        extend: bool = False,
        clear: Sequence[str] = (),
        **changes: Any,
    ) -> License:
        """Change terms; the next refresh of each activation carries them.
        A change of None keeps the term; ``clear`` names terms to drop (an
        expiry, an effective date, an interval, a strategy of the license's
        own); ``extend`` adds one subscription interval to the expiry."""
        lic = self.get_license(license_id)
        before = self._license_state(license_id)
        terms = lic.terms
        known = set(terms.__dict__)
        for name in [*changes, *clear]:
            if name not in known:
                raise AuthorityError(400, "BAD_REQUEST", f"no license term {name!r}")
        for name in clear:
            if name not in ("expires_at", "effective_at", "interval", "strategy", "lease_duration"):
                raise AuthorityError(400, "BAD_REQUEST", f"license term {name!r} cannot be dropped")
            setattr(terms, name, None)
        for name, value in changes.items():
            if value is not None:
                setattr(terms, name, value)
        for code in terms.products:
            if self.store.product(code) is None:
                raise AuthorityError(404, "PRODUCT_NOT_FOUND", f"no product {code!r}")
        self._check_trial(terms)
        if extend:
            if terms.interval is None:
                raise AuthorityError(
                    400, "BAD_REQUEST", "this license has no subscription interval"
                )
            base = terms.expires_at if terms.expires_at and terms.expires_at > now else now
            terms.expires_at = add_duration(base, terms.interval)
        check_terms(terms, now)
        with self.store.transaction():
            self.store.set_terms(license_id, terms)
            self.record_change(
                "license.update", f"license:{license_id}", before, self._license_state(license_id)
            )
        return self.get_license(license_id)

    def set_state(self, license_id: str, state: str) -> License:
        if state not in STATES:
            raise AuthorityError(400, "BAD_REQUEST", f"state must be one of {', '.join(STATES)}")
        lic = self.get_license(license_id)
        if lic.state == "revoked" and state != "revoked":
            what = "reinstated" if state == "active" else "suspended"
            raise AuthorityError(
                409, "LICENSE_REVOKED", f"license {lic.id} is revoked: it cannot be {what}"
            )
        before = self._license_state(license_id)
        with self.store.transaction():
            self.store.set_state(license_id, state)
            if state == "revoked":
                # For good: its activations no longer hold places (a suspended
                # license keeps them, to have them back when reinstated).
                for activation in self.store.activations(license_id, active_only=True):
                    self.store.set_activation(activation.id, state="revoked")
            self.record_change(
                f"license.{state}", f"license:{license_id}", before, self._license_state(license_id)
            )
        return self.get_license(license_id)

    def assign_user(self, license_id: str, email: str) -> License:
        lic = self.get_license(license_id)
        try:
            check_email(email)
        except ValueError as exc:
            raise AuthorityError(400, "BAD_REQUEST", str(exc)) from None
        if not any(p.authorization == "user" for p in self._products(lic.terms.products)):
            raise AuthorityError(
                409,
                "NOT_USER_AUTHORIZED",
                f"license {lic.id} has no user-authorized product: users would lease nothing",
            )
        cap = lic.terms.max_users
        # The site's own assignments count too: each side alone let the total
        # pass the cap.
        everyone = set(lic.users).union(*self.store.local_users(lic.id).values())
        if email not in everyone and cap > 0 and len(everyone) >= cap:
            raise AuthorityError(
                409,
                "MAX_USERS_REACHED",
                f"all {cap} user places are taken ({len(lic.users)} here, "
                f"{len(everyone) - len(lic.users)} assigned by the site)",
            )
        with self.store.transaction():
            if self.store.add_user(license_id, email):
                self.record_change(
                    "user.assign", f"license:{license_id}", {"user": None}, {"user": email}
                )
        return self.get_license(license_id)

    def unassign_user(self, license_id: str, email: str) -> License:
        lic = self.get_license(license_id)
        with self.store.transaction():
            if not self.store.remove_user(lic.id, email):
                raise AuthorityError(404, "USER_NOT_FOUND", f"{email} is not assigned")
            self.record_change(
                "user.unassign", f"license:{lic.id}", {"user": email}, {"user": None}
            )
        return self.get_license(license_id)

    def revoke_activation(self, activation_id: str) -> Activation:
        activation = self.store.activation(activation_id)
        if activation is None:
            raise AuthorityError(404, "ACTIVATION_NOT_FOUND", "no such activation")
        with self.store.transaction():
            self.store.set_activation(activation_id, state="revoked")
            self.record_change(
                "activation.revoke",
                f"activation:{activation_id}",
                {"state": activation.state},
                {"state": "revoked"},
            )
        return activation

    def create_api_key(self, name: str, rights: str = "all") -> str:
        """A key for the management API (shown once, stored as a hash).  ``rights``:
        "all", or "read" for a key that may only read (GET routes)."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise AuthorityError(400, "BAD_REQUEST", "an API key name is 1-64 of A-Z a-z 0-9 _ . -")
        if rights not in API_RIGHTS:
            raise AuthorityError(400, "BAD_REQUEST", f"rights are one of {', '.join(API_RIGHTS)}")
        key = API_KEY_PREFIX + secrets.token_urlsafe(32)
        with self.store.transaction():
            self.store.add_api_key(name, key_hash(key), self._clock(), rights)
            self.record_change(
                "api_key.create", f"api_key:{name}", None, {"name": name, "rights": rights}
            )
        return key

    def revoke_api_key(self, name: str) -> None:
        with self.store.transaction():
            if not self.store.revoke_api_key(name):
                raise AuthorityError(404, "API_KEY_NOT_FOUND", f"no active API key {name!r}")
            self.record_change(
                "api_key.revoke", f"api_key:{name}", {"revoked": False}, {"revoked": True}
            )

    def api_actor(self, key: str) -> tuple[str, str] | None:
        """(``api:<name>``, its rights) for a live key, else None."""
        found = self.store.api_key(key_hash(key))
        return None if found is None else (f"api:{found[0]}", found[1])

    def now(self) -> float:
        """The authority's clock (injected in tests)."""
        return self._clock()

    def as_actor(self, actor: str) -> Authority:
        """The same books, with changes recorded as ``actor``'s."""
        return Authority(self.store, self.key, actor=actor, clock=self._clock)

    # --- the API ----------------------------------------------------------------------

    def _usable(self, lic: License | None, now: float) -> License:
        if lic is None:
            raise AuthorityError(403, "LICENSE_NOT_FOUND", "no license with that key")
        if lic.state == "suspended":
            raise AuthorityError(403, "LICENSE_SUSPENDED", "the license is suspended")
        if lic.state == "revoked":
            raise AuthorityError(403, "LICENSE_REVOKED", "the license was revoked")
        expiry = self.expiry(lic)
        if expiry is not None and now >= expiry:
            raise AuthorityError(403, "LICENSE_EXPIRED", "the license has expired")
        return lic

    def _by_key(self, license_key: str) -> License | None:
        lic = self.store.license_by_key_hash(key_hash(license_key))
        return lic

    def activate(
        self,
        license_key: str,
        server: str,
        hostname: str | None,
        floatd: str | None,
        now: float,
        server_key: str | None = None,
    ) -> tuple[str, str]:
        """``(activation_id, entitlement)``; the same server activating again
        gets its existing activation back rather than a second place."""
        with self.store.transaction():
            lic = self._usable(self._by_key(license_key), now)
            held = self.store.activations(lic.id, active_only=True)
            mine = next((a for a in held if a.server == server), None)
            if mine is None:
                if len(held) >= max(1, lic.terms.allowed_activations):
                    raise AuthorityError(
                        409,
                        "ACTIVATION_LIMIT_REACHED",
                        f"all {lic.terms.allowed_activations} activations of the license are used",
                    )
                mine = Activation(
                    _new_id("act-"), lic.id, server, hostname, floatd, "online", "active", now, now
                )
                self.store.add_activation(mine)
            else:
                self.store.set_activation(mine.id, refreshed_at=now)
        return mine.id, self.entitlement(lic, server, now, online=True, server_key=server_key)

    def refresh(
        self,
        activation_id: str,
        server: str,
        now: float,
        address: str | None = None,
        floatd: str | None = None,
        local_users: dict[str, list[str]] | None = None,
        server_key: str | None = None,
    ) -> str:
        """A fresh entitlement for an activation.  ``local_users``: the license
        users the site assigned on its own server ({product: [e-mail]}), kept
        until the next refresh to be shown and counted against max_users."""
        activation = self.store.activation(activation_id)
        if activation is None or not hmac.compare_digest(activation.server, server):
            raise AuthorityError(404, "ACTIVATION_NOT_FOUND", "no such activation for this server")
        lic = self.get_license(activation.license_id)
        if activation.state != "active":
            raise AuthorityError(410, "ACTIVATION_REVOKED", "the activation was revoked")
        if lic.state != "active":
            raise AuthorityError(410, "ACTIVATION_REVOKED", f"the license is {lic.state}")
        with self.store.transaction():
            self.store.set_activation(activation_id, refreshed_at=now)
            self.store.add_refresh(activation_id, now, address, floatd)
            if local_users is not None:
                self.store.set_local_users(activation_id, local_users)
        return self.entitlement(lic, server, now, online=True, server_key=server_key)

    def deactivate(self, activation_id: str, server: str) -> None:
        activation = self.store.activation(activation_id)
        if activation is None or not hmac.compare_digest(activation.server, server):
            raise AuthorityError(404, "ACTIVATION_NOT_FOUND", "no such activation for this server")
        self.store.set_activation(activation_id, state="released")

    def sign_offline(self, request_text: str, now: float) -> tuple[str, str]:
        """``(activation_id, entitlement)`` for an offline activation request."""
        try:
            request = parse_activation_request(request_text)
        except EntitlementError as exc:
            raise AuthorityError(400, "BAD_REQUEST", str(exc)) from None
        with self.store.transaction():
            lic = self._usable(self._by_key(request.license_key), now)
            held = self.store.activations(lic.id, active_only=True)
            renewing = any(a.server == request.server for a in held)
            if not renewing and len(held) >= max(1, lic.terms.allowed_activations):
                raise AuthorityError(
                    409, "ACTIVATION_LIMIT_REACHED", "all activations of the license are used"
                )
            activation = Activation(
                _new_id("act-"),
                lic.id,
                request.server,
                request.hostname,
                request.floatd,
                "offline",
                "active",
                now,
                now,
            )
            for old in held:
                if old.server == request.server:
                    self.store.set_activation(old.id, state="replaced")
            self.store.add_activation(activation)
            # The vendor's own act (an online activation is the server's).
            self.record_change(
                "activation.offline",
                f"license:{lic.id}",
                None,
                {"activation": activation.id, "server": request.server},
            )
        return activation.id, self.entitlement(
            lic,
            request.server,
            now,
            online=False,
            nonce=request.nonce,
            server_key=request.server_key,
        )

    # --- entitlements -------------------------------------------------------------------

    def expiry(self, lic: License) -> int | None:
        """The license's end: its explicit expiry, else (a trial) the end of
        its longest product trial, else None (perpetual)."""
        terms = lic.terms
        if terms.expires_at is not None:
            return terms.expires_at
        if terms.trial:
            ends = [self._trial_end(lic, p) for p in self._products(terms.products)]
            return max((end for end in ends if end is not None), default=None)
        return None

    def _trial_end(self, lic: License, product: Product) -> int | None:
        """When a trial of ``product`` ends (each product its own trial length,
        from the effective or issue date); None when there is no trial of it
        or an explicit expiry rules."""
        terms = lic.terms
        if not terms.trial or terms.expires_at is not None or not product.trial_days:
            return None
        return int((terms.effective_at or lic.created_at) + product.trial_days * 86400)

    def _products(self, codes: Sequence[str]) -> list[Product]:
        out = []
        for code in codes:
            product = self.store.product(code)
            if product is None:
                raise AuthorityError(500, "INTERNAL", f"product {code!r} vanished")
            out.append(product)
        return out

    def payload(
        self,
        lic: License,
        server: str,
        now: float,
        *,
        online: bool,
        nonce: str | None = None,
        server_key: str | None = None,
    ) -> dict[str, Any]:
        t = lic.terms
        products = []
        for p in self._products(t.products):
            products.append(
                product_payload(
                    p.code,
                    p.name,
                    t.seats,
                    lease_duration=t.lease_duration
                    if t.lease_duration is not None
                    else p.lease_duration,
                    strategy=t.strategy or p.strategy,
                    user_locked=t.user_locked,
                    authorization=p.authorization,
                    users=list(lic.users) if p.authorization == "user" else [],
                    max_users=t.max_users,
                    allowed_ips=list(t.allowed_ips),
                    trial=t.trial,
                    not_after=self._trial_end(lic, p),
                    borrow_max=t.borrow_max,
                    metadata=dict(t.metadata),
                    features=dict(t.features),
                )
            )
        return {
            "v": 1,
            "id": _new_id("ent-"),
            "license": lic.id,
            "customer": lic.customer,
            "server": server,
            "issued_at": int(now),
            "not_before": t.effective_at,
            "not_after": self.expiry(lic),
            "refresh_by": int(now + t.grace_seconds) if online else None,
            "nonce": nonce,
            "products": products,
            # The server's own key, as its request said: only it can use this.
            "server_key": server_key,
        }

    def entitlement(
        self, lic: License, server: str, now: float, *, online: bool, **extra: str | None
    ) -> str:
        """The signed entitlement; ``extra``: ``nonce`` and ``server_key``."""
        if self.key is None:
            raise AuthorityError(500, "INTERNAL", "the authority has no signing key loaded")
        return sign_entitlement(self.key, self.payload(lic, server, now, online=online, **extra))
