"""The ledger: the one interface that decides who holds a seat.

Everything that changes a seat goes through a :class:`Ledger`: a claim (granted,
queued, or refused because the product is full), a renewal (a new expiry, or
the lease is not found), a release, a revoke, the expiry of what is due and the
grant to a waiter when a seat comes free.  The service (:mod:`floatd.core.service`)
checks the entitlement, the limits and the caller, and then asks the ledger;
it never touches seats itself.  So a second implementation (several nodes
deciding in one PostgreSQL transaction) replaces one object, not the service.

A decision is what the call returns (or the error it raises, which carries its
wire code).  What must be made durable before anyone hears of it is appended to
:attr:`Ledger.journal`, in the order decided; the service adds its audit
records to the same journal, and the shell commits each call's journal as one
batch (:mod:`floatd.daemon.committer`), so a commit never holds half a decision.

:class:`LocalLedger` is the single-server ledger: the in-memory
:class:`~floatd.core.pool.SeatPool` is the working copy, and the journal is how
the SQLite store behind it follows.  Decisions cost what the pool costs (a
dict lookup and a heap push), which is why the journal is a plain list and not
a callback per change.  ``tests/ledger_contract.py`` holds the behaviour every
ledger must show; each implementation runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import suppress
from typing import Protocol

from floatd.core.changes import Change, DeleteLease, PutLease, SetExpiry
from floatd.core.policy import Policy
from floatd.core.pool import SeatPool
from floatd.core.seats import Claim, Lease, PoolProduct, Waiter
from floatd.errors import LeaseNotFound

#: A check of a lease about to be renewed (say, its product is past its end):
#: raises the refusal, or returns.
RenewCheck = Callable[[Lease], None]
#: Decides a borrow of an authorized lease: raises the refusal, or returns
#: when the borrow ends (unix seconds).
BorrowCheck = Callable[[Lease], float]
_tuple_new = tuple.__new__


class Ledger(Protocol):
    """Seats: who holds which, until when, who waits.  Every call takes ``now``."""

    #: What the calls so far decided that is not yet durable, oldest first.
    journal: list[Change]
    #: Waiters allowed per product; more are refused NO_FREE_SEATS at once.
    max_waiters: int
    #: Leases one seat may hold; more are refused RATE_LIMITED.
    max_leases_per_seat: int

    # --- decisions ---------------------------------------------------------

    def claim(self, now: float, claim: Claim, wait_until: float | None = None) -> Lease | Waiter:
        """A lease, or a place in the product's queue until ``wait_until``;
        NoFreeSeats, UnknownProduct, BadRequest or RateLimited otherwise."""
        ...

    def renew(
        self, now: float, lease_id: str, token_hash: bytes, check: RenewCheck | None = None
    ) -> Lease:
        """The lease, running a full duration from ``now``; LeaseNotFound for an
        unknown, expired or released lease and a wrong token alike.  ``check``
        runs once the lease is known and before it is extended."""
        ...

    def release(self, now: float, lease_id: str, token_hash: bytes) -> Lease:
        """The lease, ended; its seat goes to the first waiter.  LeaseNotFound as renew."""
        ...

    def borrow(self, now: float, lease_id: str, token_hash: bytes, check: BorrowCheck) -> Lease:
        """The lease, borrowed until what ``check`` returns (and durable before
        anyone hears of it); LeaseNotFound as renew, or what ``check`` raises,
        with nothing changed.  A borrowed lease is not extended by ``renew``."""
        ...

    def borrowed(self, product: str) -> int:
        """Seats of ``product`` held by borrowed leases."""
        ...

    def revoke(self, now: float, lease_id: str) -> Lease:
        """End a lease without its token (the admin's tool); LeaseNotFound."""
        ...

    def withdraw(self, waiter: Waiter, now: float) -> None:
        """A queued client went away: its place, or the seat it was given, goes back."""
        ...

    def expire(self, now: float) -> None:
        """Expire the leases and time out the waiters that are due, in time order."""
        ...

    def set_products(self, products: Iterable[PoolProduct], now: float) -> None:
        """New terms; no lease is dropped (above a lowered cap, seats drain)."""
        ...

    def set_policy(self, policy: Policy | None, now: float) -> None:
        """The site's rules from now on (floatd.core.policy), decided with every
        claim; no lease is dropped, and waiters the new rules admit are served."""
        ...

    # --- what happened on the side ----------------------------------------

    def take_expired(self) -> list[Lease]:
        """Leases that expired since the last call, oldest first."""
        ...

    def take_woken(self) -> list[Waiter]:
        """Waiters served (``lease`` set) or timed out (``lease`` None)."""
        ...

    def take_changes(self) -> list[Change]:
        """The journal so far, leaving it empty."""
        ...

    # --- reading -------------------------------------------------------------

    def next_deadline(self) -> float | None: ...

    def terms(self, product: str) -> PoolProduct | None: ...

    def used(self, product: str) -> int: ...

    def waiting(self, product: str) -> int: ...

    def reservations(self, product: str) -> list[dict[str, object]]:
        """The policy's reserves of ``product``: seats, held, free, for whom."""
        ...

    def explain(self, now: float, claim: Claim) -> dict[str, object]:
        """What ``claim`` would get now and why, deciding nothing (for the admin)."""
        ...

    def lease(self, lease_id: str) -> Lease | None: ...

    def leases(self) -> Iterable[Lease]: ...

    def __len__(self) -> int: ...

    # --- the working copy ----------------------------------------------------

    def restore(self, leases: Iterable[Lease], now: float) -> list[Lease]:
        """Take the durable leases in (at start, after a failed write); returns
        the ones that expired meanwhile, already journalled as deleted."""
        ...

    def reset(self) -> None:
        """Forget every lease and waiter (to be restored from the store)."""
        ...

    def shift(self, delta: float) -> list[Lease]:
        """The wall clock stepped by ``delta``: every expiry moves with it."""
        ...

    def clamp(self, now: float, slack: float) -> list[Lease]:
        """No lease runs longer than its duration (plus ``slack``) from now."""
        ...

    def drop_waiters(self) -> list[Waiter]:
        """Empty every queue (the state cannot be written); returns those waiting."""
        ...


class LocalLedger:
    """The single server's ledger: a :class:`SeatPool` in memory, journalled."""

    def __init__(self) -> None:
        self._pool = SeatPool()
        self._policy: Policy | None = None
        self.journal: list[Change] = []
        self._expired: list[Lease] = []
        self._woken: list[Waiter] = []

    @property
    def max_waiters(self) -> int:
        return self._pool.max_waiters

    @max_waiters.setter
    def max_waiters(self, value: int) -> None:
        self._pool.max_waiters = value

    @property
    def max_leases_per_seat(self) -> int:
        return self._pool.max_leases_per_seat

    @max_leases_per_seat.setter
    def max_leases_per_seat(self, value: int) -> None:
        self._pool.max_leases_per_seat = value

    # --- decisions ---------------------------------------------------------

    def claim(self, now: float, claim: Claim, wait_until: float | None = None) -> Lease | Waiter:
        try:
            result = self._pool.acquire(now, claim, wait_until)
        finally:
            self._settle()
        if isinstance(result, Lease):
            self.journal.append(PutLease(result))
        return result

    def renew(
        self, now: float, lease_id: str, token_hash: bytes, check: RenewCheck | None = None
    ) -> Lease:
        lease = self._authorize(now, lease_id, token_hash)
        if lease.borrowed:
            return lease  # it ends at the date its certificate carries
        if check is not None:
            check(lease)
        self._pool.extend(now, lease)
        # tuple.__new__: a NamedTuple's own __new__ is a Python function.
        self.journal.append(_tuple_new(SetExpiry, (lease.id, lease.expires_at)))
        return lease

    def borrow(self, now: float, lease_id: str, token_hash: bytes, check: BorrowCheck) -> Lease:
        lease = self._authorize(now, lease_id, token_hash)
        self._pool.borrow(now, lease, check(lease))
        self.journal.append(PutLease(lease))
        return lease

    def _authorize(self, now: float, lease_id: str, token_hash: bytes) -> Lease:
        """The live lease the token opens; what expired on the way is journalled."""
        pool = self._pool
        try:
            return pool.authorize(now, lease_id, token_hash)
        finally:
            if pool.has_side_effects():
                self._settle()

    def borrowed(self, product: str) -> int:
        return self._pool.borrowed(product)

    def release(self, now: float, lease_id: str, token_hash: bytes) -> Lease:
        try:
            lease = self._pool.release(now, lease_id, token_hash)
            self.journal.append(DeleteLease(lease.id))
        finally:
            self._settle()
        return lease

    def revoke(self, now: float, lease_id: str) -> Lease:
        try:
            lease = self._pool.revoke(now, lease_id)
            self.journal.append(DeleteLease(lease.id))
        finally:
            self._settle()
        return lease

    def requeue(self, waiter: Waiter) -> Waiter:
        """Queue ``waiter`` as it was queued before (a copy of a product
        rebuilt from a database), deciding nothing."""
        return self._pool.requeue(waiter)

    # --- following what another node decided (floatd.store.pg_changes) ---------

    def follow_put(self, lease: Lease) -> None:
        """A lease granted, or changed as a whole (borrowed), elsewhere."""
        self._pool.forget(lease.id)
        self._pool.restore([lease], float("-inf"))

    def follow_delete(self, lease_id: str) -> None:
        self._pool.forget(lease_id)

    def follow_expiry(self, lease_id: str, expires_at: float) -> None:
        lease = self._pool.lease(lease_id)
        if lease is not None:
            lease.expires_at = expires_at
            self._pool.reschedule(lease)

    def follow_unqueue(self, waiter: Waiter) -> None:
        self._pool.cancel_wait(waiter)

    def withdraw(self, waiter: Waiter, now: float) -> None:
        if waiter.lease is None:
            self._pool.cancel_wait(waiter)
        elif self._pool.lease(waiter.lease.id) is waiter.lease:
            with suppress(LeaseNotFound):  # it ran out on the way (a very short lease)
                self.revoke(now, waiter.lease.id)

    def expire(self, now: float) -> None:
        self._pool.advance(now)
        self._settle()

    def set_products(self, products: Iterable[PoolProduct], now: float) -> None:
        self._pool.set_products(products, now)
        self._settle()

    def set_policy(self, policy: Policy | None, now: float) -> None:
        self._policy = policy
        self._pool.set_policy(policy, now)
        self._settle()

    def _settle(self) -> None:
        """Journal what the pool did on the side (expiries, grants to waiters)."""
        pool = self._pool
        if not pool.has_side_effects():
            return
        for lease in pool.take_expired():
            self.journal.append(DeleteLease(lease.id))
            self._expired.append(lease)
        for waiter in pool.take_woken():
            if waiter.lease is not None:
                self.journal.append(PutLease(waiter.lease))
            self._woken.append(waiter)

    # --- what happened on the side ----------------------------------------

    def take_expired(self) -> list[Lease]:
        expired = self._expired
        if expired:
            self._expired = []
        return expired

    def take_woken(self) -> list[Waiter]:
        woken = self._woken
        if woken:
            self._woken = []
        return woken

    def take_changes(self) -> list[Change]:
        changes = self.journal
        if changes:  # most calls change nothing: no new list for them
            self.journal = []
        return changes

    # --- reading -------------------------------------------------------------

    def next_deadline(self) -> float | None:
        return self._pool.next_deadline()

    def terms(self, product: str) -> PoolProduct | None:
        return self._pool.terms(product)

    def used(self, product: str) -> int:
        return self._pool.used(product)

    def waiting(self, product: str) -> int:
        return self._pool.waiting(product)

    def reservations(self, product: str) -> list[dict[str, object]]:
        return self._pool.reservations(product)

    def explain(self, now: float, claim: Claim) -> dict[str, object]:
        try:
            return self._pool.explain(now, claim)
        finally:
            self._settle()  # what expired on the way is journalled like any expiry

    def lease(self, lease_id: str) -> Lease | None:
        return self._pool.lease(lease_id)

    def leases(self) -> Iterable[Lease]:
        return self._pool.leases()

    def __len__(self) -> int:
        return len(self._pool)

    def check_invariants(self) -> None:
        self._pool.check_invariants()

    # --- the working copy ----------------------------------------------------

    def restore(self, leases: Iterable[Lease], now: float) -> list[Lease]:
        dead = sorted(self._pool.restore(leases, now), key=lambda le: le.expires_at)
        self.journal.extend(DeleteLease(lease.id) for lease in dead)
        return dead

    def reset(self) -> None:
        old = self._pool
        self._pool = SeatPool()
        self._pool.max_waiters = old.max_waiters
        self._pool.max_leases_per_seat = old.max_leases_per_seat
        self._pool.set_policy(self._policy, 0.0)  # nothing held yet: nothing served
        self.journal = []
        self._expired = []
        self._woken = []

    def shift(self, delta: float) -> list[Lease]:
        moved = self._pool.shift(delta)
        self.journal.extend(SetExpiry(lease.id, lease.expires_at) for lease in moved)
        return moved

    def clamp(self, now: float, slack: float) -> list[Lease]:
        clamped = []
        for lease in self._pool.leases():
            if lease.borrowed:
                continue  # its end is a date a certificate carries, not time left
            if lease.expires_at > now + lease.duration + slack:
                lease.expires_at = now + lease.duration
                self.journal.append(SetExpiry(lease.id, lease.expires_at))
                clamped.append(lease)
        self._pool.shift(0.0)  # rebuild the heaps around the new times
        return clamped

    def drop_waiters(self) -> list[Waiter]:
        return self._pool.drop_waiters()
