"""The SQLite store and the pure helpers of crash recovery."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest

from floatd.core.changes import (
    Audit,
    DeleteLease,
    PutLease,
    SetExpiry,
    SetMeta,
    audit_fields,
    coalesce,
    extend_after_crash,
)
from floatd.core.codec import pack
from floatd.core.seats import Lease, hash_token
from floatd.errors import StoreError
from floatd.store.sqlite import SQLiteLeaseStore, _encoded_audit

_n = itertools.count()


def lease(expires_at: float = 100.0, duration: float = 60.0, **kw: object) -> Lease:
    n = next(_n)
    fields: dict[str, object] = dict(
        id=f"L{n}",
        token_hash=hash_token(f"t{n}"),
        product="app",
        seat=("fp", "i"),
        fingerprint="fp",
        instance="i",
        user=None,
        hostname="h",
        meta={"k": "v"},
        peer="127.0.0.1",
        granted_at=expires_at - duration,
        expires_at=expires_at,
        duration=duration,
    )
    fields.update(kw)
    return Lease(**fields)  # type: ignore[arg-type]


def test_round_trip_and_meta(tmp_path: Path) -> None:
    store = SQLiteLeaseStore(tmp_path / "db.sqlite3")
    a, b = lease(), lease(user="alice", instance=None, seat=("fp", "alice"))
    store.apply([PutLease(a), PutLease(b), SetMeta("k", "v1")])
    store.apply([SetExpiry(a.id, 500.0), SetMeta("k", "v2")])
    store.close()
    again = SQLiteLeaseStore(tmp_path / "db.sqlite3")
    loaded = {le.id: le for le in again.load_leases()}
    assert loaded[a.id].expires_at == 500.0 and loaded[a.id].seat == ("fp", "i")
    assert dataclasses.asdict(loaded[b.id]) == dataclasses.asdict(b)  # every field survives
    assert again.load_meta() == {"k": "v2"}
    # After a reopen the store still finds leases by id for updates and deletes,
    # and new leases do not collide with old rows.
    c = lease()
    again.apply([SetExpiry(b.id, 777.0), DeleteLease(a.id), PutLease(c)])
    loaded = {le.id: le for le in again.load_leases()}
    assert set(loaded) == {b.id, c.id} and loaded[b.id].expires_at == 777.0
    b.expires_at = 888.0
    again.apply([PutLease(b)])  # writing a known lease again replaces its row
    assert again._db.execute("SELECT count(*) FROM leases WHERE id=?", (b.id,)).fetchone() == (1,)
    assert {le.id: le.expires_at for le in again.load_leases()}[b.id] == 888.0


def test_large_batches_are_chunked(tmp_path: Path) -> None:
    store = SQLiteLeaseStore(tmp_path / "db.sqlite3")
    leases = [lease(expires_at=float(i)) for i in range(1, 1001)]
    store.apply([PutLease(le) for le in leases])
    store.apply([SetExpiry(le.id, 5000.0 + i) for i, le in enumerate(leases)])
    store.apply([DeleteLease(le.id) for le in leases[:450]])
    loaded = {le.id: le.expires_at for le in store.load_leases()}
    assert len(loaded) == 550
    assert all(loaded[le.id] == 5000.0 + i for i, le in enumerate(leases) if i >= 450)


def test_failed_batch_changes_nothing(tmp_path: Path) -> None:
    store = SQLiteLeaseStore(tmp_path / "db.sqlite3")
    a = lease()
    store.apply([PutLease(a)])
    store._db.execute(
        "CREATE TRIGGER boom BEFORE DELETE ON leases BEGIN SELECT RAISE(ABORT, 'no'); END"
    )
    with pytest.raises(StoreError):
        store.apply([PutLease(lease()), DeleteLease(a.id)])
    assert [le.id for le in store.load_leases()] == [a.id]
    store._db.execute("DROP TRIGGER boom")
    store.apply([SetExpiry(a.id, 9.0), PutLease(b := lease())])  # the map was not disturbed
    assert {le.id: le.expires_at for le in store.load_leases()} == {a.id: 9.0, b.id: b.expires_at}


def test_unwritable_state_dir_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError):
        SQLiteLeaseStore(blocker / "sub" / "db.sqlite3")


def test_coalesce_keeps_the_net_effect() -> None:
    a, b, c = lease(), lease(), lease()
    net = coalesce(
        [
            PutLease(a),
            SetExpiry(a.id, 9.0),
            PutLease(b),
            DeleteLease(b.id),
            SetExpiry(c.id, 1.0),
            SetExpiry(c.id, 2.0),
            SetMeta("x", "1"),
            SetMeta("x", "2"),
        ]
    )
    assert net.puts == {a.id: a} and net.expiries == {c.id: 2.0}
    assert net.deletes == {b.id} and net.meta == {"x": "2"}


def test_extend_after_crash_bounds() -> None:
    dead = lease(expires_at=99.0)  # already expired at the last commit: no renewal possible
    alive = lease(expires_at=150.0, duration=60.0)
    far = lease(expires_at=1000.0, duration=60.0)  # already beyond the bound
    extended = extend_after_crash([dead, alive, far], last_cut=100.0, window=5.0)
    assert extended == [alive]
    assert dead.expires_at == 99.0 and far.expires_at == 1000.0
    assert alive.expires_at == 100.0 + 5.0 + 60.0


def test_an_audit_record_crosses_to_the_writer_in_its_own_order() -> None:
    """The writer turns the record, sent as a plain tuple, into its table's
    columns by position: a field added or moved in Audit must move there too."""
    record = Audit(
        1.5, "refused", "cad", "L1", "fp-0001", "i1", "ann", "host", "10.0.0.1:5",
        "NO_FREE_SEATS", ("fp-0001", "i1"), 1.0, True, 7, "max",
    )  # fmt: skip
    fields = audit_fields(record)
    assert _encoded_audit(tuple(record)) == (*fields[:10], pack(fields[10]), *fields[11:])
