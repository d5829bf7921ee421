"""License users of a cluster, in its database: the same store as the single
server's (floatd.store.users.UserStore), on PostgreSQL, so that a user
assigned or given a password on one node may lease through every node."""

from __future__ import annotations

import time
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from floatd.errors import StoreError
from floatd.store import cluster
from floatd.store.users import UserReads, needs_place


def users_pool(dsn: str) -> ConnectionPool:
    """A running node's connections for license users' password checks: two at
    most, as many as the checks that run at once (scrypt is the bound), and
    none kept while nobody leases as a license user.  Opened by the caller."""
    return ConnectionPool(
        dsn,
        min_size=0,
        max_size=2,
        kwargs={"autocommit": True, "connect_timeout": 5},
        open=False,
        name="floatd-users",
    )


class PgUserStore(UserReads):
    """On its own connection (the CLI, a DSN) or one borrowed from a pool (a
    running node), given back on close."""

    def __init__(self, source: str | ConnectionPool) -> None:
        super().__init__("floatd_license_users", "floatd_user_products", "%s")
        self._pool: ConnectionPool | None = None
        if isinstance(source, str):
            self.db: psycopg.Connection[Any] = cluster.connect(source)
            self.db.autocommit = True
            return
        try:
            self.db = source.getconn(timeout=5)
        except (PoolTimeout, psycopg.Error) as exc:
            raise StoreError(f"cannot reach the cluster database: {exc}") from None
        self._pool = source

    def close(self) -> None:
        if self._pool is not None:
            self._pool.putconn(self.db)
        else:
            self.db.close()

    def _rows(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        try:
            return self.db.execute(sql, args).fetchall()
        except psycopg.Error as exc:
            raise StoreError(f"cannot read the license users: {exc}") from None

    def assign(
        self,
        email: str,
        product: str,
        authority_users: frozenset[str] = frozenset(),
        max_users: int = 0,
    ) -> bool:
        """As UserStore.assign: the places are counted and taken under a lock
        on the product's assignments, so two admins on two nodes cannot both
        take the last place."""
        try:
            with self.db.transaction():
                self.db.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (product,))
                local = {r[0] for r in self.db.execute(self._local, (product,))}
                if not needs_place(email, product, authority_users | local, max_users):
                    return False
                self.db.execute(
                    "INSERT INTO floatd_license_users VALUES (%s, NULL, %s) ON CONFLICT DO NOTHING",
                    (email, time.time()),
                )
                self.db.execute(
                    "INSERT INTO floatd_user_products VALUES (%s, %s)", (email, product)
                )
        except psycopg.Error as exc:
            raise StoreError(f"cannot assign the license user: {exc}") from None
        return True

    def unassign(self, email: str, product: str) -> bool:
        try:
            cur = self.db.execute(
                "DELETE FROM floatd_user_products WHERE email = %s AND product = %s",
                (email, product),
            )
        except psycopg.Error as exc:
            raise StoreError(f"cannot unassign the license user: {exc}") from None
        return cur.rowcount == 1

    def set_password(self, email: str, encoded: str) -> None:
        try:
            self.db.execute(
                "INSERT INTO floatd_license_users VALUES (%s, %s, %s) ON CONFLICT (email)"
                " DO UPDATE SET password_hash = excluded.password_hash,"
                " updated_at = excluded.updated_at",
                (email, encoded, time.time()),
            )
        except psycopg.Error as exc:
            raise StoreError(f"cannot set the password: {exc}") from None
