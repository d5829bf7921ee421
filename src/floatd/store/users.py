"""License users of user-authorized products: who may take a seat, and their
passwords.

Users come from two places: the entitlement's ``users`` (assigned at the
vendor's authority) and assignments made on this server by its license
manager (``floatd users assign``).  Both count against the product's
``max_users``.  Passwords are set on this server only, and stored as scrypt
hashes: N=2**15, r=8, p=1 (32 MiB and about 130 ms per check on the CI
machine), 16-byte random salt, 32-byte key, encoded as
``scrypt$N$r$p$salt$key`` in base64.  The checks run in worker threads, off
the event loop; an unknown user is checked against a dummy hash, so the answer
takes as long as for a wrong password.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from floatd.config import Config, read_dsn
from floatd.errors import FloatdError, StoreError
from floatd.store.sqlite import open_database

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool

    from floatd.store.pg_users import PgUserStore

N, R, P = 2**15, 8, 1
_MAXMEM = 64 * 1024 * 1024


def hash_password(password: str, *, n: int = N, salt: bytes | None = None) -> str:
    salt = salt or os.urandom(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=n, r=R, p=P, maxmem=_MAXMEM, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${n}${R}${P}${b64(salt).decode()}${b64(key).decode()}"


def verify_password(password: str, encoded: str | None) -> bool:
    """Constant-time check; a missing or malformed hash checks a dummy and fails."""
    ok_format = True
    try:
        scheme, n_s, r_s, p_s, salt_b64, key_b64 = (encoded or "").split("$")
        n, r, p = int(n_s), int(r_s), int(p_s)
        salt, expected = base64.b64decode(salt_b64), base64.b64decode(key_b64)
        if scheme != "scrypt" or not (2 <= n <= 2**20 and 1 <= r <= 32 and 1 <= p <= 16):
            raise ValueError
    except ValueError:
        ok_format = False
        n, r, p, salt, expected = N, R, P, b"\0" * 16, b"\0" * 32
    try:
        got = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=32)
    except ValueError:  # parameters beyond the memory bound: a tampered hash
        return False
    return hmac.compare_digest(got, expected) and ok_format


@dataclass
class LicenseUser:
    email: str
    local_products: set[str] = field(default_factory=set)
    authority_products: set[str] = field(default_factory=set)
    password_set: bool = False


class UsersFull(FloatdError):
    """A product's ``max_users`` places are all taken."""

    code = "MAX_USERS_REACHED"


def needs_place(email: str, product: str, users: frozenset[str], max_users: int) -> bool:
    """Whether assigning ``email`` takes one of the product's places (False:
    it is a user already); UsersFull if none is left (``max_users``, 0: no cap)."""
    if email in users:
        return False
    if max_users and len(users) + 1 > max_users:
        raise UsersFull(
            f"{product} allows {max_users} users and has {len(users)}; unassign one first"
        )
    return True


class UserReads:
    """The reads of both stores of license users (this file's and
    floatd.store.pg_users'): the queries once, each store naming its tables
    and its parameter mark, and running them (``_rows``)."""

    def __init__(self, users: str, products: str, mark: str) -> None:
        self._local = f"SELECT email FROM {products} WHERE product = {mark}"
        self._assigned = f"SELECT email, product FROM {products}"
        self._by_product = f"{self._assigned} ORDER BY product, email"
        self._products_of = f"SELECT product FROM {products} WHERE email = {mark}"
        self._password = f"SELECT password_hash FROM {users} WHERE email = {mark}"
        self._passwords = f"SELECT email, password_hash FROM {users}"

    def _rows(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def local_users(self, product: str) -> set[str]:
        return {r[0] for r in self._rows(self._local, product)}

    def by_product(self) -> dict[str, list[str]]:
        """Every local assignment: {product: [e-mail, ...]}, sorted."""
        out: dict[str, list[str]] = {}
        for email, product in self._rows(self._by_product):
            out.setdefault(product, []).append(email)
        return out

    def products_of(self, email: str) -> set[str]:
        return {r[0] for r in self._rows(self._products_of, email)}

    def password_hash(self, email: str) -> str | None:
        rows = self._rows(self._password, email)
        return rows[0][0] if rows else None

    def all_users(self) -> dict[str, LicenseUser]:
        out: dict[str, LicenseUser] = {}
        for email, pw in self._rows(self._passwords):
            out[email] = LicenseUser(email, password_set=pw is not None)
        for email, product in self._rows(self._assigned):
            out.setdefault(email, LicenseUser(email)).local_products.add(product)
        return out


class UserStore(UserReads):
    """The users tables of the state database (blocking; CLI and worker threads)."""

    def __init__(self, database: Path, *, readonly: bool = False) -> None:
        super().__init__("license_users", "user_products", "?")
        try:
            if readonly:
                self.db = sqlite3.connect(
                    f"{database.resolve().as_uri()}?mode=ro", uri=True, timeout=10
                )
            else:
                self.db = open_database(database)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {database}: {exc}") from None

    def close(self) -> None:
        self.db.close()

    def _rows(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        return self.db.execute(sql, args).fetchall()

    def assign(
        self,
        email: str,
        product: str,
        authority_users: frozenset[str] = frozenset(),
        max_users: int = 0,
    ) -> bool:
        """Assign ``email`` to ``product``; False if it already is a user.

        The places left (``max_users``, counting the authority's users too)
        are counted and taken in one write transaction, so two admins assigning
        at once cannot both take the last place.  UsersFull if none is left."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            local = {r[0] for r in db.execute(self._local, (product,))}
            if not needs_place(email, product, authority_users | local, max_users):
                db.execute("COMMIT")
                return False
            db.execute(
                "INSERT OR IGNORE INTO license_users VALUES (?, NULL, ?)", (email, time.time())
            )
            db.execute("INSERT INTO user_products VALUES (?, ?)", (email, product))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return True

    def unassign(self, email: str, product: str) -> bool:
        with self.db:
            cur = self.db.execute(
                "DELETE FROM user_products WHERE email = ? AND product = ?", (email, product)
            )
        return cur.rowcount == 1

    def set_password(self, email: str, encoded: str) -> None:
        with self.db:
            self.db.execute(
                "INSERT INTO license_users VALUES (?, ?, ?) ON CONFLICT(email) DO UPDATE"
                " SET password_hash = excluded.password_hash, updated_at = excluded.updated_at",
                (email, encoded, time.time()),
            )


#: Where license users are kept: the state database (a single server), or a
#: cluster's DSN or a running node's pool (floatd.store.pg_users).
Source: TypeAlias = "Path | str | ConnectionPool"


def users_source(config: Config) -> Source:
    if config.state_backend == "postgresql":
        return read_dsn(config)
    return config.database_path


def open_users(source: Source, *, readonly: bool = False) -> UserStore | PgUserStore:
    """The license users at ``source`` (see :func:`users_source`)."""
    if isinstance(source, Path):
        return UserStore(source, readonly=readonly)
    from floatd.store.pg_users import PgUserStore

    return PgUserStore(source)


def authenticate(
    source: Source, email: str, password: str, product: str, authority_users: frozenset[str]
) -> bool:
    """Blocking: is ``email`` a license user of ``product`` with this password?
    Always runs one scrypt, whoever asks, so timing tells nothing."""
    try:
        store = open_users(source, readonly=True)
    except StoreError:
        verify_password(password, None)
        return False
    try:
        assigned = email in authority_users or product in store.products_of(email)
        encoded = store.password_hash(email)
    except (sqlite3.Error, StoreError):
        assigned, encoded = False, None
    finally:
        store.close()
    ok = verify_password(password, encoded)
    return ok and assigned


def generate_password() -> str:
    """120 random bits, URL-safe base64 (20 characters), never beginning with
    "-": a password that looks like an option breaks the command lines it is
    pasted into."""
    while True:
        password = secrets.token_urlsafe(15)
        if not password.startswith("-"):
            return password


def local_assignments(source: Source) -> dict[str, list[str]]:
    """Blocking: this server's own license user assignments ({} if there is
    no state database yet)."""
    try:
        store = open_users(source, readonly=True)
    except StoreError:
        return {}
    try:
        return store.by_product()
    except (sqlite3.Error, StoreError):
        return {}
    finally:
        store.close()
