"""The cluster ledger's reads: counts, terms, leases and the next deadline,
from this transaction's copies when it has them (what it decided is not
committed yet) or the node's kept copies when they are current, else from
the database.  Every read holds the ledger's mutex, so one never runs beside
another thread's transaction.  A mixin of floatd.store.pg_ledger.PgLedger,
which provides what is declared here."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

import psycopg

from floatd.core.ledger import LocalLedger
from floatd.core.seats import Lease, PoolProduct
from floatd.store.pg_changes import Follower
from floatd.store.pg_rows import LEASE_COLUMNS, Conn, Transaction, failed, lease_of, locked


class LedgerReads:
    _conn: Conn
    _mutex: threading.RLock
    _tx: Transaction | None
    _follow: Follower

    def _loaded(self, product: str) -> LocalLedger | None:
        tx = self._tx
        return tx.copies.get(product) if tx is not None else None

    def _current(self, product: str) -> LocalLedger | None:
        """A copy of ``product`` that is the database's state right now, to
        read (never to decide) from: this transaction's, or the kept one if no
        node has written since (one indexed read, not a read of every lease)."""
        copy = self._loaded(product)
        if copy is not None or self._tx is not None:
            return copy
        kept = self._follow.copies.get(product)
        if kept is None:
            return None
        version = self._one("SELECT version FROM floatd_ledger WHERE id = 1")
        return kept if version == self._follow.version else None

    @locked
    def _one(self, sql: str, *args: object) -> Any:
        try:
            row = self._conn.execute(sql, args).fetchone()
        except psycopg.Error as exc:
            raise failed(exc) from None
        return row[0] if row is not None else None

    @locked
    def next_deadline(self) -> float | None:
        value = self._one(
            "SELECT least((SELECT min(expires_at) FROM floatd_leases),"
            " (SELECT min(deadline) FROM floatd_waiters WHERE NOT done))"
        )
        return float(value) if value is not None else None

    def _terms(self, product: str) -> PoolProduct | None:
        row = self._conn.execute(
            "SELECT code, seats, duration, strategy, user_locked FROM floatd_products"
            " WHERE code = %s AND active",
            (product,),
        ).fetchone()
        return PoolProduct(*row) if row is not None else None

    @locked
    def terms(self, product: str) -> PoolProduct | None:
        copy = self._loaded(product)
        if copy is not None:
            return copy.terms(product)
        try:
            return self._terms(product)
        except psycopg.Error as exc:
            raise failed(exc) from None

    @locked
    def _count(self, product: str, copied: Callable[[LocalLedger], int], sql: str) -> int:
        """A count from a current copy of ``product`` if there is one (this
        transaction's holds what it decided and has not committed), else from
        the database."""
        copy = self._current(product)
        return copied(copy) if copy is not None else int(self._one(sql, product))

    def used(self, product: str) -> int:
        return self._count(
            product,
            lambda copy: copy.used(product),
            "SELECT count(DISTINCT seat) FROM floatd_leases WHERE product = %s",
        )

    def waiting(self, product: str) -> int:
        return self._count(
            product,
            lambda copy: copy.waiting(product),
            "SELECT count(*) FROM floatd_waiters WHERE product = %s AND NOT done",
        )

    def borrowed(self, product: str) -> int:
        return self._count(
            product,
            lambda copy: copy.borrowed(product),
            "SELECT count(DISTINCT seat) FROM floatd_leases WHERE product = %s AND borrowed",
        )

    def _read_lease(self, lease_id: str) -> Lease | None:
        row = self._conn.execute(
            f"SELECT {LEASE_COLUMNS} FROM floatd_leases WHERE id = %s", (lease_id,)
        ).fetchone()
        return lease_of(row) if row is not None else None

    @locked
    def lease(self, lease_id: str) -> Lease | None:
        tx = self._tx
        if tx is not None:
            for copy in tx.copies.values():
                held = copy.lease(lease_id)
                if held is not None:
                    return held
        try:
            return self._read_lease(lease_id)
        except psycopg.Error as exc:
            raise failed(exc) from None

    @locked
    def leases(self) -> Iterable[Lease]:
        try:
            rows = self._conn.execute(
                f"SELECT {LEASE_COLUMNS} FROM floatd_leases ORDER BY granted_at, id"
            ).fetchall()
        except psycopg.Error as exc:
            raise failed(exc) from None
        return [lease_of(row) for row in rows]

    def __len__(self) -> int:
        return int(self._one("SELECT count(*) FROM floatd_leases"))
