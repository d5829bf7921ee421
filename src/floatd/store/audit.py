"""Reading the audit trail back: what ``floatd audit`` and ``floatd report`` see.

The daemon writes audit records in the same transaction as the lease changes
they describe (:class:`floatd.core.changes.Audit`).  This side only reads, through a
read-only connection, so it works whether the daemon runs or not and can never
disturb it: SQLite's WAL lets readers and the one writer proceed side by side.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgpack

from floatd.core.report import Interval
from floatd.errors import StoreError

AUDIT_EVENTS = (
    "granted",
    "renewed",
    "released",
    "expired",
    "revoked",
    "refused",
    "clock_reset",
    "borrowed",
    "returned",
)
#: What ends a seat tenancy (a borrowed lease's end is its expiry or its return).
END_EVENTS = ("released", "expired", "revoked", "returned")
NO_FREE_SEATS = "NO_FREE_SEATS"

_RELATIVE = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(text: str, now: float, *, ahead: bool = False) -> float:
    """A point in time from the command line: an ISO date or date-time (UTC
    unless it names an offset), or a span such as ``90m``, ``24h``, ``7d``:
    that long ago (an age, for audit and report), or from now with ``ahead``
    (an expiry or an effective date)."""
    text = text.strip()
    match = _RELATIVE.match(text)
    if match:
        span = int(match.group(1)) * _UNITS[match.group(2)]
        return now + span if ahead else now - span
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is not a date (2026-11-01, 2026-11-01T08:00, ...) or an age (7d, 24h)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def iso(ts: float | None) -> str | None:
    """An ISO 8601 UTC time; one past what a date can hold (a signed duration of
    2**40 s, say) shows as the last or first second a date can, never raises."""
    if ts is None:
        return None
    try:
        when = datetime.fromtimestamp(ts, UTC)
    except (OverflowError, ValueError, OSError):
        when = datetime.max.replace(tzinfo=UTC) if ts > 0 else datetime.min.replace(tzinfo=UTC)
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Trail:
    """Where the audit trail is read from: the single server's SQLite state, or
    a cluster's PostgreSQL database (floatd.store.cluster), whose tables differ
    in name, placeholder and seat encoding only."""

    db: Any
    mark: str = "?"
    audit: str = "audit"
    leases: str = "leases"
    user: str = "user"
    seats_packed: bool = True
    #: What the database's driver raises (psycopg's only imported for a
    #: cluster's trail: every ``floatd`` command loads this module).
    errors: tuple[type[Exception], ...] = (sqlite3.Error,)

    def sql(self, text: str) -> str:
        """``text`` written for SQLite, for this database."""
        return (
            text.replace(" audit", f" {self.audit}")
            .replace(" leases", f" {self.leases}")
            .replace("user,", f"{self.user},")
            .replace("?", self.mark)
        )

    def seat(self, value: Any, lease: str) -> tuple[str, ...]:
        if value is None:
            return (lease,)
        return tuple(msgpack.unpackb(value)) if self.seats_packed else tuple(value)


def cluster_trail(conn: Any) -> Trail:
    """The audit trail of a cluster's database (its floatd_audit table)."""
    import psycopg

    return Trail(conn, "%s", "floatd_audit", "floatd_leases", "user_name", False, (psycopg.Error,))


def _as_trail(db: Any) -> Trail:
    return db if isinstance(db, Trail) else Trail(db)


def open_readonly(database: Path) -> sqlite3.Connection:
    """A read-only connection to the state database, refusing one that is
    missing or older than the audit trail."""
    if not database.exists():
        raise StoreError(f"no state database at {database} (has floatd run with this config?)")
    try:
        db = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
        version = db.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read state database {database}: {exc}") from None
    if version < 3:
        db.close()
        raise StoreError(f"state database {database} has no audit trail yet; start floatd once")
    return db


@dataclass(frozen=True, slots=True)
class AuditEntry:
    ts: float
    event: str
    product: str | None
    lease: str | None
    fingerprint: str | None
    instance: str | None
    user: str | None
    hostname: str | None
    peer: str | None
    code: str | None
    count: int = 1  # refusals of a flood folded into one record
    rule: str | None = None  # the policy rule behind a POLICY_DENIED

    def to_json(self) -> dict[str, Any]:
        return {
            "time": iso(self.ts),
            "ts": self.ts,
            "event": self.event,
            "product": self.product,
            "lease": self.lease,
            "fingerprint": self.fingerprint,
            "instance": self.instance,
            "user": self.user,
            "hostname": self.hostname,
            "address": self.peer,
            "code": self.code,
            "count": self.count,
            "rule": self.rule,
        }


def read_audit(
    db: sqlite3.Connection | Trail,
    since: float,
    until: float | None = None,
    product: str | None = None,
    events: tuple[str, ...] = AUDIT_EVENTS,
    limit: int | None = None,
) -> Iterator[AuditEntry]:
    """Records in time order; with ``limit``, the newest ``limit`` of them (the
    ones an admin asking for "the last N" means).  A generator, so a long
    audit streams out."""
    trail = _as_trail(db)
    sql = (
        "SELECT ts, event, product, lease, fingerprint, instance, user, hostname, peer, code,"
        " coalesce(repeats, 1), rule"
        f" FROM audit WHERE ts >= ? AND event IN ({','.join('?' * len(events))})"
    )
    args: list[Any] = [since, *events]
    if until is not None:
        sql += " AND ts < ?"
        args.append(until)
    if product is not None:
        sql += " AND product = ?"
        args.append(product)
    if limit is not None:
        sql += " ORDER BY ts DESC, seq DESC LIMIT ?"
        args.append(limit)
    else:
        sql += " ORDER BY ts, seq"
    try:
        rows = trail.db.execute(trail.sql(sql), args)
        for row in reversed(rows.fetchall()) if limit is not None else rows:
            yield AuditEntry(*row)
    except trail.errors as exc:
        raise StoreError(f"cannot read the audit trail: {exc}") from None


def lease_intervals(
    db: sqlite3.Connection | Trail, since: float, until: float, now: float
) -> list[Interval]:
    """Every seat tenancy that overlaps ``[since, until)``.

    An ended lease is rebuilt from its end record alone (which carries
    ``granted_at``), so a lease held for months still shows up in a one-day
    report.  Leases still held come from the leases table, ending at their
    expiry or now, whichever is first.
    """
    trail = _as_trail(db)
    out: dict[str, Interval] = {}
    try:
        rows = trail.db.execute(
            trail.sql(
                "SELECT lease, product, seat, user, fingerprint, granted_at, ts FROM audit"
                f" WHERE ts >= ? AND event IN ({','.join('?' * len(END_EVENTS))})"
                " AND granted_at < ?"
            ),
            (since, *END_EVENTS, until),
        ).fetchall()
        held = trail.db.execute(
            trail.sql(
                "SELECT id, product, seat, user, fingerprint, granted_at, expires_at FROM leases"
                " WHERE granted_at < ?"
            ),
            (until,),
        ).fetchall()
    except trail.errors as exc:
        raise StoreError(f"cannot read the audit trail: {exc}") from None
    for lease, product, seat, user, fingerprint, granted_at, ended in rows:
        interval = Interval(product, trail.seat(seat, lease), granted_at, ended, user, fingerprint)
        out[lease] = interval
    for lease, product, seat, user, fingerprint, granted_at, expires_at in held:
        end = min(expires_at, now)
        if lease not in out and end >= since:  # an end record, if written, wins
            seat_key = trail.seat(seat, lease)
            out[lease] = Interval(product, seat_key, granted_at, end, user, fingerprint)
    return list(out.values())


def seat_refusals(
    db: sqlite3.Connection | Trail, since: float, until: float
) -> list[tuple[float, str, int]]:
    """``(time, product, how many)`` of the acquires refused for want of a seat."""
    trail = _as_trail(db)
    try:
        return [
            (ts, product, count)
            for ts, product, count in trail.db.execute(
                trail.sql(
                    "SELECT ts, product, coalesce(repeats, 1) FROM audit WHERE ts >= ?"
                    " AND ts < ? AND event = 'refused' AND code = ?"
                ),
                (since, until, NO_FREE_SEATS),
            )
        ]
    except trail.errors as exc:
        raise StoreError(f"cannot read the audit trail: {exc}") from None


def first_record(db: sqlite3.Connection) -> float | None:
    row = db.execute("SELECT min(ts) FROM audit").fetchone()
    return None if row is None else row[0]
