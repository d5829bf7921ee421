"""The cluster database on PostgreSQL: its schema, its id and its fingerprint.

Several floatd nodes share one database (``[state] backend = "postgresql"``).
What identifies the cluster to the vendor is the *cluster fingerprint*, which
entitlements for it name in ``server``: SHA-256 over PostgreSQL's
``system_identifier`` (kept by physical replicas and failover), the database's
name and a 128-bit id made once by ``floatd cluster init``.  So a failover to
a replica keeps the fingerprint, and a copy of the database into another
PostgreSQL does not.

Blocking code (psycopg's synchronous API): the CLI calls it directly, and a
trio shell would call it in worker threads (psycopg's async API is
asyncio-only).  Schema versions are migrated in one transaction under an
advisory lock, so nodes starting at once (or ``cluster init`` run twice) apply
each version exactly once.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence

import psycopg

from floatd.errors import StoreError

#: The advisory lock that serialises schema changes (an arbitrary constant:
#: "floatd" in ASCII).
SCHEMA_LOCK = 0x666C6F617464
#: Each script brings the schema one version up; never edit one that shipped.
MIGRATIONS: Sequence[str] = (
    """
    CREATE TABLE floatd_meta (
        key text PRIMARY KEY,
        value text NOT NULL
    );
    """,
)
FINGERPRINT_DOMAIN = "floatd-cluster-v1:"


def connect(dsn: str) -> psycopg.Connection[tuple[object, ...]]:
    """A connection to the cluster database, or StoreError saying why not."""
    try:
        return psycopg.connect(dsn, connect_timeout=10)
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreError(f"cannot reach the cluster database: {reason}") from None


def init(conn: psycopg.Connection[tuple[object, ...]]) -> str:
    """Create or migrate the schema and, once, the cluster id; returns the id."""
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS floatd_schema (version integer NOT NULL)")
            row = conn.execute("SELECT max(version) FROM floatd_schema").fetchone()
            version = int(str(row[0])) if row and row[0] is not None else 0
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                conn.execute(script)
                conn.execute("INSERT INTO floatd_schema VALUES (%s)", (number,))
            conn.execute(
                "INSERT INTO floatd_meta VALUES ('cluster_id', %s) ON CONFLICT DO NOTHING",
                (secrets.token_hex(16),),
            )
            found = conn.execute("SELECT value FROM floatd_meta WHERE key = 'cluster_id'")
            cluster_id = found.fetchone()
    except psycopg.Error as exc:
        raise StoreError(f"cannot set up the cluster database: {exc}") from None
    assert cluster_id is not None
    return str(cluster_id[0])


def fingerprint(conn: psycopg.Connection[tuple[object, ...]]) -> str:
    """The cluster fingerprint (cluster.md); StoreError before ``cluster init``."""
    try:
        row = conn.execute(
            "SELECT (SELECT system_identifier FROM pg_control_system()), current_database(),"
            " (SELECT value FROM floatd_meta WHERE key = 'cluster_id')"
        ).fetchone()
    except psycopg.errors.UndefinedTable:
        row = None
    except psycopg.Error as exc:
        raise StoreError(f"cannot read the cluster database: {exc}") from None
    if row is None or row[2] is None:
        raise StoreError("the cluster database is not set up: run `floatd cluster init` first")
    return cluster_fingerprint(int(str(row[0])), str(row[1]), str(row[2]))


def cluster_fingerprint(system_identifier: int, database: str, cluster_id: str) -> str:
    text = f"{FINGERPRINT_DOMAIN}{system_identifier}:{database}:{cluster_id}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]
