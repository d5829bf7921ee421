"""What every ledger must do (floatd.core.ledger.Ledger), whatever it runs on.

A test module makes a ledger implementation pass this by subclassing
:class:`LedgerContract` and giving it a ``harness`` fixture: something that
opens a ledger on the durable state so far (as a server does at start),
commits a ledger's journal, and closes.  The single-server ledger runs it in
front of each of its stores (tests/test_ledger.py); a ledger on a database
shared by several nodes runs the same tests.

Times are explicit: every call passes ``now``, starting at T.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Protocol

import pytest

from floatd.core.ledger import Ledger
from floatd.core.policy_file import load_policy
from floatd.core.seats import PER_INSTANCE, Claim, Lease, PoolProduct, Waiter, hash_token
from floatd.errors import (
    BadRequest,
    LeaseNotFound,
    LicenseExpired,
    NoFreeSeats,
    PolicyDenied,
    RateLimited,
    UnknownProduct,
)

T = 1_700_000_000.0
DURATION = 60.0

PRODUCTS = [
    PoolProduct("solo", 1, DURATION),
    PoolProduct("duo", 2, DURATION),
    PoolProduct("inst", 2, DURATION, strategy=PER_INSTANCE),
    PoolProduct("named", 1, DURATION, user_locked=True),
    PoolProduct("free", None, DURATION),
]


class Harness(Protocol):
    def open(self, now: float) -> Ledger:
        """A new ledger on the durable state, with PRODUCTS installed (a start)."""
        ...

    def commit(self, ledger: Ledger) -> None:
        """Make everything ``ledger`` has decided durable."""
        ...


_ids = itertools.count()


def claim(
    product: str,
    fingerprint: str = "machine-a",
    *,
    instance: str | None = None,
    user: str | None = None,
) -> Claim:
    n = next(_ids)
    return Claim(
        product=product,
        fingerprint=fingerprint,
        lease_id=f"lease-{n}",
        token_hash=hash_token(f"token-{n}"),
        instance=instance,
        user=user,
        hostname="host",
        peer="127.0.0.1",
    )


def token_of(lease: Lease) -> bytes:
    return lease.token_hash


def granted(ledger: Ledger, now: float, c: Claim) -> Lease:
    result = ledger.claim(now, c)
    assert isinstance(result, Lease), result
    return result


def queued(ledger: Ledger, now: float, c: Claim, until: float) -> Waiter:
    result = ledger.claim(now, c, until)
    assert isinstance(result, Waiter), result
    return result


class LedgerContract:
    """Subclasses provide the ``harness`` fixture."""

    @pytest.fixture
    def ledger(self, harness: Harness) -> Iterator[Ledger]:
        yield harness.open(T)

    # --- claims --------------------------------------------------------------

    def test_claims_are_granted_until_the_product_is_full(self, ledger: Ledger) -> None:
        a = granted(ledger, T, claim("duo", "a"))
        b = granted(ledger, T, claim("duo", "b"))
        assert a.expires_at == b.expires_at == T + DURATION
        with pytest.raises(NoFreeSeats) as refused:
            ledger.claim(T, claim("duo", "c"))
        assert refused.value.details == {"seats": 2, "used": 2}
        assert ledger.used("duo") == 2 and len(ledger) == 2

    def test_a_machine_shares_its_seat_per_machine(self, ledger: Ledger) -> None:
        first = granted(ledger, T, claim("solo", "a", instance="1"))
        second = granted(ledger, T, claim("solo", "a", instance="2"))
        assert first.seat == second.seat and first.id != second.id
        assert ledger.used("solo") == 1
        with pytest.raises(NoFreeSeats):
            ledger.claim(T, claim("solo", "b"))

    def test_each_instance_takes_a_seat_per_instance(self, ledger: Ledger) -> None:
        granted(ledger, T, claim("inst", "a", instance="1"))
        granted(ledger, T, claim("inst", "a", instance="1"))  # the same instance again
        granted(ledger, T, claim("inst", "a", instance="2"))
        assert ledger.used("inst") == 2
        with pytest.raises(NoFreeSeats):
            ledger.claim(T, claim("inst", "a", instance="3"))
        with pytest.raises(BadRequest):
            ledger.claim(T, claim("inst", "a"))

    def test_a_user_locked_seat_is_the_users(self, ledger: Ledger) -> None:
        granted(ledger, T, claim("named", "a", user="ann"))
        granted(ledger, T, claim("named", "a", user="ann"))
        with pytest.raises(NoFreeSeats):
            ledger.claim(T, claim("named", "a", user="bob"))
        with pytest.raises(BadRequest):
            ledger.claim(T, claim("named", "a"))

    def test_unlimited_and_unknown_products(self, ledger: Ledger) -> None:
        for n in range(50):
            granted(ledger, T, claim("free", f"m{n}"))
        assert ledger.used("free") == 50
        with pytest.raises(UnknownProduct):
            ledger.claim(T, claim("nothing"))

    def test_leases_per_seat_are_capped(self, ledger: Ledger) -> None:
        ledger.max_leases_per_seat = 2
        granted(ledger, T, claim("solo", "a"))
        granted(ledger, T, claim("solo", "a"))
        with pytest.raises(RateLimited):
            ledger.claim(T, claim("solo", "a"))

    # --- renew, release, revoke ---------------------------------------------

    def test_renew_runs_a_full_duration_from_now(self, ledger: Ledger) -> None:
        lease = granted(ledger, T, claim("solo"))
        renewed = ledger.renew(T + 30, lease.id, token_of(lease))
        assert renewed.expires_at == T + 30 + DURATION
        assert ledger.next_deadline() is not None
        ledger.expire(T + DURATION + 1)  # past the first expiry, not the renewed one
        assert ledger.take_expired() == [] and ledger.used("solo") == 1

    def test_renew_refuses_unknown_wrong_released_and_expired_alike(self, ledger: Ledger) -> None:
        lease = granted(ledger, T, claim("solo"))
        with pytest.raises(LeaseNotFound):
            ledger.renew(T, "no-such-lease", token_of(lease))
        with pytest.raises(LeaseNotFound):
            ledger.renew(T, lease.id, hash_token("wrong"))
        gone = granted(ledger, T, claim("duo"))
        ledger.release(T, gone.id, token_of(gone))
        with pytest.raises(LeaseNotFound):
            ledger.renew(T, gone.id, token_of(gone))
        with pytest.raises(LeaseNotFound):
            ledger.renew(T + DURATION, lease.id, token_of(lease))
        assert ledger.used("solo") == 0

    def test_a_renewal_check_refuses_before_anything_moves(self, ledger: Ledger) -> None:
        lease = granted(ledger, T, claim("solo"))

        def ended(_: Lease) -> None:
            raise LicenseExpired("the product has ended")

        with pytest.raises(LicenseExpired):
            ledger.renew(T + 10, lease.id, token_of(lease), ended)
        held = ledger.lease(lease.id)
        assert held is not None and held.expires_at == T + DURATION

    def test_release_frees_the_seat_at_once(self, ledger: Ledger) -> None:
        lease = granted(ledger, T, claim("solo", "a"))
        assert ledger.release(T + 1, lease.id, token_of(lease)).id == lease.id
        assert ledger.used("solo") == 0 and ledger.lease(lease.id) is None
        granted(ledger, T + 1, claim("solo", "b"))
        with pytest.raises(LeaseNotFound):
            ledger.release(T + 1, lease.id, token_of(lease))

    def test_a_release_needs_the_token(self, ledger: Ledger) -> None:
        lease = granted(ledger, T, claim("solo"))
        with pytest.raises(LeaseNotFound):
            ledger.release(T, lease.id, hash_token("wrong"))
        assert ledger.used("solo") == 1

    def test_revoke_needs_no_token(self, ledger: Ledger) -> None:
        lease = granted(ledger, T, claim("solo"))
        assert ledger.revoke(T + 1, lease.id).id == lease.id
        assert ledger.used("solo") == 0
        with pytest.raises(LeaseNotFound):
            ledger.revoke(T + 1, lease.id)
        with pytest.raises(LeaseNotFound):
            ledger.renew(T + 1, lease.id, token_of(lease))

    # --- expiry --------------------------------------------------------------

    def test_a_lease_expires_when_due_and_not_before(self, ledger: Ledger) -> None:
        lease = granted(ledger, T, claim("solo"))
        assert ledger.next_deadline() == T + DURATION
        ledger.expire(T + DURATION - 0.001)
        assert ledger.take_expired() == [] and ledger.used("solo") == 1
        ledger.expire(T + DURATION)
        assert [le.id for le in ledger.take_expired()] == [lease.id]
        assert ledger.used("solo") == 0 and len(ledger) == 0
        assert ledger.take_expired() == []  # reported once

    def test_expired_leases_come_out_in_time_order(self, ledger: Ledger) -> None:
        first = granted(ledger, T, claim("free", "a"))
        second = granted(ledger, T + 5, claim("free", "b"))
        ledger.renew(T + 10, first.id, token_of(first))  # now expires after second
        ledger.expire(T + 1000)
        assert [le.id for le in ledger.take_expired()] == [second.id, first.id]

    # --- waiting -------------------------------------------------------------

    def test_a_freed_seat_goes_to_the_first_waiter(self, ledger: Ledger) -> None:
        holder = granted(ledger, T, claim("solo", "a"))
        first = queued(ledger, T + 1, claim("solo", "b"), until=T + 100)
        second = queued(ledger, T + 2, claim("solo", "c"), until=T + 50)
        assert ledger.waiting("solo") == 2
        ledger.release(T + 10, holder.id, token_of(holder))
        woken = ledger.take_woken()
        assert woken == [first] and first.lease is not None
        assert first.lease.fingerprint == "b" and first.lease.expires_at == T + 10 + DURATION
        assert ledger.waiting("solo") == 1 and not second.done
        ledger.expire(T + 50)  # before first's lease runs out
        assert ledger.take_woken() == [second] and second.lease is None
        assert ledger.waiting("solo") == 0

    def test_nobody_jumps_the_queue(self, ledger: Ledger) -> None:
        holder = granted(ledger, T, claim("duo", "a"))
        granted(ledger, T, claim("duo", "b"))
        waiter = queued(ledger, T, claim("duo", "c"), until=T + 100)
        ledger.release(T + 1, holder.id, token_of(holder))
        assert ledger.take_woken() == [waiter]
        with pytest.raises(NoFreeSeats):
            ledger.claim(T + 1, claim("duo", "d"))
        granted(ledger, T + 1, claim("duo", "b"))  # a holder's machine still shares its seat

    def test_an_expiry_before_the_deadline_serves_the_waiter(self, ledger: Ledger) -> None:
        granted(ledger, T, claim("solo", "a"))
        waiter = queued(ledger, T, claim("solo", "b"), until=T + DURATION + 1)
        ledger.expire(T + DURATION + 30)  # noticed late: both are past due
        assert ledger.take_woken() == [waiter] and waiter.lease is not None

    def test_a_withdrawn_waiter_gets_nothing(self, ledger: Ledger) -> None:
        holder = granted(ledger, T, claim("solo", "a"))
        waiter = queued(ledger, T, claim("solo", "b"), until=T + 100)
        ledger.withdraw(waiter, T + 1)
        assert ledger.waiting("solo") == 0
        ledger.release(T + 2, holder.id, token_of(holder))
        assert ledger.take_woken() == [] and ledger.used("solo") == 0

    def test_a_withdrawn_waiter_gives_back_the_seat_it_was_given(self, ledger: Ledger) -> None:
        holder = granted(ledger, T, claim("solo", "a"))
        waiter = queued(ledger, T, claim("solo", "b"), until=T + 100)
        ledger.release(T + 1, holder.id, token_of(holder))
        assert ledger.take_woken() == [waiter] and ledger.used("solo") == 1
        ledger.withdraw(waiter, T + 2)  # the client left before it heard
        assert ledger.used("solo") == 0 and len(ledger) == 0

    def test_the_queue_is_bounded(self, ledger: Ledger) -> None:
        ledger.max_waiters = 1
        granted(ledger, T, claim("solo", "a"))
        queued(ledger, T, claim("solo", "b"), until=T + 10)
        with pytest.raises(NoFreeSeats):
            ledger.claim(T, claim("solo", "c"), T + 10)

    def test_no_wait_means_no_queue(self, ledger: Ledger) -> None:
        granted(ledger, T, claim("solo", "a"))
        with pytest.raises(NoFreeSeats):
            ledger.claim(T, claim("solo", "b"), T)  # a deadline that has passed
        assert ledger.waiting("solo") == 0

    # --- terms ---------------------------------------------------------------

    def test_a_lowered_cap_drops_nobody(self, ledger: Ledger) -> None:
        a = granted(ledger, T, claim("duo", "a"))
        granted(ledger, T, claim("duo", "b"))
        ledger.set_products([PoolProduct("duo", 1, DURATION)], T + 1)
        assert ledger.used("duo") == 2
        ledger.release(T + 2, a.id, token_of(a))
        with pytest.raises(NoFreeSeats):
            ledger.claim(T + 2, claim("duo", "c"))

    def test_a_product_gone_from_the_terms_ends_its_queue(self, ledger: Ledger) -> None:
        granted(ledger, T, claim("solo", "a"))
        waiter = queued(ledger, T, claim("solo", "b"), until=T + 100)
        ledger.set_products([p for p in PRODUCTS if p.code != "solo"], T + 1)
        assert ledger.take_woken() == [waiter] and waiter.lease is None
        with pytest.raises(UnknownProduct):
            ledger.claim(T + 1, claim("solo", "c"))

    # --- durability ----------------------------------------------------------

    def test_committed_decisions_survive_a_restart(self, harness: Harness) -> None:
        ledger = harness.open(T)
        kept = granted(ledger, T, claim("duo", "a"))
        gone = granted(ledger, T, claim("duo", "b"))
        ledger.renew(T + 20, kept.id, token_of(kept))
        ledger.release(T + 21, gone.id, token_of(gone))
        harness.commit(ledger)

        again = harness.open(T + 30)
        assert [le.id for le in again.leases()] == [kept.id]
        back = again.lease(kept.id)
        assert back is not None and back.expires_at == T + 20 + DURATION
        assert back.seat == kept.seat and back.fingerprint == "a"
        assert again.used("duo") == 1
        again.renew(T + 31, kept.id, token_of(kept))  # the token still opens it
        with pytest.raises(LeaseNotFound):
            again.renew(T + 31, gone.id, token_of(gone))

    def test_a_waiters_grant_is_durable(self, harness: Harness) -> None:
        ledger = harness.open(T)
        holder = granted(ledger, T, claim("solo", "a"))
        waiter = queued(ledger, T, claim("solo", "b"), until=T + 100)
        ledger.release(T + 5, holder.id, token_of(holder))
        assert ledger.take_woken() == [waiter] and waiter.lease is not None
        harness.commit(ledger)
        again = harness.open(T + 6)
        assert [le.id for le in again.leases()] == [waiter.lease.id]

    def test_a_restart_expires_what_ran_out_while_down(self, harness: Harness) -> None:
        ledger = harness.open(T)
        lease = granted(ledger, T, claim("solo"))
        harness.commit(ledger)
        later = harness.open(T + DURATION + 5)
        assert later.lease(lease.id) is None and later.used("solo") == 0
        harness.commit(later)
        assert harness.open(T + DURATION + 6).lease(lease.id) is None

    def test_the_cap_holds_after_a_restart(self, harness: Harness) -> None:
        ledger = harness.open(T)
        granted(ledger, T, claim("duo", "a"))
        granted(ledger, T, claim("duo", "b"))
        harness.commit(ledger)
        again = harness.open(T + 1)
        with pytest.raises(NoFreeSeats):
            again.claim(T + 1, claim("duo", "c"))

    # --- the site policy (policy.md): decided with the claim -------------------

    def test_the_policy_decides_with_the_claim(self, ledger: Ledger) -> None:
        ledger.set_policy(load_policy(POLICY, "policy.toml"), T)
        with pytest.raises(PolicyDenied) as denied:
            ledger.claim(T, claim("duo", "k", user="kiosk"))
        assert denied.value.details == {"rule": "exclude", "product": "duo"}
        granted(ledger, T, claim("duo", "a", user="cat"))
        with pytest.raises(PolicyDenied) as capped:
            ledger.claim(T, claim("duo", "b", user="cat"), T + 10)  # a max: no queue
        assert capped.value.details["rule"] == "max" and ledger.waiting("duo") == 0
        with pytest.raises(NoFreeSeats) as kept:
            ledger.claim(T, claim("duo", "c", user="dan"))
        assert kept.value.details == {"reserved": 1, "seats": 2, "used": 1}
        granted(ledger, T, claim("duo", "d", user="ann"))
        assert ledger.reservations("duo") == [
            {"rule": 2, "seats": 1, "held": 1, "free": 0, "for": ["user:ann"]}
        ]
        assert ledger.explain(T, claim("duo", "k", user="kiosk"))["result"] == "POLICY_DENIED"

    def test_the_policy_counts_what_was_held_before_a_restart(self, harness: Harness) -> None:
        policy = load_policy(POLICY, "policy.toml")
        ledger = harness.open(T)
        ledger.set_policy(policy, T)
        granted(ledger, T, claim("duo", "a", user="cat"))
        harness.commit(ledger)
        again = harness.open(T + 1)
        again.set_policy(policy, T + 1)
        with pytest.raises(PolicyDenied):
            again.claim(T + 1, claim("duo", "b", user="cat"))
        with pytest.raises(NoFreeSeats):
            again.claim(T + 1, claim("duo", "c", user="dan"))
        granted(again, T + 1, claim("duo", "d", user="ann"))

    # --- borrowing (borrow.md): a date, not time left ---------------------------

    def test_a_borrowed_lease_keeps_its_date_and_its_seat(self, harness: Harness) -> None:
        ledger = harness.open(T)
        lease = granted(ledger, T, claim("solo", "a"))
        got = ledger.borrow(T, lease.id, token_of(lease), lambda _lease: T + 3600)
        assert got.borrowed and got.expires_at == T + 3600 and ledger.borrowed("solo") == 1
        renewed = ledger.renew(T + 10, lease.id, token_of(lease))
        assert renewed.expires_at == T + 3600  # a renewal does not move it
        harness.commit(ledger)
        again = harness.open(T + DURATION * 10)  # long past a lease's duration
        kept = again.lease(lease.id)
        assert kept is not None and kept.borrowed and again.borrowed("solo") == 1
        with pytest.raises(NoFreeSeats):
            again.claim(T + DURATION * 10, claim("solo", "b"))
        again.expire(T + 3600)
        assert again.lease(lease.id) is None and again.used("solo") == 0

    def test_a_refused_borrow_changes_nothing(self, ledger: Ledger) -> None:
        lease = granted(ledger, T, claim("solo", "a"))
        ledger.take_changes()

        def refuse(_lease: Lease) -> float:
            raise LicenseExpired("no")

        with pytest.raises(LicenseExpired):
            ledger.borrow(T, lease.id, token_of(lease), refuse)
        with pytest.raises(LeaseNotFound):
            ledger.borrow(T, lease.id, b"wrong", lambda _lease: T + 60)
        held = ledger.lease(lease.id)
        assert held is not None and not held.borrowed and ledger.take_changes() == []
        returned = ledger.borrow(T, lease.id, token_of(lease), lambda _lease: T + 600)
        ledger.release(T + 1, returned.id, token_of(returned))  # an early return
        assert ledger.used("solo") == 0 and ledger.borrowed("solo") == 0


POLICY = """
[[rule]]
product = "*"
exclude = ["user:kiosk"]
[[rule]]
product = "duo"
reserve = 1
for = ["user:ann"]
[[rule]]
product = "duo"
max = 1
per = "user"
"""
