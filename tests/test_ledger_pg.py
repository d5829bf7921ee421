"""The cluster's ledger (floatd.store.pg_ledger) passes the ledger contract on a
real PostgreSQL, and keeps the cap and the queue across nodes: several ledgers
on one database, each a node."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator

import psycopg
import pytest
from ledger_contract import (
    POLICY,
    PRODUCTS,
    Harness,
    LedgerContract,
    T,
    claim,
    granted,
    queued,
)
from pg import fresh_database

from floatd.core.ledger import Ledger, LocalLedger
from floatd.core.policy_file import load_policy
from floatd.core.seats import Lease, Waiter
from floatd.errors import FloatdError, NoFreeSeats, Unavailable
from floatd.store import cluster
from floatd.store.pg_ledger import PgLedger

TABLES = "floatd_leases, floatd_waiters, floatd_products, floatd_audit"


@pytest.fixture(scope="module")
def ledger_db(pg_dsn: str) -> Iterator[str]:
    url = fresh_database(pg_dsn, "ledger_contract")
    with psycopg.connect(url, autocommit=True) as conn:
        cluster.init(conn)
    yield url


class PgHarness:
    """Each open() is a node starting on the database; every call commits."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conns: list[psycopg.Connection[tuple[object, ...]]] = []

    def ledger(self, now: float, node: str = "node-a") -> PgLedger:
        conn = psycopg.connect(self.url, autocommit=True)
        self.conns.append(conn)
        ledger = PgLedger(conn, node)
        ledger.set_products(PRODUCTS, now)
        ledger.restore((), now)
        return ledger

    def open(self, now: float) -> Ledger:
        return self.ledger(now)

    def commit(self, ledger: Ledger) -> None:
        assert ledger.take_changes() == []  # nothing waits: each call committed

    def close(self) -> None:
        for conn in self.conns:
            conn.close()


@pytest.fixture
def pg_harness(ledger_db: str) -> Iterator[PgHarness]:
    with psycopg.connect(ledger_db, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {TABLES}")
    harness = PgHarness(ledger_db)
    yield harness
    harness.close()


class TestPgLedger(LedgerContract):
    @pytest.fixture
    def harness(self, pg_harness: PgHarness) -> Harness:
        return pg_harness


def test_a_lease_granted_on_one_node_is_renewed_and_released_on_another(
    pg_harness: PgHarness,
) -> None:
    a, b = pg_harness.ledger(T, "a"), pg_harness.ledger(T, "b")
    lease = granted(a, T, claim("solo", "m1"))
    assert b.renew(T + 10, lease.id, lease.token_hash).expires_at == T + 70
    with pytest.raises(NoFreeSeats):
        b.claim(T + 10, claim("solo", "m2"))
    b.release(T + 11, lease.id, lease.token_hash)
    granted(a, T + 12, claim("solo", "m2"))


def test_a_seat_freed_on_one_node_goes_to_the_first_waiter_on_another(
    pg_harness: PgHarness,
) -> None:
    a, b, c = (pg_harness.ledger(T, node) for node in "abc")
    holder = granted(a, T, claim("solo", "m1"))
    first = queued(b, T + 1, claim("solo", "m2"), until=T + 100)
    second = queued(c, T + 2, claim("solo", "m3"), until=T + 100)
    assert a.waiting("solo") == 2
    a.release(T + 3, holder.id, holder.token_hash)
    assert a.take_woken() == []  # not a's waiter: b hears of it
    c.collect()
    assert c.take_woken() == [] and not second.done
    b.collect()
    assert b.take_woken() == [first] and first.lease is not None
    assert first.lease.fingerprint == "m2" and a.used("solo") == 1
    c.renew(T + 4, first.lease.id, first.lease.token_hash)  # any node renews it
    c.withdraw(second, T + 5)
    assert a.waiting("solo") == 0


def test_a_grant_to_a_waiter_whose_node_went_away_gives_the_seat_back(
    pg_harness: PgHarness,
) -> None:
    a, b = pg_harness.ledger(T, "a"), pg_harness.ledger(T, "b")
    holder = granted(a, T, claim("solo", "m1"))
    queued(b, T + 1, claim("solo", "m2"), until=T + 100)
    a.release(T + 2, holder.id, holder.token_hash)
    assert a.used("solo") == 1  # granted to b's waiter, who never hears of it
    assert a.forget_node(T + 3, "b") == 1
    assert a.used("solo") == 0 and a.waiting("solo") == 0


def test_the_cap_holds_under_concurrent_claims_from_many_nodes(pg_harness: PgHarness) -> None:
    nodes = [pg_harness.ledger(T, f"n{i}") for i in range(4)]
    got: list[str] = []
    refused: list[str] = []
    lock = threading.Lock()

    def run(ledger: PgLedger, n: int) -> None:
        for k in range(10):
            try:
                lease = ledger.claim(T + 1, claim("duo", f"m{n}-{k}"))
            except NoFreeSeats:
                with lock:
                    refused.append(f"{n}-{k}")
            else:
                with lock:
                    got.append(lease.id)  # type: ignore[union-attr]

    threads = [threading.Thread(target=run, args=(ledger, n)) for n, ledger in enumerate(nodes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(got) == 2 and len(refused) == 38
    assert nodes[0].used("duo") == 2


def test_a_batch_commits_together_or_not_at_all(pg_harness: PgHarness) -> None:
    ledger = pg_harness.ledger(T)
    with pytest.raises(Unavailable), ledger.transaction():
        granted(ledger, T, claim("duo", "a"))
        ledger._conn.execute("SELECT 1/0")  # the database fails mid-batch
    assert len(ledger) == 0
    with ledger.transaction():
        granted(ledger, T, claim("duo", "a"))
        granted(ledger, T, claim("duo", "b"))
    assert ledger.used("duo") == 2


def _copies_match_the_database(ledger: PgLedger) -> None:
    """A node's copies, brought up to date from the change log, hold exactly
    what the database holds (leases, their expiry, the queue in order)."""
    with ledger.transaction():
        ledger._lock()
        conn = ledger._conn
        for code, copy in ledger._follow.copies.items():
            rows = conn.execute(
                "SELECT id, expires_at, borrowed FROM floatd_leases WHERE product = %s", (code,)
            ).fetchall()
            held = {(le.id, le.expires_at, le.borrowed) for le in copy.leases()}
            assert held == set(rows), code
            queue = conn.execute(
                "SELECT seq FROM floatd_waiters WHERE product = %s AND NOT done ORDER BY seq",
                (code,),
            ).fetchall()
            assert copy.waiting(code) == len(queue), code
            copy.check_invariants()


@pytest.mark.parametrize("seed", range(8))
def test_nodes_keep_their_copies_exact_from_the_change_log(
    pg_harness: PgHarness, seed: int
) -> None:
    """Random claims, waits, renewals, releases, revokes, withdrawals and
    expiries, each on a random one of three nodes, against the single server's
    ledger given the same calls: the same grants and refusals, the same seats,
    and every node's copies equal to the database after every step."""
    rng = random.Random(seed)
    nodes = [pg_harness.ledger(T, f"n{i}") for i in range(3)]
    reference = LocalLedger()
    reference.set_products(PRODUCTS, T)
    if seed % 2:  # the site policy's charges must follow too
        policy = load_policy(POLICY, "policy.toml")
        for ledger in (reference, *nodes):
            ledger.set_policy(policy, T)
    now = T
    held: list[Lease] = []
    waiting: list[tuple[int, Waiter, Waiter]] = []
    for _ in range(120):
        now += rng.choice([0.0, 0.5, 3.0, 20.0])
        node_index = rng.randrange(3)
        node = nodes[node_index]
        op = rng.random()
        if op < 0.45 or not held:
            c = claim(
                rng.choice(["solo", "duo", "inst"]),
                f"m{rng.randrange(4)}",
                instance=str(rng.randrange(3)),
            )
            wait = now + rng.choice([5.0, 40.0]) if rng.random() < 0.3 else None
            outcomes = []
            for ledger in (reference, node):
                try:
                    outcomes.append(ledger.claim(now, c, wait))
                except FloatdError as exc:
                    outcomes.append(exc.code)
            want, got = outcomes
            assert type(want) is type(got) and (not isinstance(want, str) or want == got), (
                want,
                got,
            )
            if isinstance(got, Lease):
                assert isinstance(want, Lease)
                held.append(got)
            elif isinstance(got, Waiter):
                assert isinstance(want, Waiter)
                waiting.append((node_index, want, got))
        elif op < 0.6:
            lease = rng.choice(held)
            results = []
            for ledger in (reference, node):
                try:
                    results.append(ledger.renew(now, lease.id, lease.token_hash).expires_at)
                except FloatdError as exc:
                    results.append(exc.code)
            assert results[0] == results[1]
        elif op < 0.75:
            lease = held.pop(rng.randrange(len(held)))
            codes = []
            for ledger in (reference, node):
                try:
                    ledger.release(now, lease.id, lease.token_hash)
                    codes.append("ok")
                except FloatdError as exc:
                    codes.append(exc.code)
            assert codes[0] == codes[1]
        elif op < 0.85 and waiting:
            index, want, got = waiting.pop(rng.randrange(len(waiting)))
            reference.withdraw(want, now)
            nodes[index].withdraw(got, now)
        else:
            reference.expire(now)
            node.expire(now)
        # Expiry is lazy on both (a lease past due holds its seat until some
        # call looks): compare once both have looked.
        reference.expire(now)
        nodes[rng.randrange(3)].expire(now)
        for ledger in nodes:
            ledger.collect()
            ledger.take_woken()
        reference.take_woken()
        for code in ("solo", "duo", "inst"):
            assert node.used(code) == reference.used(code), code
            assert node.waiting(code) == reference.waiting(code), code
        assert {le.id for le in node.leases()} == {le.id for le in reference.leases()}
        for ledger in nodes:
            _copies_match_the_database(ledger)
