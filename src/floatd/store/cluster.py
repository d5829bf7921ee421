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
    # The ledger (floatd.store.pg_ledger): its lock row, the products' terms,
    # the leases, the one wait queue of the cluster, and the audit trail.
    """
    CREATE TABLE floatd_ledger (
        id integer PRIMARY KEY CHECK (id = 1),
        version bigint NOT NULL
    );
    INSERT INTO floatd_ledger VALUES (1, 0);
    CREATE TABLE floatd_products (
        code text PRIMARY KEY,
        seats integer,
        duration double precision NOT NULL,
        strategy text NOT NULL,
        user_locked boolean NOT NULL,
        active boolean NOT NULL
    );
    CREATE TABLE floatd_leases (
        id text PRIMARY KEY,
        token_hash bytea NOT NULL,
        product text NOT NULL,
        seat text[] NOT NULL,
        fingerprint text NOT NULL,
        instance text,
        user_name text,
        hostname text,
        meta jsonb NOT NULL,
        peer text,
        granted_at double precision NOT NULL,
        expires_at double precision NOT NULL,
        duration double precision NOT NULL,
        borrowed boolean NOT NULL,
        node text NOT NULL
    );
    CREATE INDEX floatd_leases_product ON floatd_leases (product);
    CREATE INDEX floatd_leases_expiry ON floatd_leases (expires_at);
    CREATE TABLE floatd_waiters (
        seq bigserial PRIMARY KEY,
        node text NOT NULL,
        lease_id text NOT NULL,
        token_hash bytea NOT NULL,
        product text NOT NULL,
        fingerprint text NOT NULL,
        instance text,
        user_name text,
        hostname text,
        meta jsonb NOT NULL,
        peer text,
        deadline double precision NOT NULL,
        done boolean NOT NULL DEFAULT false,
        granted text
    );
    CREATE INDEX floatd_waiters_queue ON floatd_waiters (product, seq) WHERE NOT done;
    CREATE INDEX floatd_waiters_deadline ON floatd_waiters (deadline) WHERE NOT done;
    CREATE INDEX floatd_waiters_node ON floatd_waiters (node);
    CREATE TABLE floatd_audit (
        seq bigserial PRIMARY KEY,
        ts double precision NOT NULL,
        event text NOT NULL,
        product text,
        lease text,
        fingerprint text,
        instance text,
        user_name text,
        hostname text,
        peer text,
        code text,
        seat text[],
        granted_at double precision,
        repeats integer,
        rule text,
        node text NOT NULL
    );
    CREATE INDEX floatd_audit_ts ON floatd_audit (ts);
    """,
    # The node registry (floatd.store.pg_nodes): who serves, and their heartbeats.
    """
    CREATE TABLE floatd_nodes (
        name text PRIMARY KEY,
        addresses text[] NOT NULL,
        version text NOT NULL,
        started_at double precision NOT NULL,
        heartbeat double precision NOT NULL,
        connections integer NOT NULL,
        serving boolean NOT NULL
    );
    """,
    # The ledger's change log (floatd.store.pg_changes): one row per writing
    # transaction, numbered by floatd_ledger.version.
    """
    CREATE TABLE floatd_changelog (
        version bigint PRIMARY KEY,
        node text NOT NULL,
        body bytea NOT NULL
    );
    """,
    # License users (floatd.store.pg_users): the cluster's, as the single
    # server's state database holds its own.
    """
    CREATE TABLE floatd_license_users (
        email text PRIMARY KEY,
        password_hash text,
        updated_at double precision NOT NULL
    );
    CREATE TABLE floatd_user_products (
        email text NOT NULL,
        product text NOT NULL,
        PRIMARY KEY (email, product)
    );
    """,
    # Offline activation requests waiting for their response (floatd.store.pg_shared).
    """
    CREATE TABLE floatd_pending_nonces (
        nonce text PRIMARY KEY,
        created_at bigint NOT NULL
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
