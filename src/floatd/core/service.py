"""The lease service: requests in, responses and durable changes out.

This is where the protocol meets the pool and the entitlement, still without
I/O: each call takes ``now`` and the peer address, returns a response (or a
queued :class:`~floatd.core.seats.Waiter`), and leaves behind the store changes that
must be committed before that response may be sent.  The trio server drains
them with :meth:`LeaseService.take_changes` after every call; since a call's
changes always land in one batch, a commit never holds half an outcome.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from floatd import __version__
from floatd.core.borrow import borrow_payload, borrow_rules, sign_borrow
from floatd.core.changes import Change
from floatd.core.clockguard import ClockGuard
from floatd.core.connection import PROTOCOL_VERSION
from floatd.core.entitlement import Entitlement, ProductTerms, check_license, check_product
from floatd.core.ledger import Ledger, LocalLedger, RenewCheck
from floatd.core.limits import RateLimiter, limit_key, peer_ip
from floatd.core.messages import (
    Acquire,
    Answer,
    Borrow,
    Hello,
    Info,
    Ping,
    Release,
    Renew,
    Request,
    answer,
    refusal,
)
from floatd.core.outcomes import LogFn, Recorder
from floatd.core.policy import Policy
from floatd.core.seats import Claim, Lease, PoolProduct, Waiter, hash_token
from floatd.core.secrets import new_lease_secrets
from floatd.errors import (
    AdminError,
    AuthFailed,
    FloatdError,
    IpNotAllowed,
    LeaseNotFound,
    LicenseRefusal,
    NoFreeSeats,
    PolicyDenied,
    RateLimited,
    ServerTimeModified,
    Unavailable,
    UnknownProduct,
)


class LeaseService:
    def __init__(
        self,
        server_id: str,
        default_duration: int,
        *,
        log: LogFn | None = None,
        allowed_clock_offset: float = 60.0,
        ledger: Ledger | None = None,
    ) -> None:
        self.server_id = server_id
        self.default_duration = default_duration
        self.clock_guard = ClockGuard(allowed_clock_offset)
        self.acquire_limit = RateLimiter(20.0, 200.0)
        self.auth_limit = RateLimiter(10.0 / 60, 10.0)
        # Renewals and releases of leases that do not exist (made-up ids, a
        # client renewing what it lost long ago) per address.
        self.miss_limit = RateLimiter(20.0, 1200.0)
        #: Who holds which seat: every seat decision is the ledger's.
        self.ledger: Ledger = ledger if ledger is not None else LocalLedger()
        #: False while the durable state cannot be written: every request that
        #: would change a seat is refused (UNAVAILABLE) before it touches the
        #: pool, so memory never runs ahead of a disk that stopped following.
        self.writable = True
        self.entitlement: Entitlement | None = None
        #: What each outcome leaves besides its answer: audit, log line, counts.
        self.outcomes = Recorder(self.ledger, log)
        # The static part of each product's answer, built once per entitlement.
        self._product_info: dict[str, dict[str, Any]] = {}
        self._woken: list[Waiter] = []
        # A queued acquire's id and lease token, until it is answered.
        self._queued: dict[Waiter, tuple[int, str]] = {}
        #: The counters the metrics endpoint reads (see Recorder).
        self.events = self.outcomes.events
        self.refusals = self.outcomes.refusals
        self.policy_refusals = self.outcomes.policy_refusals
        #: The site policy in force (None: none), kept for explain and status.
        self.policy: Policy | None = None
        #: This server's own key, which signs borrow certificates (set at start).
        self.server_key: Ed25519PrivateKey | None = None

    def set_log(self, log: LogFn) -> None:
        self.outcomes.log = log

    @property
    def store_logs_leases(self) -> bool:
        return self.outcomes.store_logs_leases

    @store_logs_leases.setter
    def store_logs_leases(self, value: bool) -> None:
        self.outcomes.store_logs_leases = value

    # --- state --------------------------------------------------------------

    def install(self, ent: Entitlement | None, now: float) -> None:
        """Switch to a new (already verified) entitlement without touching leases."""
        self.entitlement = ent
        products = ent.products if ent is not None else ()
        self._product_info = {
            p.code: {
                "code": p.code,
                "name": p.name,
                "metadata": dict(p.metadata),
                "features": dict(p.features),
                "not_after": _earliest(ent.not_after if ent else None, p.not_after),
            }
            for p in products
        }
        self.ledger.set_products((self._pool_terms(p) for p in products), now)
        self._collect()

    def set_policy(self, policy: Policy | None, now: float) -> None:
        """Decide by ``policy`` from now on; held leases stay, waiters it now
        admits are served (and answered through the usual wake-up)."""
        self.policy = policy
        self.ledger.set_policy(policy, now)
        self._collect()

    def explain(
        self,
        now: float,
        product: str,
        *,
        fingerprint: str = "",
        user: str | None = None,
        host: str | None = None,
        ip: str | None = None,
        instance: str | None = None,
    ) -> dict[str, Any]:
        """What an acquire with these identities would get now, and which rule
        decides; changes nothing (``floatd policy explain``)."""
        claim = Claim(product, fingerprint, "", b"", instance, user, host, peer=ip)
        out = self.ledger.explain(now, claim)
        self._collect()
        return {"product": product, **out}

    def reset(self, now: float) -> None:
        """Forget the in-memory pool for an empty one with the same terms, to be
        filled from disk by :meth:`restore` (recovery after a failed write)."""
        self.ledger.reset()
        self._queued.clear()
        self._woken.clear()
        self.install(self.entitlement, now)

    def shift_time(self, delta: float) -> int:
        """The wall clock jumped by ``delta``: keep every lease's time left (see
        :meth:`SeatPool.shift`) and persist the moved expiries."""
        return len(self.ledger.shift(delta))

    def clamp_expiries(self, now: float, slack: float) -> int:
        """After the clock mark was reset (a clock that was far ahead, now put
        right): no lease runs longer than a full duration (plus ``slack``) from
        now, whatever date it was given by the wrong clock."""
        return len(self.ledger.clamp(now, slack))

    def abandon_waiters(self) -> list[tuple[Waiter, int]]:
        """Take every queued acquire out of its queue, with its request id: the
        state can no longer be written, so none of them can be granted."""
        out = [(waiter, self._queued.pop(waiter)[0]) for waiter in self.ledger.drop_waiters()]
        self._queued.clear()
        return out

    def restore(self, leases: Iterable[Lease], now: float) -> list[Lease]:
        dead = self.ledger.restore(leases, now)
        for lease in dead:
            self.outcomes.expired_while_down(lease)
        return dead

    def advance(self, now: float) -> None:
        self.ledger.expire(now)
        self._collect()
        self.outcomes.fold_refusals(now)

    def next_deadline(self) -> float | None:
        return self.ledger.next_deadline()

    def take_changes(self) -> list[Change]:
        return self.ledger.take_changes()

    def take_woken(self) -> list[Waiter]:
        woken = self._woken
        if woken:
            self._woken = []
        return woken

    def duration_of(self, product: ProductTerms) -> int:
        return product.lease_duration or self.default_duration

    def _pool_terms(self, p: ProductTerms) -> PoolProduct:
        return PoolProduct(
            code=p.code,
            seats=None if p.unlimited else p.seats,
            duration=float(self.duration_of(p)),
            strategy=p.strategy,
            user_locked=p.user_locked,
        )

    def _collect(self) -> None:
        """Audit and log what the ledger did on the side (expiries, served waiters)."""
        ledger = self.ledger
        for lease in ledger.take_expired():
            self.outcomes.lease_event("expired", lease, lease.expires_at)
        for waiter in ledger.take_woken():
            if waiter.lease is not None:
                self.outcomes.granted_after_wait(waiter.lease)
            self._woken.append(waiter)

    # --- requests -----------------------------------------------------------

    def handle(
        self, req: Request, now: float, peer: str | None, authenticated: bool = False
    ) -> Answer | Waiter:
        """Answer one request.  Refusals come back as error responses, not raised.
        ``authenticated``: the shell has checked this acquire's license user and
        password (off the event loop; see :meth:`needs_password_check`)."""
        try:
            if isinstance(req, Acquire):
                return self._acquire(req, now, peer, authenticated)
            if isinstance(req, Renew):
                return self._renew(req, now, peer)
            if isinstance(req, Release):
                return self._release(req, now, peer)
            if isinstance(req, Borrow):
                return self._borrow(req, now, peer)
            if isinstance(req, Info):
                return self._info(req, now)
            if isinstance(req, Ping):
                return answer(req.id, time=now)
            return self.hello_response(req, now)
        except FloatdError as exc:
            rule = exc.details.get("rule") if isinstance(exc, PolicyDenied) else None
            self.outcomes.refused(req, exc.code, now, peer, self._product_info, rule)
            return refusal(req.id, exc)
        finally:
            self._collect()

    def hello_response(self, req: Hello, now: float) -> Answer:
        return answer(
            req.id,
            version=PROTOCOL_VERSION,
            server=f"floatd/{__version__}",
            time=now,
            server_id=self.server_id,
        )

    def _check_writable(self) -> None:
        if not self.writable:
            raise Unavailable(
                "the server cannot write its state right now; nothing was changed, try again"
            )

    def _check_server(self, now: float) -> Entitlement:
        """The server-wide refusals of acquire and renew."""
        ent = self.entitlement
        check_license(ent, now)
        if self.clock_guard.tampered(now):
            raise ServerTimeModified(
                "the server's clock is behind the time it has already seen; "
                "leasing resumes once it is right again"
            )
        assert ent is not None
        return ent

    def set_limits(
        self,
        acquires_per_second: float,
        burst: float,
        auth_failures_per_minute: float,
        waiters: int,
        leases_per_seat: int = 1024,
        lease_misses_per_minute: float = 1200.0,
    ) -> None:
        self.acquire_limit.rate, self.acquire_limit.burst = acquires_per_second, burst
        self.auth_limit.rate = auth_failures_per_minute / 60
        self.auth_limit.burst = max(1.0, auth_failures_per_minute)
        self.ledger.max_waiters = waiters
        self.ledger.max_leases_per_seat = leases_per_seat
        self.miss_limit.rate = lease_misses_per_minute / 60
        self.miss_limit.burst = max(1.0, lease_misses_per_minute)

    def needs_password_check(self, req: Acquire, now: float, peer: str | None) -> bool:
        """Whether this acquire is for a user-authorized product and worth an
        (expensive) password check: not when the address is rate-limited."""
        ent = self.entitlement
        terms = ent.product(req.product) if ent is not None else None
        return (
            terms is not None
            and terms.authorization == "user"
            and req.user is not None
            and req.password is not None
            and not self.auth_limit.blocked(limit_key(peer), now)
        )

    def _acquire(
        self, req: Acquire, now: float, peer: str | None, authenticated: bool = False
    ) -> Answer | Waiter:
        self._check_writable()
        ent = self._check_server(now)
        source = limit_key(peer)
        if not self.acquire_limit.allow(source, now):
            raise RateLimited("too many acquires from this address; slow down")
        terms = ent.product(req.product)
        if terms is None:
            raise UnknownProduct(f"unknown product {req.product!r}")
        check_product(terms, now)
        if terms.allowed_ips:
            ip = peer_ip(peer)
            if ip is None or not any(ip in net for net in terms.allowed_ips):
                raise IpNotAllowed(f"address {peer} may not lease {req.product!r}")
        if terms.authorization == "user":
            if self.auth_limit.blocked(source, now):
                raise RateLimited("too many failed logins from this address; wait a minute")
            if not authenticated:
                self.auth_limit.allow(source, now)
                # One answer for an unknown user and a wrong password alike.
                raise AuthFailed("unknown user or wrong password")
        lease_id, token = new_lease_secrets()
        claim = Claim(  # positional, in the fields' order: every acquire builds one
            req.product,
            req.fingerprint,
            lease_id,
            hash_token(token),
            req.instance,
            req.user,
            req.hostname,
            req.meta,
            peer,
        )
        result = self.ledger.claim(now, claim, now + req.wait if req.wait > 0 else None)
        if isinstance(result, Waiter):
            self._queued[result] = (req.id, token)
            return result
        self.outcomes.lease_event("granted", result, now)
        return self.grant_response(req.id, result, token, now)

    def grant_response(self, rid: int, lease: Lease, token: str, now: float) -> Answer:
        expires_in = lease.expires_at - now
        if expires_in < 0.0:
            expires_in = 0.0
        product = self._product_info.get(lease.product) or {"code": lease.product}
        wire = {
            "id": rid,
            "ok": True,
            "lease": lease.id,
            "token": token,
            "expires_in": expires_in,
            "renew_in": expires_in / 2,
            "lease_duration": int(lease.duration),
            "product": product,
        }
        return Answer(wire, None, lease.id)  # granted: positional, on every grant

    def waiter_response(self, waiter: Waiter, now: float) -> Answer:
        """The answer to a queued acquire once the pool has finished with it."""
        rid, token = self._queued.pop(waiter)
        if waiter.lease is not None:
            return self.grant_response(rid, waiter.lease, token, now)
        product = waiter.claim.product
        terms = self.ledger.terms(product)
        if terms is None:
            err: FloatdError = UnknownProduct(f"unknown product {product!r}")
        else:
            err = NoFreeSeats(
                f"no seat of {product!r} came free in time",
                seats=terms.seats,
                used=self.ledger.used(product),
            )
        self.outcomes.wait_refused(waiter.claim, err.code, now)
        return refusal(rid, err)

    def cancel_wait(self, waiter: Waiter, now: float) -> None:
        """The queued client went away: give up its place, or its seat if it got one."""
        self._queued.pop(waiter, None)
        if not self.writable:
            return  # already abandoned; the pool is rebuilt from disk
        if waiter.lease is not None and self.ledger.lease(waiter.lease.id) is waiter.lease:
            with suppress(LeaseNotFound):  # it ran out on the way (a very short lease)
                self.revoke(waiter.lease.id, now)  # audited and logged as a revoke
        else:
            self.ledger.withdraw(waiter, now)

    def _missed(self, peer: str | None, now: float) -> None:
        """A renew or release named no lease: past a handful a second from one
        address, that is a flood or a broken client, and it is slowed down."""
        if not self.miss_limit.allow(limit_key(peer), now):
            raise RateLimited("too many renewals or releases of unknown leases; slow down")

    def _renew(self, req: Renew, now: float, peer: str | None) -> Answer:
        self._check_writable()
        ent = self._check_server(now)
        # The token first: a refusal about the product would tell a stranger
        # that the lease exists.
        check = _still_licensed(ent, now) if ent.dated else None
        try:
            lease = self.ledger.renew(now, req.lease, hash_token(req.token), check)
        except LeaseNotFound:
            self._missed(peer, now)
            raise
        if not lease.borrowed:  # a borrowed lease only hears its time left
            self.outcomes.lease_event("renewed", lease, now)
        expires_in = lease.expires_at - now
        # The map written out: the hottest answer of all skips ok()'s keywords.
        return Answer(
            {"id": req.id, "ok": True, "expires_in": expires_in, "renew_in": expires_in / 2}
        )

    def _release(self, req: Release, now: float, peer: str | None) -> Answer:
        self._check_writable()
        try:
            lease = self.ledger.release(now, req.lease, hash_token(req.token))
        except LeaseNotFound:
            self._missed(peer, now)
            raise
        self.outcomes.lease_event("returned" if lease.borrowed else "released", lease, now)
        return answer(req.id)

    def _borrow(self, req: Borrow, now: float, peer: str | None) -> Answer:
        """A held lease made a borrowed one, and its certificate (floatd.core.borrow)."""
        self._check_writable()
        ent = self._check_server(now)
        key = self.server_key
        rules = borrow_rules(ent, key, self.policy, self.ledger.borrowed, req.duration, now)
        ends: list[float] = []

        def decide(lease: Lease) -> float:
            ends.append(rules(lease))
            return ends[-1]

        try:
            lease = self.ledger.borrow(now, req.lease, hash_token(req.token), decide)
        except LeaseNotFound:
            self._missed(peer, now)
            raise
        assert key is not None  # borrow_rules refused otherwise
        # This certificate's end; the seat may be held longer, for an earlier one.
        end = ends[-1]
        payload = borrow_payload(
            ent,
            lease.product,
            lease.id,
            lease.fingerprint,
            lease.instance,
            lease.user,
            int(now),
            int(end),
        )
        self.outcomes.lease_event("borrowed", lease, now)
        return answer(
            req.id,
            certificate=sign_borrow(key, payload, ent.text),
            expires_at=end,
            expires_in=end - now,
        )

    def revoke(self, lease_id: str, now: float) -> Lease:
        self._check_writable()
        held = self.ledger.lease(lease_id)
        if held is not None and held.borrowed:
            raise AdminError(
                f"lease {lease_id} is borrowed until {_iso(held.expires_at)}: its"
                " certificate stays valid offline, so its seat cannot be given to anyone"
                " before then (it comes back by itself, or when the borrower returns it)"
            )
        lease = self.ledger.revoke(now, lease_id)
        self.outcomes.lease_event("revoked", lease, now)
        self._collect()
        return lease

    def _info(self, req: Info, now: float, used: int | None = None) -> Answer:
        ent = self.entitlement
        check_license(ent, now)
        assert ent is not None
        terms = ent.product(req.product)
        if terms is None:
            raise UnknownProduct(f"unknown product {req.product!r}")
        return answer(req.id, **self.product_summary(terms, used))

    def info_from(self, req: Info, now: float, overview: list[dict[str, Any]]) -> Answer:
        """An info answer from a view of the seats (a cluster node's last look,
        so that info needs no database: cluster.md), decided nothing, recorded
        nothing."""
        used = next((p["used"] for p in overview if p["code"] == req.product), 0)
        try:
            return self._info(req, now, used)
        except FloatdError as exc:
            return refusal(req.id, exc)

    def activation_state(self, now: float) -> str:
        """The ``activation.state`` of the status endpoint."""
        try:
            self._check_server(now)
        except LicenseRefusal as exc:
            return _STATE_OF.get(exc.code, exc.code.lower())
        return "active"

    def products_overview(self) -> list[dict[str, Any]]:
        """Per product: seats, use and queue, for status, metrics and the CLI."""
        ent = self.entitlement
        out = []
        for terms in ent.products if ent is not None else ():
            used = self.ledger.used(terms.code)
            out.append(
                {
                    "code": terms.code,
                    "name": terms.name,
                    "seats": terms.seats,
                    "used": used,
                    "free": None if terms.unlimited else max(0, terms.seats - used),
                    "waiting": self.ledger.waiting(terms.code),
                    "reserved": self.ledger.reservations(terms.code),
                    "borrowed": self.ledger.borrowed(terms.code),
                    "strategy": terms.strategy,
                    "lease_duration": self.duration_of(terms),
                    "not_after": _earliest(ent.not_after if ent else None, terms.not_after),
                    "trial": terms.trial,
                }
            )
        return out

    def product_summary(self, terms: ProductTerms, used: int | None = None) -> dict[str, Any]:
        ent = self.entitlement
        if used is None:
            used = self.ledger.used(terms.code)
        return {
            "code": terms.code,
            "name": terms.name,
            "seats": terms.seats,
            "used": used,
            "free": None if terms.unlimited else max(0, terms.seats - used),
            "strategy": terms.strategy,
            "lease_duration": self.duration_of(terms),
            "user_locked": terms.user_locked,
            "authorization": terms.authorization,
            "not_after": _earliest(ent.not_after if ent else None, terms.not_after),
            "metadata": dict(terms.metadata),
            "features": dict(terms.features),
        }


_STATE_OF = {
    "NOT_ACTIVATED": "not_activated",
    "LICENSE_NOT_YET_VALID": "not_yet_valid",
    "LICENSE_EXPIRED": "expired",
    "GRACE_PERIOD_OVER": "grace_period_over",
    "SERVER_TIME_MODIFIED": "time_modified",
}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _earliest(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    return a if b is None else min(a, b)


def _still_licensed(ent: Entitlement, now: float) -> RenewCheck:
    """A renewal's check, once its lease is known, that the lease's product is
    within its own validity window."""

    def check(lease: Lease) -> None:
        terms = ent.product(lease.product)
        if terms is not None:
            check_product(terms, now)

    return check
