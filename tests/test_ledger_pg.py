"""The cluster's ledger (floatd.store.pg_ledger) passes the ledger contract on a
real PostgreSQL, and keeps the cap and the queue across nodes: several ledgers
on one database, each a node."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import psycopg
import pytest
from ledger_contract import PRODUCTS, Harness, LedgerContract, T, claim, granted, queued
from pg import fresh_database

from floatd.core.ledger import Ledger
from floatd.errors import NoFreeSeats, Unavailable
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
