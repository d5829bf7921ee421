"""Durable lease state behind a narrow interface.

The server calls ``load_leases`` and ``load_meta`` once at start and then only
``apply`` with a batch of changes, in order, one transaction per batch.  That
is the whole contract a backend has to meet, which keeps a shared PostgreSQL
backend for several floatd nodes a drop-in later.  Everything here is
blocking; the trio side (:mod:`floatd.daemon.committer`) runs it in a worker thread.

Lease rows keep the seat key and client metadata as msgpack blobs: they are
packed when a batch's rows are prepared, which under ``floatd serve`` happens
on the event loop (see :func:`prepare`), and msgpack is several times cheaper
than JSON there.

SQLite runs in WAL mode with ``synchronous=FULL``: a commit is on disk when
``apply`` returns, and the group commit in front of it pays one fsync per batch
rather than one per request.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import msgpack

from floatd.core.changes import (
    Change,
    coalesce,
)
from floatd.core.codec import pack
from floatd.core.records import NO_META
from floatd.core.seats import Lease
from floatd.errors import StoreError


class LeaseStore(Protocol):
    def load_leases(self) -> list[Lease]: ...

    def load_meta(self) -> dict[str, str]: ...

    def apply(self, changes: Sequence[Change]) -> None: ...

    def check_identity(self) -> None:
        """StoreError if the durable state is no longer where it was (a database
        file deleted or replaced while running: floatd.store.identity)."""

    def renders_lease_lines(self) -> bool:
        """Whether the store logs the lease events it commits (from their audit
        records), so the service need not (see floatd.store.writer)."""
        ...

    def close(self) -> None: ...


_MIGRATIONS = [
    """
    CREATE TABLE leases (
        row INTEGER PRIMARY KEY,
        id TEXT NOT NULL,
        token_hash BLOB NOT NULL,
        product TEXT NOT NULL,
        seat BLOB NOT NULL,
        fingerprint TEXT NOT NULL,
        instance TEXT,
        user TEXT,
        hostname TEXT,
        meta BLOB NOT NULL,
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
    """
    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
    # The audit trail.  Only ts is indexed: it grows in time order, so the index
    # appends, and reads (floatd audit, floatd report, pruning) all go by time.
    """
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        event TEXT NOT NULL,
        product TEXT,
        lease TEXT,
        fingerprint TEXT,
        instance TEXT,
        user TEXT,
        hostname TEXT,
        peer TEXT,
        code TEXT,
        seat BLOB,
        granted_at REAL
    );
    CREATE INDEX audit_ts ON audit (ts);
    """,
    # License users of user-authorized products, assigned on this server, and
    # the password of any license user (the authority never sends passwords).
    """
    CREATE TABLE license_users (
        email TEXT PRIMARY KEY,
        password_hash TEXT,
        updated_at REAL NOT NULL
    );
    CREATE TABLE user_products (
        email TEXT NOT NULL,
        product TEXT NOT NULL,
        PRIMARY KEY (email, product)
    );
    """,
    # Refusals of a flood are folded into one record with their number.
    """
    ALTER TABLE audit ADD COLUMN repeats INTEGER;
    """,
    # The kind of site-policy rule behind a POLICY_DENIED refusal.
    """
    ALTER TABLE audit ADD COLUMN rule TEXT;
    """,
    # Leases borrowed for offline use end at a date their certificate carries.
    """
    ALTER TABLE leases ADD COLUMN borrowed INTEGER NOT NULL DEFAULT 0;
    """,
]

AUDIT_COLUMNS = (
    "ts",
    "event",
    "product",
    "lease",
    "fingerprint",
    "instance",
    "user",
    "hostname",
    "peer",
    "code",
    "seat",
    "granted_at",
    "repeats",
    "rule",
)

# Leases are stored by an integer row number the store assigns in order, not by
# their random id: inserts then append to the table's last pages, and no index on
# the id has to be kept.  With a random TEXT key every insert dirtied its own
# index page, so a commit of N grants copied about N pages into the WAL.  The
# id -> row map lives in the store (the writer's side); the id is only read
# back when the leases are loaded at start.
#
# Rows per statement.  One multi-row statement is one sqlite3_step, so the
# worker thread trades the GIL with the busy event loop a handful of times per
# batch instead of once per lease; per-row statements made commits several
# times slower under load.
_CHUNK = 200


def migrate(db: sqlite3.Connection, migrations: Sequence[str]) -> None:
    """Bring a database up to date: ``PRAGMA user_version`` counts the scripts
    already applied, and each further one runs in its own transaction."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    for number, script in enumerate(migrations[version:], start=version + 1):
        db.executescript(f"BEGIN IMMEDIATE; {script}; PRAGMA user_version={number}; COMMIT;")


def make_private(directory: Path) -> None:
    """The state dir as 0700 and the files in it as 0600, whatever the umask
    was when they were made: it holds the entitlement, password hashes and
    everything an attacker on the LAN would like to read or replace.  (The
    CLIs also run under umask 077, so files made later are private too.)"""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    for entry in os.scandir(directory):
        if entry.is_file(follow_symlinks=False):
            os.chmod(entry.path, 0o600)


def open_database(path: Path) -> sqlite3.Connection:
    """Open (and migrate) the state database; used by the daemon and the CLI."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        db = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=10, cached_statements=1024
        )
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        migrate(db, _MIGRATIONS)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open state database {path}: {exc}") from None
    except OSError as exc:
        raise StoreError(f"cannot create state directory {path.parent}: {exc.strerror}") from None
    return db


_EMPTY_MAP = msgpack.packb({})

#: For fault tests of the real process only: while the file this names exists,
#: every write fails as a failing disk's would.  Unset, it costs nothing.
_FAULT_FILE = os.environ.get("FLOATD_TEST_WRITE_FAULT") or None


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _chunks(items: list[Any]) -> Iterator[list[Any]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _row(lease: Lease) -> tuple[object, ...]:
    """A lease as it crosses to the writer: the seat and the metadata still as
    values; :func:`_encoded` packs them there, off the server's event loop."""
    return (
        lease.id,
        lease.token_hash,
        lease.product,
        lease.seat,
        lease.fingerprint,
        lease.instance,
        lease.user,
        lease.hostname,
        dict(lease.meta) if lease.meta else None,
        lease.peer,
        lease.granted_at,
        lease.expires_at,
        lease.duration,
        int(lease.borrowed),
    )


def _encoded(row: Sequence[Any]) -> tuple[object, ...]:
    """A lease row of :func:`_row` as the leases table holds it (the id first)."""
    meta = row[8]
    return (*row[:3], pack(row[3]), *row[4:8], pack(meta) if meta else _EMPTY_MAP, *row[9:])


def _encoded_audit(record: Sequence[Any]) -> tuple[object, ...]:
    """An :class:`~floatd.core.changes.Audit` record, as it crossed to the writer
    (a tuple in the record's own order, which msgpack keeps), made the row its
    table holds: the columns of :func:`~floatd.core.changes.audit_fields`."""
    seat = record[10]
    return (*record[:10], None if seat is None else pack(seat), record[11], *record[13:15])


class WriteSet(NamedTuple):
    """A batch reduced to plain rows: what a backend writes, and what crosses
    the pipe to the writer process (:mod:`floatd.store.writer`) as msgpack."""

    deletes: list[str]
    puts: list[tuple[Any, ...]]  # lease rows (_row), the id first
    expiries: list[tuple[str, float]]
    audit: list[Any]  # Audit records (or, past the pipe, tuples in their order)
    meta: list[tuple[str, str]]
    prune: tuple[float, int] | None
    log: list[int]  # the audit rows whose lease event lines the writer renders


def prepare(changes: Iterable[Change]) -> WriteSet:
    """Coalesce ``changes`` and turn them into rows.  This reads the live lease
    objects, so it runs when the batch is cut, never later than the commit."""
    net = coalesce(changes)
    return WriteSet(
        deletes=list(net.deletes),
        puts=[_row(lease) for lease in net.puts.values()],
        expiries=list(net.expiries.items()),
        audit=net.audit,
        meta=list(net.meta.items()),
        prune=None if net.prune is None else (net.prune.before, net.prune.limit),
        log=[i for i, record in enumerate(net.audit) if record.log],
    )


class SQLiteLeaseStore:
    """The single-node backend.  Callers serialise access (one writer)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._db = open_database(path)
        # The id -> row map is built on the first write: a store that only
        # loads (the server's side of the writer process) never needs it.
        self._row_map: dict[str, int] | None = None
        self._next_row = 1

    @property
    def _rows(self) -> dict[str, int]:
        if self._row_map is None:
            self._row_map = dict(self._db.execute("SELECT id, row FROM leases"))
            last = self._db.execute("SELECT max(row) FROM leases").fetchone()[0]
            self._next_row = (last or 0) + 1
        return self._row_map

    def check(self) -> None:
        """SQLite's quick integrity check: a damaged file is refused at start with
        one line, not met later as a traceback in the middle of serving."""
        try:
            problems = [row[0] for row in self._db.execute("PRAGMA quick_check")]
        except sqlite3.Error as exc:
            problems = [str(exc)]
        if problems != ["ok"]:
            raise StoreError(
                f"the state database {self._path} is damaged ({problems[0][:200]}): restore it"
                " from a backup, or run `floatd state reset` to start empty"
            )

    def load_leases(self) -> list[Lease]:
        try:
            return self._load_leases()
        except (sqlite3.Error, ValueError, TypeError) as exc:
            raise StoreError(f"cannot read the leases in {self._path}: {exc}") from None

    def _load_leases(self) -> list[Lease]:
        rows = self._db.execute(
            "SELECT id, token_hash, product, seat, fingerprint, instance, user, hostname,"
            " meta, peer, granted_at, expires_at, duration, borrowed FROM leases"
        ).fetchall()
        return [
            Lease(
                id=r[0],
                token_hash=bytes(r[1]),
                product=r[2],
                seat=tuple(msgpack.unpackb(r[3])),
                fingerprint=r[4],
                instance=r[5],
                user=r[6],
                hostname=r[7],
                meta=msgpack.unpackb(r[8]) if r[8] != _EMPTY_MAP else NO_META,
                peer=r[9],
                granted_at=r[10],
                expires_at=r[11],
                duration=r[12],
                borrowed=bool(r[13]),
            )
            for r in rows
        ]

    def load_meta(self) -> dict[str, str]:
        try:
            return dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read {self._path}: {exc}") from None

    def check_identity(self) -> None:
        return None  # the writer process's store watches the file

    def apply(self, changes: Sequence[Change]) -> None:
        self.write(prepare(changes))

    def write(self, ws: WriteSet) -> None:
        """Commit one prepared batch as one transaction."""
        if _FAULT_FILE is not None and os.path.exists(_FAULT_FILE):
            raise StoreError("state database write failed: injected fault (disk I/O error)")
        rows = self._rows
        db = self._db
        gone = [rows[i] for i in ws.deletes if i in rows]
        # Row numbers for new leases, committed to the map only if the batch is.
        fresh: dict[str, int] = {}
        for put in ws.puts:
            lease_id = put[0]
            if lease_id not in rows and lease_id not in fresh:
                fresh[lease_id] = self._next_row + len(fresh)
        updates = [(rows[i], e) for i, e in ws.expiries if i in rows]
        # Encoded before the transaction: a malformed row fails here, with
        # nothing begun.
        puts = [(rows.get(put[0]) or fresh[put[0]], *_encoded(put)) for put in ws.puts]
        audit = [_encoded_audit(record) for record in ws.audit]
        try:
            db.execute("BEGIN")
            for chunk in _chunks(sorted(gone)):
                db.execute(f"DELETE FROM leases WHERE row IN ({_marks(len(chunk))})", chunk)
            row = "(" + _marks(15) + ")"
            for chunk in _chunks(puts):
                db.execute(
                    f"INSERT OR REPLACE INTO leases VALUES {','.join([row] * len(chunk))}",
                    [v for put in chunk for v in put],
                )
            for items in _chunks(updates):
                whens = " ".join(["WHEN ? THEN ?"] * len(items))
                db.execute(
                    f"UPDATE leases SET expires_at = CASE row {whens} END"
                    f" WHERE row IN ({_marks(len(items))})",
                    [v for pair in items for v in pair] + [r for r, _ in items],
                )
            arow = "(" + _marks(len(AUDIT_COLUMNS)) + ")"
            for records in _chunks(audit):
                db.execute(
                    f"INSERT INTO audit ({','.join(AUDIT_COLUMNS)})"
                    f" VALUES {','.join([arow] * len(records))}",
                    [v for record in records for v in record],
                )
            if ws.prune is not None:
                db.execute(
                    "DELETE FROM audit WHERE seq IN"
                    " (SELECT seq FROM audit WHERE ts < ? ORDER BY ts LIMIT ?)",
                    tuple(ws.prune),
                )
            if ws.meta:
                db.execute(
                    f"INSERT OR REPLACE INTO meta VALUES {','.join(['(?,?)'] * len(ws.meta))}",
                    [v for pair in ws.meta for v in pair],
                )
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise StoreError(f"state database write failed: {exc}") from None
        for lease_id in ws.deletes:
            rows.pop(lease_id, None)
        rows.update(fresh)
        self._next_row += len(fresh)

    def renders_lease_lines(self) -> bool:
        return False

    def close(self) -> None:
        self._db.close()
