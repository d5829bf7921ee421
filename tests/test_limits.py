"""Abuse limits: the token bucket alone, then the server with limits switched on."""

from __future__ import annotations

from collections import Counter, OrderedDict
from pathlib import Path

import trio
import trio.testing
from conftest import MemoryStore, product, sign
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st
from test_server import serving

from floatd.core.limits import RateLimiter, RefusalSampler, limit_key
from floatd.core.secrets import new_lease_secrets


def test_the_bucket_allows_its_burst_then_its_rate() -> None:
    b = RateLimiter(rate=2, burst=3)
    assert [b.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert b.blocked("a", 0.0) and not b.blocked("b", 0.0)
    assert b.allow("b", 0.0)  # another address has its own bucket
    assert not b.allow("a", 0.25) and b.allow("a", 0.5)  # 2 a second
    assert b.allow("a", 100.0) and b.allow("a", 100.0) and b.allow("a", 100.0)
    assert not b.allow("a", 100.0)  # refills only up to the burst
    off = RateLimiter(rate=0, burst=1)
    assert all(off.allow("a", 0.0) for _ in range(100))
    small = RateLimiter(rate=1, burst=1, max_keys=3)
    for n in range(10):
        small.allow(f"k{n}", 0.0)
    assert len(small._buckets) == 3  # bounded, however many addresses come


class _PlainBucket:
    """The token bucket as the contract of RateLimiter says it, written plainly:
    the model the limiter's written-out ``allow`` must agree with."""

    def __init__(self, rate: float, burst: float, max_keys: int) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, key: str, now: float, cost: float) -> bool:
        if self.rate <= 0:
            return True
        tokens, at = self.buckets.get(key, (self.burst, now))
        level = min(self.burst, tokens + max(0.0, now - at) * self.rate)
        allowed = level >= cost
        self.buckets[key] = (level - cost if allowed else level, now)
        self.buckets.move_to_end(key)  # the least recently used goes first
        if len(self.buckets) > self.max_keys:
            self.buckets.popitem(last=False)
        return allowed


@given(
    rate=st.sampled_from([0.0, 0.5, 2.0, 10.0]),
    burst=st.sampled_from([1.0, 3.0, 5.5]),
    calls=st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c", "d", "e"]),
            st.floats(-2.0, 5.0),  # the time moves on, or is stepped back
            st.sampled_from([1.0, 0.5, 2.0]),
        ),
        max_size=60,
    ),
)
def test_the_bucket_agrees_with_its_plain_model(
    rate: float, burst: float, calls: list[tuple[str, float, float]]
) -> None:
    limiter, model = RateLimiter(rate, burst, max_keys=3), _PlainBucket(rate, burst, 3)
    now = 1000.0
    for key, step, cost in calls:
        now += step
        assert limiter.allow(key, now, cost) == model.allow(key, now, cost)
        assert list(limiter._buckets.items()) == list(model.buckets.items())
        assert limiter.blocked(key, now) == (rate > 0 and model.buckets[key][0] < 1.0)


def test_limit_keys_group_ipv6_by_64() -> None:
    assert limit_key("10.0.0.1") == "10.0.0.1"
    assert limit_key("::ffff:10.0.0.1") == "10.0.0.1"
    assert limit_key("2001:db8:1:2::5") == limit_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert limit_key("2001:db8:1:3::5") != limit_key("2001:db8:1:2::5")


async def test_acquires_are_limited_per_address_and_renewals_are_not(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, autojump_clock: trio.testing.MockClock
) -> None:
    ent = sign(vendor_key, products=[product("app", seats=0)])
    async with serving(
        tmp_path, vendor_key, ent, limits__acquires_per_second=1, limits__acquire_burst=3
    ) as h:
        greedy = await h.connect(peer="10.0.0.66")
        got = [await greedy.acquire(fingerprint=f"machine-{n:04d}") for n in range(4)]
        assert [g["ok"] for g in got] == [True, True, True, False]
        assert got[3]["error"]["code"] == "RATE_LIMITED"
        polite = await h.connect(peer="10.0.0.7")
        assert (await polite.acquire(fingerprint="machine-polite"))["ok"]
        for _ in range(20):  # renewals are never limited
            renew = await greedy.request("renew", lease=got[0]["lease"], token=got[0]["token"])
            assert renew["ok"]
        await trio.sleep(1)
        assert (await greedy.acquire(fingerprint="machine-later"))["ok"]


async def test_failed_logins_are_limited_per_address(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, autojump_clock: trio.testing.MockClock
) -> None:
    ent = sign(vendor_key, products=[product("named", authorization="user"), product("app")])
    async with serving(tmp_path, vendor_key, ent, limits__auth_failures_per_minute=5) as h:
        good = await h.connect(peer="10.0.0.7")
        held = await good.acquire("app")
        guesser = await h.connect(peer="10.0.0.66")
        codes = []
        for n in range(8):
            got = await guesser.acquire("named", user="ann@example.com", password=f"guess{n}")
            codes.append(got["error"]["code"])
        assert codes == ["AUTH_FAILED"] * 5 + ["RATE_LIMITED"] * 3
        other = await good.acquire("named", user="ann@example.com", password="x")
        assert other["error"]["code"] == "AUTH_FAILED"  # another address is not punished
        assert (await good.request("renew", lease=held["lease"], token=held["token"]))["ok"]
        await trio.sleep(13)  # a token back (5 a minute)
        got = await guesser.acquire("named", user="ann@example.com", password="again")
        assert got["error"]["code"] == "AUTH_FAILED"


async def test_connections_per_address_and_the_wait_queue_are_capped(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, autojump_clock: trio.testing.MockClock
) -> None:
    ent = sign(vendor_key, products=[product("solo", seats=1)])
    async with serving(
        tmp_path, vendor_key, ent, limits__connections_per_address=3, limits__max_waiters=2
    ) as h:
        mine = []
        for _ in range(3):
            with trio.fail_after(5):
                mine.append(await h.connect(peer="10.0.0.66"))
        extra = await h.connect(peer="10.0.0.66", hello=False)
        with trio.fail_after(5):
            busy = await extra.hello()
        assert busy["error"]["code"] == "BUSY"
        assert (await (await h.connect(peer="10.0.0.7")).acquire("solo"))["ok"]
        for c in mine[:2]:
            await c.send("acquire", product="solo", fingerprint="machine-waits", wait=60)
        await trio.sleep(1)
        with trio.fail_after(5):
            third = await mine[2].acquire("solo", fingerprint="machine-late", wait=60)
        assert third["error"]["code"] == "NO_FREE_SEATS"  # answered at once, not queued
        assert h.server.service.ledger.waiting("solo") == 2
        for c in mine:  # hang up: the queued waits are given up with the connections
            await c.stream.aclose()
        await trio.sleep(1)
        assert h.server.service.ledger.waiting("solo") == 0


def test_lease_ids_never_start_with_a_dash_and_tokens_are_full_length() -> None:
    """Admins paste ids into ``floatd revoke LEASE``; a leading dash would read as
    an option.  Without the redraw, about 78 of these 5,000 would start with one."""
    drawn = [new_lease_secrets() for _ in range(5000)]
    assert not [lease_id for lease_id, _ in drawn if lease_id.startswith("-")]
    assert {len(lease_id) for lease_id, _ in drawn} == {22}  # 132 bits
    assert {len(token) for _, token in drawn} == {43}  # 258 bits
    assert len({lease_id for lease_id, _ in drawn}) == len(drawn)


def test_the_refusal_sampler_records_a_few_and_counts_the_rest() -> None:
    s = RefusalSampler(full=3, window=60.0, max_keys=2)
    key = ("10.0.0.9", "LEASE_NOT_FOUND", None)
    assert [s.note(key, 1.0) for _ in range(10)] == [True] * 3 + [False] * 7
    assert s.take_due(30.0) == []  # the window is still open
    assert s.take_due(61.0) == [(key, 7, 1.0)]
    assert s.take_due(200.0) == []  # handed out once
    assert s.note(key, 200.0)  # a new window records in full again
    # A window with nothing folded says nothing; the table stays bounded.
    for n in range(5):
        other = (f"10.0.1.{n}", "RATE_LIMITED", None)
        for _ in range(5):
            s.note(other, 201.0)
    assert len(s._windows) == 2
    folded = s.take_due(201.0)
    assert sorted(count for _, count, _ in folded) == [2, 2, 2]  # closed early, when full


async def test_floods_of_refusals_grow_the_audit_by_a_bounded_amount(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, autojump_clock: trio.testing.MockClock
) -> None:
    """Made-up renewals and acquires past the limit, 2,000 each from one address:
    a handful of records each minute, one folded record with the rest, and the
    made-up renewals are slowed down (RATE_LIMITED) past their own limit."""
    ent = sign(vendor_key, products=[product("app", seats=0)])
    store = MemoryStore()
    async with serving(
        tmp_path,
        vendor_key,
        ent,
        store=store,
        limits__acquires_per_second=1,
        limits__acquire_burst=3,
        limits__lease_misses_per_minute=60,
    ) as h:
        flooder = await h.connect(peer="10.0.0.66")
        codes: Counter[str] = Counter()
        for n in range(2000):
            lease, token = new_lease_secrets()
            for op, fields in (
                ("renew", {"lease": lease, "token": token}),
                ("acquire", {"product": "app", "fingerprint": f"machine-{n:05d}"}),
            ):
                got = await flooder.request(op, **fields)
                codes["ok" if got["ok"] else got["error"]["code"]] += 1
        assert codes["RATE_LIMITED"] > 3000 and codes["ok"] == 3
        # A client with a real lease renews it as always.
        polite = await h.connect(peer="10.0.0.7")
        held = await polite.acquire(fingerprint="machine-polite")
        assert (await polite.request("renew", lease=held["lease"], token=held["token"]))["ok"]
        await trio.sleep(61)
        refused = [a for a in store.audit if a.event == "refused"]
        # Per (address, code, product): 100 records one by one, then one folded.
        assert len(refused) <= 3 * 101, len(refused)
        # Every refusal is accounted for, one by one or folded.
        assert sum(a.repeats or 1 for a in refused) == 4000 - 3
        assert any((a.repeats or 1) > 100 for a in refused)


async def test_a_seat_holds_a_bounded_number_of_leases(
    tmp_path: Path, vendor_key: Ed25519PrivateKey, autojump_clock: trio.testing.MockClock
) -> None:
    ent = sign(vendor_key, products=[product("app", seats=1)])
    async with serving(tmp_path, vendor_key, ent, limits__leases_per_seat=5) as h:
        c = await h.connect()
        got = [await c.acquire(fingerprint="machine-one") for _ in range(6)]
        assert [g["ok"] for g in got] == [True] * 5 + [False]
        assert got[5]["error"]["code"] == "RATE_LIMITED"
        assert (await c.request("release", lease=got[0]["lease"], token=got[0]["token"]))["ok"]
        assert (await c.acquire(fingerprint="machine-one"))["ok"]
