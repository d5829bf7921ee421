"""The seat pool: who holds which seat, until when, and who waits for one.

Plain synchronous code with no clock reads: every call takes ``now`` (unix
seconds) so tests drive time explicitly and the trio shell decides where time
comes from.  Leases expire through a heap keyed on expiry time with one entry
per live lease; a renew only moves ``expires_at`` and the stale heap entry is
re-pushed when it surfaces, so renew is O(1) and expiry O(log n) per lease,
never a scan.

Calls that can free a seat also serve the first-come-first-served wait queue;
the waiters they satisfy or time out are collected for the caller to drain with
:meth:`SeatPool.take_woken`, the way h11 hands out events.
"""

from __future__ import annotations

import heapq
import hmac
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from floatd.core.policy import NO_CHARGE, Book, Charge, Policy, Requester
from floatd.core.seats import Claim, Lease, PoolProduct, SeatKey, Waiter, seat_key
from floatd.errors import (
    BadRequest,
    LeaseNotFound,
    NoFreeSeats,
    PolicyDenied,
    RateLimited,
    UnknownProduct,
)


@dataclass(slots=True)
class _ProductState:
    terms: PoolProduct | None
    #: Taken seats and how many leases each holds (a per-machine seat is shared).
    #: A count, not the holders' ids: one small int per seat rather than a set,
    #: which was a fifth of a lease's memory.
    seats: dict[SeatKey, int] = field(default_factory=dict)
    queue: deque[Waiter] = field(default_factory=deque)
    waiting: int = 0  # live waiters in ``queue``
    #: The site policy's rules for this product and what its seats are charged
    #: to (floatd.core.policy); None: no rule applies, the fast path.
    book: Book | None = None
    charges: dict[SeatKey, Charge] = field(default_factory=dict)
    #: Seats held by borrowed leases, and by how many of them.
    borrowed: dict[SeatKey, int] = field(default_factory=dict)

    def has_free_seat(self) -> bool:
        assert self.terms is not None
        cap = self.terms.seats
        return cap is None or len(self.seats) < cap

    def free(self) -> int | None:
        """Free seats (None: unlimited); negative above a lowered cap."""
        assert self.terms is not None
        cap = self.terms.seats
        return None if cap is None else cap - len(self.seats)


def requester(claim: Claim) -> Requester:
    return Requester.of(claim.user, claim.hostname, claim.fingerprint, claim.peer)


class SeatPool:
    def __init__(self) -> None:
        self._products: dict[str, _ProductState] = {}
        self._leases: dict[str, Lease] = {}
        self._expiry: list[tuple[float, str]] = []
        self._waits: list[tuple[float, int, Waiter]] = []
        self._wait_seq = 0
        self._woken: list[Waiter] = []
        self._expired: list[Lease] = []
        #: Waiters allowed per product; more get NO_FREE_SEATS at once.
        self.max_waiters = 1000
        #: Leases one seat may hold (a per-machine seat is shared by every
        #: process of the machine); more get RATE_LIMITED, so a client that
        #: leaks leases cannot grow the state without bound.
        self.max_leases_per_seat = 1024
        self._policy: Policy | None = None

    # --- configuration -----------------------------------------------------

    def set_products(self, products: Iterable[PoolProduct], now: float) -> None:
        """Install new terms.  Leases are never dropped here: above a lowered
        cap they drain as their holders release or stop renewing."""
        new = {p.code: p for p in products}
        for code, state in self._products.items():
            state.terms = new.get(code)
        for code, terms in new.items():
            if code not in self._products:
                self._products[code] = state = _ProductState(terms)
                self._use_rules(code, state)
            self._products[code].terms = terms
        self.advance(now)
        for state in self._products.values():
            if state.terms is None:
                for waiter in state.queue:
                    self._finish(waiter, None)
                state.queue.clear()
                state.waiting = 0
            else:
                self._serve_queue(state, now)

    def restore(self, leases: Iterable[Lease], now: float) -> list[Lease]:
        """Load persisted leases; returns those that expired while we were down."""
        dead = []
        for lease in leases:
            if lease.expires_at <= now:
                dead.append(lease)
                continue
            state = self._products.get(lease.product)
            if state is None:
                self._products[lease.product] = state = _ProductState(None)
                self._use_rules(lease.product, state)
            holders = state.seats.get(lease.seat)
            state.seats[lease.seat] = (holders or 0) + 1
            if lease.borrowed:
                state.borrowed[lease.seat] = state.borrowed.get(lease.seat, 0) + 1
            if holders is None and state.book is not None:
                self._recharge(state, lease)
            self._leases[lease.id] = lease
            heapq.heappush(self._expiry, (lease.expires_at, lease.id))
        return dead

    # --- the site policy ---------------------------------------------------

    def set_policy(self, policy: Policy | None, now: float) -> None:
        """Use ``policy`` (None: none) from now on.  No lease ends: the seats
        held are charged again under the new rules, in the order their leases
        were granted, even where that is over a new cap.  O(leases), for a
        rare admin action; then the queues are served under the new rules."""
        self._policy = policy
        for code, state in self._products.items():
            state.charges.clear()
            self._use_rules(code, state)
        for lease in sorted(self._leases.values(), key=lambda le: le.granted_at):
            state = self._products[lease.product]
            if state.book is not None and lease.seat not in state.charges:
                self._recharge(state, lease)
        for state in self._products.values():
            if state.terms is not None:
                self._serve_queue(state, now)

    def reservations(self, product: str) -> list[dict[str, object]]:
        """The product's reserves: seats, held out of them, free, for whom."""
        state = self._products.get(product)
        return [] if state is None or state.book is None else state.book.reservations()

    def explain(self, now: float, claim: Claim) -> dict[str, object]:
        """What an acquire of ``claim`` would get now, and which rule decided;
        nothing changes.  For the admin (``floatd policy explain``), so it may
        name rules; never for the wire."""
        self.advance(now)
        state = self._products.get(claim.product)
        if state is None or state.terms is None:
            return {"result": "UNKNOWN_PRODUCT"}
        out: dict[str, object] = {"seats": state.terms.seats, "used": len(state.seats)}
        who = requester(claim)
        try:
            key = seat_key(state.terms, claim.fingerprint, claim.instance, claim.user)
            if state.book is not None:
                state.book.rules.admit(who, claim.product)
            if key in state.seats:
                return {**out, "result": "granted", "why": "re-acquire onto a seat it holds"}
            if state.book is not None:
                charge = state.book.decide(who, state.free(), claim.product)
                if charge.reserve >= 0:
                    number = state.book.rules.reserves[charge.reserve].number
                    return {**out, "result": "granted", "why": "reserved seat", "rule": number}
            elif not state.has_free_seat() or state.waiting:
                raise NoFreeSeats("every seat is in use")
        except (PolicyDenied, NoFreeSeats, BadRequest) as refusal:
            if isinstance(refusal, NoFreeSeats) and refusal.details.get("reserved"):
                assert state.book is not None
                out["reserve_rules"] = state.book.keeping(who)
            return {**out, "result": refusal.code, "why": refusal.message, **refusal.details}
        return {**out, "result": "granted", "why": "a free seat"}

    def _use_rules(self, code: str, state: _ProductState) -> None:
        rules = None if self._policy is None else self._policy.for_product(code)
        state.book = None if rules is None else Book(rules)

    def _recharge(self, state: _ProductState, lease: Lease) -> None:
        assert state.book is not None
        who = Requester.of(lease.user, lease.hostname, lease.fingerprint, lease.peer)
        charge = state.book.recharge(who)
        if charge is not NO_CHARGE:
            state.charges[lease.seat] = charge

    # --- queries -----------------------------------------------------------

    def terms(self, product: str) -> PoolProduct | None:
        state = self._products.get(product)
        return state.terms if state else None

    def used(self, product: str) -> int:
        state = self._products.get(product)
        return len(state.seats) if state else 0

    def waiting(self, product: str) -> int:
        state = self._products.get(product)
        return state.waiting if state else 0

    def lease(self, lease_id: str) -> Lease | None:
        return self._leases.get(lease_id)

    def leases(self) -> Iterable[Lease]:
        return self._leases.values()

    def __len__(self) -> int:
        return len(self._leases)

    def next_deadline(self) -> float | None:
        """When :meth:`advance` next has work; may be early, never late."""
        if self._expiry:
            first = self._expiry[0][0]
            return min(first, self._waits[0][0]) if self._waits else first
        return self._waits[0][0] if self._waits else None

    # --- requests ----------------------------------------------------------

    def acquire(self, now: float, claim: Claim, wait_until: float | None = None) -> Lease | Waiter:
        """Grant a lease, or queue the claim until ``wait_until``, or refuse."""
        self.advance(now)
        state = self._products.get(claim.product)
        if state is None or state.terms is None:
            raise UnknownProduct(f"unknown product {claim.product!r}")
        key = seat_key(state.terms, claim.fingerprint, claim.instance, claim.user)
        holders = state.seats.get(key)
        if holders is not None and holders >= self.max_leases_per_seat:
            raise RateLimited(
                f"this seat already holds {holders} leases; release some before taking more"
            )
        book = state.book
        if book is not None:
            return self._acquire_by_policy(state, book, key, claim, now, wait_until)
        if holders is not None or (state.has_free_seat() and not state.waiting):
            return self._grant(state, key, claim, now)
        return self._wait_or_refuse(state, claim, now, wait_until)

    def _acquire_by_policy(
        self,
        state: _ProductState,
        book: Book,
        key: SeatKey,
        claim: Claim,
        now: float,
        wait_until: float | None,
    ) -> Lease | Waiter:
        """The policy's steps (policy.md): exclude and include for everyone; a
        re-acquire onto a seat held passes max and reserve.  Waiters are not
        jumped: any still queued cannot take a seat now (the queue is served
        whenever one comes free), so a seat this claim may take is one they
        may not (a reserved one)."""
        who = requester(claim)
        book.rules.admit(who, claim.product)
        if key in state.seats:
            return self._grant(state, key, claim, now)
        try:
            charge = book.decide(who, state.free(), claim.product)
        except NoFreeSeats as refusal:
            return self._wait_or_refuse(state, claim, now, wait_until, refusal)
        return self._grant(state, key, claim, now, charge)

    def _wait_or_refuse(
        self,
        state: _ProductState,
        claim: Claim,
        now: float,
        wait_until: float | None,
        refusal: NoFreeSeats | None = None,
    ) -> Waiter:
        assert state.terms is not None
        if wait_until is not None and wait_until > now and state.waiting < self.max_waiters:
            return self.requeue(Waiter(claim, wait_until))
        if refusal is None:
            refusal = NoFreeSeats(f"all {state.terms.seats} seats of {claim.product!r} are in use")
        refusal.details.update(seats=state.terms.seats, used=len(state.seats))
        raise refusal

    def requeue(self, waiter: Waiter) -> Waiter:
        """Queue ``waiter`` behind those already waiting, deciding nothing: for
        a ledger that rebuilds a queue from its database in queue order."""
        state = self._products[waiter.claim.product]
        state.queue.append(waiter)
        state.waiting += 1
        self._wait_seq += 1
        heapq.heappush(self._waits, (waiter.deadline, self._wait_seq, waiter))
        return waiter

    def authorize(self, now: float, lease_id: str, token_hash: bytes) -> Lease:
        """The live lease that ``token_hash`` opens, else LeaseNotFound."""
        self.advance(now)
        lease = self._leases.get(lease_id)
        if lease is None or not hmac.compare_digest(lease.token_hash, token_hash):
            # One answer for unknown, expired, released and wrong token alike.
            raise LeaseNotFound("no such lease")
        return lease

    def extend(self, now: float, lease: Lease) -> Lease:
        """Renew an authorized lease: a full (current) duration from now."""
        state = self._products.get(lease.product)
        if state is not None and state.terms is not None:
            lease.duration = state.terms.duration
        lease.expires_at = now + lease.duration
        return lease

    def renew(self, now: float, lease_id: str, token_hash: bytes) -> Lease:
        return self.extend(now, self.authorize(now, lease_id, token_hash))

    def release(self, now: float, lease_id: str, token_hash: bytes) -> Lease:
        lease = self.authorize(now, lease_id, token_hash)
        self._drop(lease, now)
        return lease

    def revoke(self, now: float, lease_id: str) -> Lease:
        """End a lease without its token: the admin's tool for a stuck seat."""
        self.advance(now)
        lease = self._leases.get(lease_id)
        if lease is None:
            raise LeaseNotFound(f"no lease {lease_id!r}")
        self._drop(lease, now)
        return lease

    def borrow(self, now: float, lease: Lease, until: float) -> Lease:
        """Make an authorized lease a borrowed one, ending at ``until``.  Borrowed
        again for less, it keeps its later end: the earlier certificate stays
        valid offline until then, and so must the seat it stands for."""
        state = self._products[lease.product]
        if lease.borrowed:
            until = max(until, lease.expires_at)
        else:
            lease.borrowed = True
            state.borrowed[lease.seat] = state.borrowed.get(lease.seat, 0) + 1
        lease.expires_at = until
        heapq.heappush(self._expiry, (until, lease.id))
        return lease

    def borrowed(self, product: str) -> int:
        """Seats of ``product`` held by a borrowed lease."""
        state = self._products.get(product)
        return len(state.borrowed) if state else 0

    def cancel_wait(self, waiter: Waiter) -> None:
        """The waiting client went away; its place in the queue is given up."""
        if not waiter.done:
            waiter.done = True
            state = self._products.get(waiter.claim.product)
            if state is not None:
                state.waiting -= 1
                self._compact(state)

    def shift(self, delta: float) -> list[Lease]:
        """Move every lease's expiry and every waiter's deadline by ``delta``
        seconds: the wall clock was stepped, and what was promised is time left,
        not a date.  A borrowed lease keeps its date, which its certificate
        carries.  O(n), for a rare event; returns the leases moved."""
        leases = list(self._leases.values())
        for lease in leases:
            if not lease.borrowed:
                lease.expires_at += delta
        self._expiry = [(lease.expires_at, lease.id) for lease in leases]
        heapq.heapify(self._expiry)
        leases = [lease for lease in leases if not lease.borrowed]
        waits = []
        for _, seq, waiter in self._waits:
            waiter.deadline += delta
            waits.append((waiter.deadline, seq, waiter))
        heapq.heapify(waits)
        self._waits = waits
        return leases

    def drop_waiters(self) -> list[Waiter]:
        """Empty every wait queue; returns the waiters that were still waiting
        (marked done, with no lease, and not reported by :meth:`take_woken`)."""
        out = []
        for state in self._products.values():
            for waiter in state.queue:
                if not waiter.done:
                    waiter.done = True
                    out.append(waiter)
            state.queue.clear()
            state.waiting = 0
        self._waits.clear()
        return out

    # --- time --------------------------------------------------------------

    def advance(self, now: float) -> None:
        """Expire leases and time out waiters that are due, in time order, so a
        seat freed before a waiter's deadline still reaches that waiter."""
        expiry, waits = self._expiry, self._waits
        if (not expiry or expiry[0][0] > now) and (not waits or waits[0][0] > now):
            return  # nothing due: what nearly every request finds
        while True:
            # No local aliases: _drop may rebuild the expiry heap.
            next_lease = self._expiry[0][0] if self._expiry else None
            next_wait = self._waits[0][0] if self._waits else None
            if (
                next_lease is not None
                and next_lease <= now
                and (next_wait is None or next_lease <= next_wait)
            ):
                at, lease_id = heapq.heappop(self._expiry)
                lease = self._leases.get(lease_id)
                if lease is None:
                    continue  # released earlier; its heap entry was left behind
                if lease.expires_at > at:
                    heapq.heappush(self._expiry, (lease.expires_at, lease_id))  # renewed
                    continue
                self._expired.append(lease)
                # A waiter served here gets a lease timed from now, when it hears of it.
                self._drop(lease, now)
            elif next_wait is not None and next_wait <= now:
                _, _, waiter = heapq.heappop(self._waits)
                if not waiter.done:
                    state = self._products[waiter.claim.product]
                    state.waiting -= 1
                    self._finish(waiter, None)
                    self._compact(state)
            else:
                return

    def has_side_effects(self) -> bool:
        """Whether expiries or served waiters wait to be taken."""
        return bool(self._woken or self._expired)

    def take_woken(self) -> list[Waiter]:
        woken, self._woken = self._woken, []
        return woken

    def take_expired(self) -> list[Lease]:
        expired, self._expired = self._expired, []
        return expired

    # --- internals ---------------------------------------------------------

    def _grant(
        self,
        state: _ProductState,
        key: SeatKey,
        claim: Claim,
        now: float,
        charge: Charge = NO_CHARGE,
    ) -> Lease:
        assert state.terms is not None
        duration = state.terms.duration
        lease = Lease(  # positional: every grant builds one
            claim.lease_id,
            claim.token_hash,
            claim.product,
            key,
            claim.fingerprint,
            claim.instance,
            claim.user,
            claim.hostname,
            claim.meta,
            claim.peer,
            now,
            now + duration,
            duration,
        )
        # One lookup both refuses a duplicate id and files the lease: in a
        # large pool each lookup is a cache miss.
        if self._leases.setdefault(lease.id, lease) is not lease:
            raise ValueError(f"duplicate lease id {claim.lease_id!r}")
        state.seats[key] = state.seats.get(key, 0) + 1
        if charge is not NO_CHARGE:
            assert state.book is not None
            state.book.charge(charge)
            state.charges[key] = charge
        heapq.heappush(self._expiry, (lease.expires_at, lease.id))
        return lease

    def reschedule(self, lease: Lease) -> None:
        """``lease.expires_at`` was set from outside (another node renewed it)."""
        heapq.heappush(self._expiry, (lease.expires_at, lease.id))

    def forget(self, lease_id: str) -> None:
        """Take a lease out that another node has already ended (its queue was
        served there, in the same decision): nobody is served here."""
        lease = self._leases.get(lease_id)
        if lease is not None:
            self._drop(lease, 0.0, serve=False)

    def _drop(self, lease: Lease, now: float, serve: bool = True) -> None:
        del self._leases[lease.id]
        state = self._products[lease.product]
        if lease.borrowed:
            left = state.borrowed[lease.seat] - 1
            if left:
                state.borrowed[lease.seat] = left
            else:
                del state.borrowed[lease.seat]
        holders = state.seats[lease.seat] - 1
        if holders:
            state.seats[lease.seat] = holders
        else:
            del state.seats[lease.seat]
            if state.charges:
                charge = state.charges.pop(lease.seat, None)
                if charge is not None and state.book is not None:
                    state.book.uncharge(charge)
            if state.terms is not None and serve:
                self._serve_queue(state, now)
        if len(self._expiry) > 64 and len(self._expiry) > 2 * len(self._leases):
            # Released leases leave heap entries behind; rebuild before they dominate.
            self._expiry = [(le.expires_at, le.id) for le in self._leases.values()]
            heapq.heapify(self._expiry)

    def _serve_queue(self, state: _ProductState, now: float) -> None:
        assert state.terms is not None
        if state.book is not None:
            self._serve_queue_by_policy(state, state.book, now)
            return
        queue = state.queue
        while queue:
            waiter = queue[0]
            if waiter.done:
                queue.popleft()
                continue
            claim = waiter.claim
            key = seat_key(state.terms, claim.fingerprint, claim.instance, claim.user)
            if key not in state.seats and not state.has_free_seat():
                return
            queue.popleft()
            state.waiting -= 1
            self._finish(waiter, self._grant(state, key, claim, now))

    def _serve_queue_by_policy(self, state: _ProductState, book: Book, now: float) -> None:
        """Every waiter the policy now lets take a seat, in queue order: one
        kept out of the reserved seats does not hold up a member behind it.
        O(waiters), which max_waiters bounds."""
        assert state.terms is not None
        served = False
        for waiter in state.queue:
            if waiter.done:
                continue
            claim = waiter.claim
            key = seat_key(state.terms, claim.fingerprint, claim.instance, claim.user)
            charge = NO_CHARGE
            if key not in state.seats:
                free = state.free()
                if free is not None and free < 1:
                    continue  # only a waiter sharing a held seat can be served
                try:
                    charge = book.decide(requester(claim), free, claim.product)
                except (NoFreeSeats, PolicyDenied):
                    continue  # it waits on, until a seat it may take or its deadline
            state.waiting -= 1
            served = True
            self._finish(waiter, self._grant(state, key, claim, now, charge))
        if served:
            state.queue = deque(w for w in state.queue if not w.done)

    def _finish(self, waiter: Waiter, lease: Lease | None) -> None:
        waiter.done = True
        waiter.lease = lease
        self._woken.append(waiter)

    def _compact(self, state: _ProductState) -> None:
        dead = len(state.queue) - state.waiting
        if dead > 64 and dead > state.waiting:
            state.queue = deque(w for w in state.queue if not w.done)

    # --- for tests ---------------------------------------------------------

    def check_invariants(self) -> None:
        """Assert the pool's internal consistency (used by the property tests)."""
        from floatd.core.pool_checks import check_pool  # only tests need it

        check_pool(self)
