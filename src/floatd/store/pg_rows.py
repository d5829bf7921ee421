"""Rows of the cluster's ledger tables (floatd.store.cluster's schema) and the
records they hold (leases, queued claims, audit records), and the plumbing of
a ledger transaction.  Kept apart from the ledger's decisions
(floatd.store.pg_ledger) so that module reads as the decisions alone."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
from psycopg.types.json import Jsonb

from floatd.core.changes import Audit, audit_fields
from floatd.core.ledger import LocalLedger
from floatd.core.seats import Claim, Lease, Waiter
from floatd.errors import Unavailable

Conn = psycopg.Connection[Any]

LEASE_COLUMNS = (
    "id, token_hash, product, seat, fingerprint, instance, user_name, hostname, meta,"
    " peer, granted_at, expires_at, duration, borrowed"
)
WAITER_COLUMNS = (
    "seq, node, lease_id, token_hash, product, fingerprint, instance, user_name, hostname,"
    " meta, peer, deadline"
)


def lease_of(row: Sequence[Any]) -> Lease:
    return Lease(
        id=row[0],
        token_hash=bytes(row[1]),
        product=row[2],
        seat=tuple(row[3]),
        fingerprint=row[4],
        instance=row[5],
        user=row[6],
        hostname=row[7],
        meta=row[8] or {},
        peer=row[9],
        granted_at=row[10],
        expires_at=row[11],
        duration=row[12],
        borrowed=row[13],
    )


def waiter_of(row: Sequence[Any]) -> Waiter:
    claim = Claim(
        product=row[4],
        fingerprint=row[5],
        lease_id=row[2],
        token_hash=bytes(row[3]),
        instance=row[6],
        user=row[7],
        hostname=row[8],
        meta=row[9] or {},
        peer=row[10],
    )
    return Waiter(claim, row[11])


def failed(exc: psycopg.Error) -> Unavailable:
    text = str(exc).strip()
    reason = text.splitlines()[0] if text else type(exc).__name__
    return Unavailable(f"the cluster database cannot be used right now ({reason}); try again")


def lease_values(le: Lease) -> list[Any]:
    """A lease's fields in the order of LEASE_COLUMNS (also a change log entry)."""
    return [
        le.id,
        le.token_hash,
        le.product,
        list(le.seat),
        le.fingerprint,
        le.instance,
        le.user,
        le.hostname,
        dict(le.meta),
        le.peer,
        le.granted_at,
        le.expires_at,
        le.duration,
        le.borrowed,
    ]


def waiter_values(waiter: Waiter, node: str) -> list[Any]:
    """A queued claim's fields in the order of WAITER_COLUMNS, less ``seq``."""
    c = waiter.claim
    return [
        node,
        c.lease_id,
        c.token_hash,
        c.product,
        c.fingerprint,
        c.instance,
        c.user,
        c.hostname,
        dict(c.meta),
        c.peer,
        waiter.deadline,
    ]


def put_lease(conn: Conn, le: Lease, node: str) -> None:
    """A lease granted, or changed as a whole (borrowed, say)."""
    values = lease_values(le)
    values[8] = Jsonb(values[8])
    conn.execute(
        f"INSERT INTO floatd_leases ({LEASE_COLUMNS}, node) VALUES"
        " (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (id) DO UPDATE SET expires_at = excluded.expires_at,"
        " duration = excluded.duration, borrowed = excluded.borrowed",
        (*values, node),
    )


def insert_waiter(conn: Conn, waiter: Waiter, node: str) -> int:
    """A waiter's row at the back of the cluster's queue; its place (``seq``)."""
    values = waiter_values(waiter, node)
    values[8] = Jsonb(values[8])
    row = conn.execute(
        f"INSERT INTO floatd_waiters ({WAITER_COLUMNS.split(', ', 1)[1]})"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING seq",
        values,
    ).fetchone()
    assert row is not None
    return int(row[0])


def write_audit(conn: Conn, records: list[Audit], node: str) -> None:
    """Audit records, written in the transaction of the decision they describe."""
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO floatd_audit (ts, event, product, lease, fingerprint, instance,"
            " user_name, hostname, peer, code, seat, granted_at, repeats, rule, node)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            [
                (*row[:10], list(a.seat) if a.seat is not None else None, *row[11:], node)
                for a in records
                for row in (audit_fields(a),)
            ],
        )


_F = TypeVar("_F", bound=Callable[..., Any])


def locked(method: _F) -> _F:
    """A read that must not run beside another thread's transaction."""

    @functools.wraps(method)
    def locked(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._mutex:
            return method(self, *args, **kwargs)

    return locked  # type: ignore[return-value]


@dataclass
class Transaction:
    """What one transaction decides on: each product's working copy."""

    copies: dict[str, LocalLedger] = field(default_factory=dict)
    locked: bool = False
    wrote: bool = False
    #: The ledger lock row's version when locked; one more once this commits.
    version: int = -1
    #: What this transaction changed, for the other nodes (floatd.store.pg_changes).
    log: list[list[Any]] = field(default_factory=list)
