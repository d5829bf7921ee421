"""Durable lease state behind a narrow interface.

The server only ever calls ``load_leases`` once at start and ``apply`` with a
batch of changes, in order, one transaction per batch.  That is the whole
contract a backend has to meet, which keeps a shared PostgreSQL backend for
several floatd nodes a drop-in later.  Everything here is blocking; the trio
side (:mod:`floatd.committer`) runs it in a worker thread.

SQLite runs in WAL mode with ``synchronous=FULL``: a commit is on disk when
``apply`` returns, and the group commit in front of it pays one fsync per batch
rather than one per request.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from floatd.errors import StoreError
from floatd.pool import Lease


@dataclass(frozen=True, slots=True)
class PutLease:
    lease: Lease


@dataclass(frozen=True, slots=True)
class SetExpiry:
    lease_id: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class DeleteLease:
    lease_id: str


Change = PutLease | SetExpiry | DeleteLease


class LeaseStore(Protocol):
    def load_leases(self) -> list[Lease]: ...

    def apply(self, changes: Sequence[Change]) -> None: ...

    def close(self) -> None: ...


_MIGRATIONS = [
    """
    CREATE TABLE leases (
        id TEXT PRIMARY KEY,
        token_hash BLOB NOT NULL,
        product TEXT NOT NULL,
        seat TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        instance TEXT,
        user TEXT,
        hostname TEXT,
        meta TEXT NOT NULL,
        peer TEXT,
        granted_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        duration REAL NOT NULL
    );
    CREATE TABLE pending_nonces (
        nonce TEXT PRIMARY KEY,
        created_at INTEGER NOT NULL
    );
    """,
]


def open_database(path: Path) -> sqlite3.Connection:
    """Open (and migrate) the state database; used by the daemon and the CLI."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        for number, script in enumerate(_MIGRATIONS[version:], start=version + 1):
            db.executescript(f"BEGIN IMMEDIATE; {script}; PRAGMA user_version={number}; COMMIT;")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open state database {path}: {exc}") from None
    except OSError as exc:
        raise StoreError(f"cannot create state directory {path.parent}: {exc.strerror}") from None
    return db


def _row(lease: Lease) -> tuple[object, ...]:
    return (
        lease.id,
        lease.token_hash,
        lease.product,
        json.dumps(list(lease.seat)),
        lease.fingerprint,
        lease.instance,
        lease.user,
        lease.hostname,
        json.dumps(dict(lease.meta)),
        lease.peer,
        lease.granted_at,
        lease.expires_at,
        lease.duration,
    )


class SQLiteLeaseStore:
    """The single-node backend.  Callers serialise access (one writer)."""

    def __init__(self, path: Path) -> None:
        self._db = open_database(path)

    def load_leases(self) -> list[Lease]:
        rows = self._db.execute(
            "SELECT id, token_hash, product, seat, fingerprint, instance, user, hostname,"
            " meta, peer, granted_at, expires_at, duration FROM leases"
        ).fetchall()
        return [
            Lease(
                id=r[0],
                token_hash=bytes(r[1]),
                product=r[2],
                seat=tuple(json.loads(r[3])),
                fingerprint=r[4],
                instance=r[5],
                user=r[6],
                hostname=r[7],
                meta=json.loads(r[8]),
                peer=r[9],
                granted_at=r[10],
                expires_at=r[11],
                duration=r[12],
            )
            for r in rows
        ]

    def apply(self, changes: Sequence[Change]) -> None:
        db = self._db
        try:
            db.execute("BEGIN")
            for change in changes:
                if isinstance(change, SetExpiry):
                    db.execute(
                        "UPDATE leases SET expires_at=? WHERE id=?",
                        (change.expires_at, change.lease_id),
                    )
                elif isinstance(change, PutLease):
                    db.execute(
                        "INSERT OR REPLACE INTO leases VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                        _row(change.lease),
                    )
                else:
                    db.execute("DELETE FROM leases WHERE id=?", (change.lease_id,))
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise StoreError(f"state database write failed: {exc}") from None

    def delete_leases(self, lease_ids: Iterable[str]) -> None:
        self.apply([DeleteLease(i) for i in lease_ids])

    def close(self) -> None:
        self._db.close()
