"""A single server's state, copied into a new cluster database
(``floatd state migrate --to-postgresql``).

Leases keep their ids, token digests and expiry, so clients renew them through
any node as if nothing happened; the audit trail comes along so reports span
the move; the server key too, so borrow certificates it signed stay this
cluster's; and the license users with their passwords and assignments.
Pending offline requests stay in the old state dir (a cluster node keeps its
own).  One transaction: a failed copy leaves the new database as it was.
"""

from __future__ import annotations

from typing import Any

import msgpack
import psycopg

from floatd.config import Config
from floatd.core.changes import Audit
from floatd.errors import StoreError
from floatd.store import cluster
from floatd.store.audit import open_readonly
from floatd.store.pg_rows import put_lease, write_audit
from floatd.store.server_key import key_path
from floatd.store.sqlite import SQLiteLeaseStore

MIGRATED = "migrated"


def copy_state(config: Config, conn: psycopg.Connection[Any]) -> tuple[int, int]:
    """Copy into ``conn``'s database (set up if new, refused if it already
    holds leases or audit records); returns (leases, audit records) copied."""
    store = SQLiteLeaseStore(config.database_path)
    try:
        leases = store.load_leases()
    finally:
        store.close()
    db = open_readonly(config.database_path)
    try:
        rows = db.execute(
            "SELECT ts, event, product, lease, fingerprint, instance, user, hostname, peer,"
            " code, seat, granted_at, repeats, rule FROM audit ORDER BY seq"
        ).fetchall()
        users = db.execute("SELECT email, password_hash, updated_at FROM license_users").fetchall()
        assigned = db.execute("SELECT email, product FROM user_products").fetchall()
    finally:
        db.close()
    # Audit's fields in order: the row's first ten, then seat (packed in
    # SQLite), granted_at, log (a daemon's flag, off), repeats and rule.
    records = [
        Audit._make(
            [
                *row[:10],
                tuple(msgpack.unpackb(row[10])) if row[10] is not None else None,
                row[11],
                False,
                row[12],
                row[13],
            ]
        )
        for row in rows
    ]
    key = key_path(config.state_dir)
    cluster.init(conn)
    try:
        with conn.transaction():
            found = conn.execute(
                "SELECT (SELECT count(*) FROM floatd_leases) + (SELECT count(*) FROM floatd_audit)"
            ).fetchone()
            if found is not None and found[0]:
                raise StoreError(
                    "the cluster database already holds leases or audit records: migrate"
                    " into a new one"
                )
            for lease in leases:
                put_lease(conn, lease, MIGRATED)
            if records:
                write_audit(conn, records, MIGRATED)
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO floatd_license_users VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                    users,
                )
                cur.executemany(
                    "INSERT INTO floatd_user_products VALUES (%s, %s) ON CONFLICT DO NOTHING",
                    assigned,
                )
            if key.exists():
                conn.execute(
                    "INSERT INTO floatd_meta VALUES ('server_key', %s) ON CONFLICT DO NOTHING",
                    (key.read_text(),),
                )
    except psycopg.Error as exc:
        raise StoreError(f"cannot copy into the cluster database: {exc}") from None
    return len(leases), len(records)
