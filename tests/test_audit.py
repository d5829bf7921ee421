"""The audit trail in the SQLite store, and reading it back for audit and report."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from test_store import lease

from floatd.core.changes import Audit, DeleteLease, PruneAudit, PutLease
from floatd.core.outcomes import audit_record
from floatd.errors import StoreError
from floatd.store.audit import (
    lease_intervals,
    open_readonly,
    read_audit,
    seat_refusals,
)
from floatd.store.sqlite import SQLiteLeaseStore


def test_records_commit_with_their_change_and_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    store = SQLiteLeaseStore(path)
    a = lease(expires_at=200.0, duration=60.0)
    store.apply([PutLease(a), audit_record("granted", a, 140.0)])
    store.apply([DeleteLease(a.id), audit_record("released", a, 150.0)])
    store.apply([Audit(151.0, "refused", "app", fingerprint="fp", code="NO_FREE_SEATS")])
    store.close()
    db = open_readonly(path)
    records = list(read_audit(db, since=0))
    assert [(r.ts, r.event, r.lease, r.code) for r in records] == [
        (140.0, "granted", a.id, None),
        (150.0, "released", a.id, None),
        (151.0, "refused", None, "NO_FREE_SEATS"),
    ]
    assert records[0].to_json()["address"] == "127.0.0.1"
    assert [r.event for r in read_audit(db, since=145.0, until=151.0)] == ["released"]
    assert [r.event for r in read_audit(db, 0, events=("refused",))] == ["refused"]
    assert list(read_audit(db, 0, product="other")) == []
    # The newest two, in time order.
    assert [r.ts for r in read_audit(db, 0, limit=2)] == [150.0, 151.0]
    with pytest.raises(sqlite3.OperationalError):  # read-only: the CLI cannot disturb the daemon
        db.execute("DELETE FROM audit")


def test_a_lease_event_record_holds_each_field_in_its_place() -> None:
    """audit_record builds its tuple positionally (every grant and renewal
    makes one): each of the lease's fields must land in the field that names it."""
    a = lease(
        expires_at=200.0,
        duration=60.0,
        fingerprint="fp-1",
        instance="inst-1",
        user="alice",
        hostname="host-1",
        peer="10.0.0.9",
        seat=("fp-1", "inst-1"),
    )
    assert audit_record("renewed", a, 150.0, log=True) == Audit(
        ts=150.0,
        event="renewed",
        product=a.product,
        lease=a.id,
        fingerprint=a.fingerprint,
        instance=a.instance,
        user=a.user,
        hostname=a.hostname,
        peer=a.peer,
        seat=a.seat,
        granted_at=a.granted_at,
        log=True,
    )


def test_a_failed_batch_writes_no_audit_record_either(tmp_path: Path) -> None:
    store = SQLiteLeaseStore(tmp_path / "db.sqlite3")
    a = lease()
    store._db.execute(
        "CREATE TRIGGER boom BEFORE INSERT ON leases BEGIN SELECT RAISE(ABORT, 'no'); END"
    )
    with pytest.raises(StoreError):
        store.apply([PutLease(a), audit_record("granted", a, 1.0)])
    assert store._db.execute("SELECT count(*) FROM audit").fetchone() == (0,)


def test_prune_drops_only_old_records_and_at_most_its_limit(tmp_path: Path) -> None:
    store = SQLiteLeaseStore(tmp_path / "db.sqlite3")
    store.apply([Audit(float(t), "refused", "app", code="X") for t in range(100)])
    store.apply([PruneAudit(before=50.0, limit=30)])
    left = [r[0] for r in store._db.execute("SELECT ts FROM audit ORDER BY ts")]
    assert left == [float(t) for t in range(30, 100)]  # the oldest went first
    store.apply([PruneAudit(before=50.0)])
    assert store._db.execute("SELECT min(ts), count(*) FROM audit").fetchone() == (50.0, 50)


def test_intervals_come_from_end_records_and_from_leases_still_held(tmp_path: Path) -> None:
    store = SQLiteLeaseStore(tmp_path / "db.sqlite3")
    # Granted long before the report and released inside it: found by its end record.
    old = lease(expires_at=1000.0, duration=60.0, granted_at=10.0, seat=("m1",))
    # Ended before the report: not in it.
    gone = lease(expires_at=1000.0, duration=60.0, granted_at=20.0, seat=("m2",))
    # Still held: from the leases table, ending now (or at its expiry if sooner).
    held = lease(expires_at=5000.0, duration=60.0, granted_at=300.0, seat=("m3",))
    stale = lease(expires_at=700.0, duration=60.0, granted_at=400.0, seat=("m4",))
    store.apply([PutLease(x) for x in (old, gone, held, stale)])
    store.apply([DeleteLease(old.id), audit_record("released", old, 600.0)])
    store.apply([DeleteLease(gone.id), audit_record("expired", gone, 90.0)])
    store.apply([Audit(650.0, "refused", "app", code="NO_FREE_SEATS")])
    store.apply([Audit(660.0, "refused", "app", code="AUTH_FAILED")])
    db = open_readonly(tmp_path / "db.sqlite3")
    got = {iv.seat: (iv.start, iv.end) for iv in lease_intervals(db, 500.0, 2000.0, now=900.0)}
    assert got == {("m1",): (10.0, 600.0), ("m3",): (300.0, 900.0), ("m4",): (400.0, 700.0)}
    assert seat_refusals(db, 500.0, 2000.0) == [(650.0, "app", 1)]


def test_open_readonly_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no state database"):
        open_readonly(tmp_path / "missing.sqlite3")
    old = tmp_path / "old.sqlite3"
    sqlite3.connect(old).execute("PRAGMA user_version=2").connection.close()
    with pytest.raises(StoreError, match="no audit trail"):
        open_readonly(old)
