"""The cluster's node registry: who is up, who serves, and the entitlement's
``nodes`` limit (cluster.md).

Every node writes its row every :data:`HEARTBEAT` seconds, dated by the
database's clock; a row older than :data:`STALE` is a node gone.  A node that
does not serve yet takes a slot when fewer than ``limit`` fresh rows serve;
one that serves keeps its slot while it beats.  Both run inside a ledger
transaction, under the ledger lock, so two nodes never take the last slot at
once.  Blocking code, on the caller's connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

HEARTBEAT = 2.0
STALE = 10.0

Conn = psycopg.Connection[Any]


@dataclass(frozen=True)
class NodeRow:
    name: str
    addresses: list[str]
    version: str
    started_at: float
    heartbeat: float
    connections: int
    serving: bool

    def as_dict(self, now: float) -> dict[str, Any]:
        return {
            "name": self.name,
            "addresses": list(self.addresses),
            "version": self.version,
            "started_at": self.started_at,
            "last_heartbeat": self.heartbeat,
            "heartbeat_age": round(max(0.0, now - self.heartbeat), 3),
            "connections": self.connections,
            "serving": self.serving and now - self.heartbeat <= STALE,
        }


def beat(conn: Conn, me: NodeRow, limit: int) -> bool:
    """Write this node's row (``me``: dated ``heartbeat``, serving or not so
    far); whether it serves from now on."""
    serving, now = me.serving, me.heartbeat
    if not serving:
        row = conn.execute(
            "SELECT count(*) FROM floatd_nodes WHERE serving AND heartbeat > %s AND name <> %s",
            (now - STALE, me.name),
        ).fetchone()
        serving = row is not None and int(row[0]) < limit
    conn.execute(
        "INSERT INTO floatd_nodes VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (name) DO"
        " UPDATE SET addresses = excluded.addresses, version = excluded.version,"
        " started_at = excluded.started_at, heartbeat = excluded.heartbeat,"
        " connections = excluded.connections, serving = excluded.serving",
        (me.name, me.addresses, me.version, me.started_at, now, me.connections, serving),
    )
    return serving


def gone(conn: Conn, now: float) -> list[str]:
    """Nodes that left rows in the wait queue and beat no more (or never did)."""
    rows = conn.execute(
        "SELECT DISTINCT w.node FROM floatd_waiters w LEFT JOIN floatd_nodes n"
        " ON n.name = w.node WHERE n.name IS NULL OR n.heartbeat < %s",
        (now - STALE,),
    ).fetchall()
    return [str(row[0]) for row in rows]


def nodes(conn: Conn) -> list[NodeRow]:
    rows = conn.execute(
        "SELECT name, addresses, version, started_at, heartbeat, connections, serving"
        " FROM floatd_nodes ORDER BY name"
    ).fetchall()
    return [NodeRow(*row) for row in rows]


def clock_mark(conn: Conn, now: float, reset: bool = False) -> float:
    """The cluster's clock mark (SERVER_TIME_MODIFIED, by the database's
    clock): the latest time it has shown, moved on to ``now``; with
    ``reset``, put back to ``now`` (``floatd clock reset``)."""
    row = conn.execute("SELECT value FROM floatd_meta WHERE key = 'clock_mark'").fetchone()
    mark = float(row[0]) if row is not None else 0.0
    if reset or now > mark:
        conn.execute(
            "INSERT INTO floatd_meta VALUES ('clock_mark', %s)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (repr(now),),
        )
        mark = now
    return mark


def prune_audit(conn: Conn, before: float, limit: int = 50_000) -> int:
    """Retention (``[audit] retention_days``): drop up to ``limit`` audit
    records older than ``before``; how many went."""
    cur = conn.execute(
        "DELETE FROM floatd_audit WHERE seq IN"
        " (SELECT seq FROM floatd_audit WHERE ts < %s ORDER BY seq LIMIT %s)",
        (before, limit),
    )
    return cur.rowcount
