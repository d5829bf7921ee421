"""The seat pool with explicit times: strategies, expiry, wait queue, invariants."""

from __future__ import annotations

import hashlib
import itertools
import platform

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from floatd.core.pool import SeatPool
from floatd.core.seats import Claim, Lease, PoolProduct, Waiter, _sha256, hash_token
from floatd.errors import BadRequest, LeaseNotFound, NoFreeSeats, UnknownProduct

T0 = 1000.0
_ids = itertools.count()


def claim(product: str = "app", fp: str = "machine-a", **kw: object) -> Claim:
    n = next(_ids)
    return Claim(
        product=product, fingerprint=fp, lease_id=f"L{n}", token_hash=hash_token(f"tok{n}"), **kw
    )  # type: ignore[arg-type]


def token_of(lease: Lease) -> bytes:
    return hash_token("tok" + lease.id[1:])


def pool_with(*products: PoolProduct, now: float = T0) -> SeatPool:
    pool = SeatPool()
    pool.set_products(products, now)
    return pool


def grant(pool: SeatPool, c: Claim, now: float = T0) -> Lease:
    got = pool.acquire(now, c)
    assert isinstance(got, Lease)
    return got


APP = PoolProduct("app", seats=2, duration=60)


def test_cap_and_refusal_details() -> None:
    pool = pool_with(APP)
    grant(pool, claim(fp="m1"))
    grant(pool, claim(fp="m2"))
    with pytest.raises(NoFreeSeats) as err:
        pool.acquire(T0, claim(fp="m3"))
    assert err.value.details == {"seats": 2, "used": 2}


def test_a_duplicate_lease_id_is_refused_and_changes_nothing() -> None:
    pool = pool_with(APP)
    held = grant(pool, claim(fp="m1"))
    again = Claim("app", "m2", held.id, hash_token("other"))
    with pytest.raises(ValueError, match="duplicate lease id"):
        pool.acquire(T0, again)
    assert pool.lease(held.id) is held
    assert pool.used("app") == 1  # m2 took no seat
    grant(pool, claim(fp="m2"))  # and the second seat is still free


def test_per_machine_shares_one_seat_until_last_lease_goes() -> None:
    pool = pool_with(APP)
    a = grant(pool, claim(fp="m1"))
    b = grant(pool, claim(fp="m1"))
    assert a.id != b.id and pool.used("app") == 1
    grant(pool, claim(fp="m2"))
    grant(pool, claim(fp="m1"))  # sharing needs no free seat even at the cap
    pool.release(T0, a.id, token_of(a))
    assert pool.used("app") == 2
    pool.release(T0, b.id, token_of(b))
    assert pool.used("app") == 2  # m1 still has its third lease


def test_per_instance_takes_a_seat_per_instance_and_reuses_on_reconnect() -> None:
    pool = pool_with(PoolProduct("app", seats=2, duration=60, strategy="per-instance"))
    grant(pool, claim(fp="m1", instance="p1"))
    grant(pool, claim(fp="m1", instance="p1"))  # same process reconnecting
    assert pool.used("app") == 1
    grant(pool, claim(fp="m1", instance="p2"))
    assert pool.used("app") == 2
    with pytest.raises(NoFreeSeats):
        pool.acquire(T0, claim(fp="m1", instance="p3"))
    with pytest.raises(BadRequest):
        pool.acquire(T0, claim(fp="m1"))  # instance is required


def test_user_locked_keys_by_user() -> None:
    pool = pool_with(PoolProduct("app", seats=2, duration=60, user_locked=True))
    grant(pool, claim(fp="m1", user="alice"))
    grant(pool, claim(fp="m1", user="alice"))
    assert pool.used("app") == 1
    grant(pool, claim(fp="m1", user="bob"))
    assert pool.used("app") == 2
    with pytest.raises(BadRequest):
        pool.acquire(T0, claim(fp="m2"))


def test_unlimited() -> None:
    pool = pool_with(PoolProduct("app", seats=None, duration=60))
    for i in range(500):
        grant(pool, claim(fp=f"m{i}"))
    assert pool.used("app") == 500


def test_unknown_product() -> None:
    with pytest.raises(UnknownProduct):
        pool_with(APP).acquire(T0, claim(product="other"))


def test_expiry_frees_on_time() -> None:
    pool = pool_with(APP)
    lease = grant(pool, claim(fp="m1"))
    assert lease.expires_at == T0 + 60
    pool.advance(T0 + 59.999)
    assert pool.used("app") == 1 and pool.take_expired() == []
    assert pool.next_deadline() == T0 + 60
    pool.advance(T0 + 60)
    assert pool.used("app") == 0
    assert pool.take_expired() == [lease]
    with pytest.raises(LeaseNotFound):
        pool.renew(T0 + 60, lease.id, token_of(lease))


def test_renew_extends_a_full_duration_from_now() -> None:
    pool = pool_with(APP)
    lease = grant(pool, claim(fp="m1"))
    pool.renew(T0 + 50, lease.id, token_of(lease))
    assert lease.expires_at == T0 + 110
    pool.advance(T0 + 100)  # the stale heap entry at T0+60 must not expire it
    assert pool.lease(lease.id) is lease
    pool.advance(T0 + 110)
    assert pool.lease(lease.id) is None


def test_renew_and_release_need_the_token() -> None:
    pool = pool_with(APP)
    lease = grant(pool, claim(fp="m1"))
    for fn in (pool.renew, pool.release):
        with pytest.raises(LeaseNotFound):
            fn(T0, lease.id, hash_token("wrong"))
        with pytest.raises(LeaseNotFound):
            fn(T0, "no-such-lease", token_of(lease))
    pool.release(T0, lease.id, token_of(lease))
    with pytest.raises(LeaseNotFound):
        pool.release(T0, lease.id, token_of(lease))


def test_wait_queue_is_first_come_first_served() -> None:
    pool = pool_with(PoolProduct("app", seats=1, duration=60))
    holder = grant(pool, claim(fp="m0"))
    w1 = pool.acquire(T0, claim(fp="m1"), wait_until=T0 + 30)
    w2 = pool.acquire(T0 + 1, claim(fp="m2"), wait_until=T0 + 30)
    assert isinstance(w1, Waiter) and isinstance(w2, Waiter)
    # A newcomer that does not wait is refused even though others wait.
    with pytest.raises(NoFreeSeats):
        pool.acquire(T0 + 2, claim(fp="m3"))
    pool.release(T0 + 5, holder.id, token_of(holder))
    assert pool.take_woken() == [w1]
    assert w1.lease is not None and w1.lease.fingerprint == "m1" and w1.lease.granted_at == T0 + 5
    assert not w2.done
    pool.advance(T0 + 30)
    assert pool.take_woken() == [w2] and w2.lease is None and w2.done


def test_waiter_sharing_a_held_seat_is_served_at_once() -> None:
    pool = pool_with(PoolProduct("app", seats=1, duration=60))
    grant(pool, claim(fp="m0"))
    got = pool.acquire(T0, claim(fp="m0"), wait_until=T0 + 30)
    assert isinstance(got, Lease)


def test_seat_freed_by_expiry_before_deadline_reaches_waiter() -> None:
    """Time order matters: expiry at T0+60 comes before the waiter's deadline at T0+61,
    even when both are processed by one late advance."""
    pool = pool_with(PoolProduct("app", seats=1, duration=60))
    grant(pool, claim(fp="m0"))
    w = pool.acquire(T0, claim(fp="m1"), wait_until=T0 + 61)
    assert isinstance(w, Waiter)
    pool.advance(T0 + 100)
    assert w.lease is not None
    assert w.lease.granted_at == T0 + 100  # timed from when the client hears of it


def test_waiter_timing_out_before_expiry_gets_nothing() -> None:
    pool = pool_with(PoolProduct("app", seats=1, duration=60))
    grant(pool, claim(fp="m0"))
    w = pool.acquire(T0, claim(fp="m1"), wait_until=T0 + 59)
    assert isinstance(w, Waiter)
    pool.advance(T0 + 100)
    assert w.done and w.lease is None
    assert pool.used("app") == 0


def test_cancelled_waiter_is_skipped() -> None:
    pool = pool_with(PoolProduct("app", seats=1, duration=60))
    holder = grant(pool, claim(fp="m0"))
    w1 = pool.acquire(T0, claim(fp="m1"), wait_until=T0 + 30)
    w2 = pool.acquire(T0, claim(fp="m2"), wait_until=T0 + 30)
    assert isinstance(w1, Waiter) and isinstance(w2, Waiter)
    pool.cancel_wait(w1)
    pool.release(T0 + 1, holder.id, token_of(holder))
    assert pool.take_woken() == [w2] and w1.lease is None
    pool.check_invariants()


def test_raised_cap_serves_waiters_and_lowered_cap_keeps_leases() -> None:
    pool = pool_with(PoolProduct("app", seats=1, duration=60))
    held = grant(pool, claim(fp="m0"))
    w = pool.acquire(T0, claim(fp="m1"), wait_until=T0 + 30)
    pool.set_products([PoolProduct("app", seats=3, duration=60)], T0 + 1)
    assert isinstance(w, Waiter) and w.lease is not None
    pool.set_products([PoolProduct("app", seats=1, duration=60)], T0 + 2)
    assert pool.used("app") == 2  # above the new cap: nobody is cut off
    pool.renew(T0 + 3, held.id, token_of(held))
    with pytest.raises(NoFreeSeats):
        pool.acquire(T0 + 3, claim(fp="m9"))
    pool.check_invariants()


def test_product_removed_keeps_leases_and_fails_waiters() -> None:
    pool = pool_with(PoolProduct("app", seats=1, duration=60))
    held = grant(pool, claim(fp="m0"))
    w = pool.acquire(T0, claim(fp="m1"), wait_until=T0 + 30)
    pool.set_products([], T0 + 1)
    assert pool.take_woken() == [w] and w.lease is None
    assert pool.lease(held.id) is held
    with pytest.raises(UnknownProduct):
        pool.acquire(T0 + 1, claim(fp="m2"))
    pool.release(T0 + 2, held.id, token_of(held))
    assert pool.used("app") == 0


def test_restore_drops_expired_and_keeps_the_rest() -> None:
    source = pool_with(APP)
    a = grant(source, claim(fp="m1"))
    b = grant(source, claim(fp="m2"), now=T0 + 30)
    pool = pool_with(APP, now=T0 + 70)
    dead = pool.restore([a, b], T0 + 70)
    assert dead == [a]
    assert pool.used("app") == 1 and pool.lease(b.id) is b
    pool.renew(T0 + 71, b.id, token_of(b))
    pool.check_invariants()


def test_expiry_heap_stays_bounded_under_churn() -> None:
    pool = pool_with(PoolProduct("app", seats=None, duration=60))
    for i in range(5000):
        lease = grant(pool, claim(fp=f"m{i}"))
        pool.release(T0, lease.id, token_of(lease))
    assert len(pool._expiry) <= 130


# --- property tests -----------------------------------------------------------


class PoolMachine(RuleBasedStateMachine):
    """Random acquires, renews, releases, waits and time steps; the seat cap and
    per-machine (per machine and user, when user-locked) sharing must hold after
    every step."""

    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.cap = 3
        self.pool = SeatPool()
        self.pool.set_products(
            [
                PoolProduct("m", seats=3, duration=10),
                PoolProduct("i", seats=2, duration=10, strategy="per-instance"),
                PoolProduct("u", seats=2, duration=10, user_locked=True),
            ],
            self.now,
        )
        self.held: list[Lease] = []
        self.waiters: list[Waiter] = []

    @rule(
        fp=st.sampled_from(["a-machine", "b-machine", "c-machine", "d-machine", "e-machine"]),
        product=st.sampled_from(["m", "i", "u"]),
        instance=st.sampled_from(["1", "2", "3"]),
        user=st.sampled_from(["ann", "bob"]),
        wait=st.sampled_from([0, 0, 5]),
    )
    def acquire(self, fp: str, product: str, instance: str, user: str, wait: int) -> None:
        # A user rides on every claim: only the user-locked product "u" may heed it.
        c = claim(product=product, fp=fp, instance=instance, user=user)
        used_before = self.pool.used(product)
        shared = any(
            le.product == product
            and le.fingerprint == fp
            and (product != "i" or le.instance == instance)
            and (product != "u" or le.user == user)
            and self.pool.lease(le.id) is not None
            for le in self.held
        )
        try:
            got = self.pool.acquire(self.now, c, self.now + wait if wait else None)
        except NoFreeSeats:
            assert not shared, "a held seat must always be shareable"
            return
        if isinstance(got, Lease):
            self.held.append(got)
            if shared:
                assert self.pool.used(product) == used_before
        else:
            self.waiters.append(got)
        self._collect()

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def renew_or_release(self, data: st.DataObject) -> None:
        lease = data.draw(st.sampled_from(self.held))
        try:
            if data.draw(st.booleans()):
                self.pool.renew(self.now, lease.id, token_of(lease))
            else:
                self.pool.release(self.now, lease.id, token_of(lease))
        except LeaseNotFound:
            assert self.pool.lease(lease.id) is None
        self._collect()

    @rule(dt=st.floats(0, 12))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.pool.advance(self.now)
        self._collect()

    def _collect(self) -> None:
        for w in self.pool.take_woken():
            if w.lease is not None:
                self.held.append(w.lease)
        self.pool.take_expired()
        self.held = [le for le in self.held if self.pool.lease(le.id) is not None]

    @invariant()
    def never_over_cap(self) -> None:
        assert self.pool.used("m") <= 3
        assert self.pool.used("i") <= 2
        assert self.pool.used("u") <= 2

    @invariant()
    def consistent(self) -> None:
        self.pool.check_invariants()
        for lease in self.pool.leases():
            assert lease.expires_at > self.now or self.pool.next_deadline() is not None

    @invariant()
    def one_seat_per_machine(self) -> None:
        machines = {le.fingerprint for le in self.pool.leases() if le.product == "m"}
        assert self.pool.used("m") == len(machines)
        pairs = {(le.fingerprint, le.user) for le in self.pool.leases() if le.product == "u"}
        assert self.pool.used("u") == len(pairs)


PoolMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestPoolMachine = PoolMachine.TestCase


def test_token_digests_are_sha256_from_cpythons_own_module() -> None:
    """Digests stored by earlier versions (hashlib's SHA-256) must still open
    their leases; the module is CPython's own, not OpenSSL's (see hash_token)."""
    for token in ("", "N2acSdth40hF9Dw0MM_CBC9n8jJhz2RGWJjnRcdnJfQ", "jeton-ä" * 40):
        assert hash_token(token) == hashlib.sha256(token.encode()).digest()
    if platform.python_implementation() == "CPython":
        assert _sha256 is not hashlib.sha256
