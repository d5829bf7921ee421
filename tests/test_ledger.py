"""The single server's ledger (LocalLedger) passes the ledger contract in front
of each of its stores: a plain in-memory store, SQLite in this process, and
SQLite through the writer process that `floatd serve` uses."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ledger_contract import PRODUCTS, Harness, LedgerContract, T, claim

from floatd.core.changes import Change, coalesce
from floatd.core.ledger import Ledger, LocalLedger
from floatd.core.seats import Lease, Waiter
from floatd.errors import FloatdError
from floatd.store.sqlite import LeaseStore, SQLiteLeaseStore
from floatd.store.writer import ProcessLeaseStore


class MemoryStore:
    """A store that keeps the net effect of the batches in a dict: the least a
    store must do, so the contract sees the ledger and nothing of SQLite."""

    def __init__(self) -> None:
        self.leases: dict[str, Lease] = {}

    def renders_lease_lines(self) -> bool:
        return False

    def load_leases(self) -> list[Lease]:
        return [dataclasses.replace(lease) for lease in self.leases.values()]

    def load_meta(self) -> dict[str, str]:
        return {}

    def apply(self, changes: Sequence[Change]) -> None:
        net = coalesce(changes)
        for lease_id in net.deletes:
            self.leases.pop(lease_id, None)
        for lease_id, at in net.expiries.items():
            self.leases[lease_id] = dataclasses.replace(self.leases[lease_id], expires_at=at)
        for lease_id, lease in net.puts.items():
            self.leases[lease_id] = dataclasses.replace(lease)

    def check_identity(self) -> None:
        return None

    def close(self) -> None:
        return None


class LocalHarness:
    """LocalLedger in front of ``store``: opening is what a start does."""

    def __init__(self, store: LeaseStore) -> None:
        self.store = store

    def open(self, now: float) -> Ledger:
        ledger = LocalLedger()
        ledger.set_products(PRODUCTS, now)
        ledger.restore(self.store.load_leases(), now)
        return ledger

    def commit(self, ledger: Ledger) -> None:
        self.store.apply(ledger.take_changes())


@pytest.fixture(params=["memory", "sqlite", "writer-process"])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    store: LeaseStore
    if request.param == "memory":
        store = MemoryStore()
    elif request.param == "sqlite":
        store = SQLiteLeaseStore(tmp_path / "state.sqlite3")
    else:
        store = ProcessLeaseStore(tmp_path / "state.sqlite3")
    try:
        yield LocalHarness(store)
    finally:
        store.close()


class TestLocalLedger(LedgerContract):
    """The whole contract, once per store."""


def test_the_journal_holds_each_decision_in_order() -> None:
    """What the shell commits: a grant, a renewal, a release and the grant to
    the waiter the release served, in that order."""
    ledger = LocalLedger()
    ledger.set_products(PRODUCTS, T)
    first = claim("solo", "a")
    held = ledger.claim(T, first)
    assert isinstance(held, Lease)
    waiter = ledger.claim(T, claim("solo", "b"), T + 50)
    assert isinstance(waiter, Waiter)
    ledger.renew(T + 1, held.id, first.token_hash)
    ledger.release(T + 2, held.id, first.token_hash)
    journal = ledger.take_changes()
    assert [type(c).__name__ for c in journal] == [
        "PutLease",
        "SetExpiry",
        "DeleteLease",
        "PutLease",
    ]
    assert waiter.lease is not None
    assert [c[0] if isinstance(c[0], str) else c[0].id for c in journal] == [
        held.id,
        held.id,
        held.id,
        waiter.lease.id,
    ]
    assert ledger.take_changes() == []


OPS = st.lists(
    st.tuples(
        st.sampled_from(["claim", "wait", "renew", "release", "revoke", "tick", "restart"]),
        st.sampled_from(["solo", "duo", "inst"]),
        st.integers(0, 3),  # which machine / which lease
        st.integers(1, 40),  # seconds forward
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_no_sequence_breaks_the_cap_or_the_restart(ops: list[tuple[str, str, int, int]]) -> None:
    """Whatever happens, no product holds more seats than it has, and a start on
    what was committed sees exactly the leases (and expiries) the ledger had."""
    caps = {p.code: p.seats for p in PRODUCTS}
    harness = LocalHarness(MemoryStore())
    now = T
    ledger = harness.open(now)
    held: list[tuple[str, bytes]] = []
    for op, product, which, step in ops:
        now += step
        try:
            if op in ("claim", "wait"):
                c = claim(product, f"m{which}", instance=str(which % 2))
                result = ledger.claim(now, c, now + 30 if op == "wait" else None)
                if isinstance(result, Lease):
                    held.append((result.id, c.token_hash))
                else:
                    held.append((c.lease_id, c.token_hash))  # granted later, maybe
            elif op in ("renew", "release", "revoke") and held:
                lease_id, token = held[which % len(held)]
                if op == "renew":
                    ledger.renew(now, lease_id, token)
                elif op == "release":
                    ledger.release(now, lease_id, token)
                else:
                    ledger.revoke(now, lease_id)
            elif op == "tick":
                ledger.expire(now)
            elif op == "restart":
                harness.commit(ledger)
                before = {le.id: le.expires_at for le in ledger.leases() if le.expires_at > now}
                ledger = harness.open(now)
                assert {le.id: le.expires_at for le in ledger.leases()} == before
        except FloatdError:
            pass
        ledger.take_woken()
        ledger.take_expired()
        for code, cap in caps.items():
            assert cap is None or ledger.used(code) <= cap
        assert isinstance(ledger, LocalLedger)
        ledger.check_invariants()
