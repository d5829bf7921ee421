"""The reference authority's SQLite store: products, orders, licenses, users,
activations.

Plain blocking code; the HTTP side calls it from one worker thread at a time.
License keys are never stored, only their SHA-256 (they carry 192 random bits,
so a fast hash is enough; there is nothing to brute-force).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from floatd.errors import AuthorityError
from floatd.store.sqlite import migrate

_MIGRATIONS = [
    """
    CREATE TABLE products (
        code TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        authorization TEXT NOT NULL,
        lease_duration INTEGER NOT NULL,
        strategy TEXT NOT NULL,
        trial_days INTEGER NOT NULL
    );
    CREATE TABLE orders (
        id TEXT PRIMARY KEY,
        reference TEXT,
        customer TEXT
    );
    CREATE TABLE licenses (
        id TEXT PRIMARY KEY,
        order_id TEXT NOT NULL REFERENCES orders(id),
        key_hash BLOB NOT NULL UNIQUE,
        state TEXT NOT NULL,
        terms TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE license_users (
        license_id TEXT NOT NULL REFERENCES licenses(id),
        email TEXT NOT NULL,
        PRIMARY KEY (license_id, email)
    );
    CREATE TABLE activations (
        id TEXT PRIMARY KEY,
        license_id TEXT NOT NULL REFERENCES licenses(id),
        server TEXT NOT NULL,
        hostname TEXT,
        floatd TEXT,
        mode TEXT NOT NULL,
        state TEXT NOT NULL,
        created_at REAL NOT NULL,
        refreshed_at REAL
    );
    CREATE INDEX activations_license ON activations (license_id, state);
    """,
    # Where each activation's refreshes came from: two servers refreshing one
    # activation (a cloned VM keeps its machine id) show up as two addresses.
    """
    CREATE TABLE refreshes (
        activation_id TEXT NOT NULL REFERENCES activations(id),
        at REAL NOT NULL,
        address TEXT,
        floatd TEXT
    );
    CREATE INDEX refreshes_activation ON refreshes (activation_id, at);
    """,
    # The license users a site assigned on its own server, as its last refresh
    # reported them: shown with the license, counted against max_users.
    """
    CREATE TABLE local_users (
        activation_id TEXT NOT NULL REFERENCES activations(id),
        product TEXT NOT NULL,
        email TEXT NOT NULL,
        PRIMARY KEY (activation_id, product, email)
    );
    """,
    # Every change the vendor's side made (CLI or API): who, what, when,
    # before and after, as JSON.
    """
    CREATE TABLE changes (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        subject TEXT NOT NULL,
        before TEXT,
        after TEXT
    );
    CREATE INDEX changes_subject ON changes (subject, id);
    """,
    # Keys of the management API (/v1/admin/...), stored only as hashes.
    """
    CREATE TABLE api_keys (
        name TEXT PRIMARY KEY,
        key_hash BLOB NOT NULL UNIQUE,
        created_at REAL NOT NULL,
        revoked INTEGER NOT NULL DEFAULT 0
    );
    """,
    # License managers: people on the customer's side who assign the users of
    # the licenses under the orders that name them.  Passwords as scrypt
    # hashes; the one-time enrolment token and the sessions only as SHA-256.
    """
    ALTER TABLE orders ADD COLUMN manager TEXT;
    CREATE TABLE managers (
        email TEXT PRIMARY KEY,
        password_hash TEXT,
        enrol_hash BLOB UNIQUE,
        enrol_expires REAL,
        created_at REAL NOT NULL
    );
    CREATE TABLE manager_sessions (
        token_hash BLOB PRIMARY KEY,
        email TEXT NOT NULL REFERENCES managers(email),
        csrf TEXT NOT NULL,
        expires_at REAL NOT NULL
    );
    CREATE INDEX manager_sessions_expiry ON manager_sessions (expires_at);
    """,
    # What an API key may do: "all", or "read" (GET routes only).
    """
    ALTER TABLE api_keys ADD COLUMN rights TEXT NOT NULL DEFAULT 'all';
    """,
]

#: Refreshes kept per activation (the newest).
REFRESHES_KEPT = 20


@dataclass
class Change:
    """One entry of the vendor's change trail."""

    at: float
    actor: str
    action: str
    subject: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None


@dataclass
class Product:
    code: str
    name: str
    authorization: str = "key"
    lease_duration: int = 900
    strategy: str = "per-machine"
    trial_days: int = 0


@dataclass
class Terms:
    """What a license grants; kept as one JSON document, so a new term is a
    new field here rather than a migration."""

    products: list[str]
    seats: int
    lease_duration: int | None = None  # None: each product's default
    strategy: str | None = None  # None: each product's default
    user_locked: bool = False
    allowed_ips: list[str] = field(default_factory=list)
    allowed_activations: int = 1
    interval: str | None = None  # ISO 8601 duration of a subscription
    expires_at: int | None = None  # explicit expiry (or the end of the current interval)
    effective_at: int | None = None
    trial: bool = False
    grace_seconds: int = 7 * 86400
    borrow_max: int = 0
    max_users: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    features: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Terms:
        data = json.loads(text)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class License:
    id: str
    order_id: str
    state: str
    terms: Terms
    created_at: float
    order_reference: str | None = None
    customer: str | None = None
    users: list[str] = field(default_factory=list)


@dataclass
class Activation:
    id: str
    license_id: str
    server: str
    hostname: str | None
    floatd: str | None
    mode: str
    state: str
    created_at: float
    refreshed_at: float | None


class AuthorityStore:
    def __init__(self, path: Path) -> None:
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            migrate(self.db, _MIGRATIONS)
        except (sqlite3.Error, OSError) as exc:
            raise AuthorityError(500, "INTERNAL", f"cannot open {path}: {exc}") from None

    def close(self) -> None:
        self.db.close()

    def transaction(self) -> _Transaction:
        return _Transaction(self.db)

    # --- products ---------------------------------------------------------------

    def add_product(self, p: Product) -> None:
        try:
            self.db.execute(
                "INSERT INTO products VALUES (?, ?, ?, ?, ?, ?)",
                (p.code, p.name, p.authorization, p.lease_duration, p.strategy, p.trial_days),
            )
        except sqlite3.IntegrityError:
            raise AuthorityError(409, "PRODUCT_EXISTS", f"product {p.code!r} exists") from None

    def product(self, code: str) -> Product | None:
        row = self.db.execute("SELECT * FROM products WHERE code = ?", (code,)).fetchone()
        return Product(*row) if row else None

    def products(self) -> list[Product]:
        return [Product(*r) for r in self.db.execute("SELECT * FROM products ORDER BY code")]

    # --- orders and licenses ------------------------------------------------------

    def ensure_order(self, order_id: str, reference: str | None, customer: str | None) -> None:
        row = self.db.execute(
            "SELECT reference, customer FROM orders WHERE id = ?", (order_id,)
        ).fetchone()
        if row is None:
            self.db.execute(
                "INSERT INTO orders (id, reference, customer) VALUES (?, ?, ?)",
                (order_id, reference, customer),
            )
            return
        # A license issued under an existing order takes the order as it is; a
        # different customer or reference would rewrite every license under it.
        for name, given, held in (("reference", reference, row[0]), ("customer", customer, row[1])):
            if given is not None and held is not None and given != held:
                raise AuthorityError(
                    409,
                    "ORDER_CONFLICT",
                    f"order {order_id!r} has {name} {held!r}, not {given!r}",
                )
        if (reference is not None and row[0] is None) or (customer is not None and row[1] is None):
            self.db.execute(
                "UPDATE orders SET reference = coalesce(reference, ?),"
                " customer = coalesce(customer, ?) WHERE id = ?",
                (reference, customer, order_id),
            )

    def add_license(
        self, license_id: str, order_id: str, key_hash: bytes, terms: Terms, now: float
    ) -> None:
        self.db.execute(
            "INSERT INTO licenses VALUES (?, ?, ?, 'active', ?, ?)",
            (license_id, order_id, key_hash, terms.to_json(), now),
        )

    def _license(self, row: Any) -> License:
        lic = License(
            id=row[0],
            order_id=row[1],
            state=row[2],
            terms=Terms.from_json(row[3]),
            created_at=row[4],
            order_reference=row[5],
            customer=row[6],
        )
        lic.users = [
            r[0]
            for r in self.db.execute(
                "SELECT email FROM license_users WHERE license_id = ? ORDER BY email", (lic.id,)
            )
        ]
        return lic

    _LICENSE_SQL = (
        "SELECT l.id, l.order_id, l.state, l.terms, l.created_at, o.reference, o.customer"
        " FROM licenses l JOIN orders o ON o.id = l.order_id"
    )

    def license(self, license_id: str) -> License | None:
        row = self.db.execute(self._LICENSE_SQL + " WHERE l.id = ?", (license_id,)).fetchone()
        return self._license(row) if row else None

    def license_by_key_hash(self, key_hash: bytes) -> License | None:
        row = self.db.execute(self._LICENSE_SQL + " WHERE l.key_hash = ?", (key_hash,)).fetchone()
        return self._license(row) if row else None

    def licenses(self, order_id: str | None = None) -> list[License]:
        sql, args = self._LICENSE_SQL, []
        if order_id is not None:
            sql, args = sql + " WHERE l.order_id = ?", [order_id]
        return [self._license(r) for r in self.db.execute(sql + " ORDER BY l.created_at", args)]

    def set_state(self, license_id: str, state: str) -> None:
        self.db.execute("UPDATE licenses SET state = ? WHERE id = ?", (state, license_id))

    def set_terms(self, license_id: str, terms: Terms) -> None:
        self.db.execute("UPDATE licenses SET terms = ? WHERE id = ?", (terms.to_json(), license_id))

    def add_user(self, license_id: str, email: str) -> bool:
        cur = self.db.execute(
            "INSERT OR IGNORE INTO license_users VALUES (?, ?)", (license_id, email)
        )
        return cur.rowcount == 1

    def remove_user(self, license_id: str, email: str) -> bool:
        cur = self.db.execute(
            "DELETE FROM license_users WHERE license_id = ? AND email = ?", (license_id, email)
        )
        return cur.rowcount == 1

    # --- activations ----------------------------------------------------------------

    def add_activation(self, a: Activation) -> None:
        self.db.execute(
            "INSERT INTO activations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                a.id,
                a.license_id,
                a.server,
                a.hostname,
                a.floatd,
                a.mode,
                a.state,
                a.created_at,
                a.refreshed_at,
            ),
        )

    def activation(self, activation_id: str) -> Activation | None:
        row = self.db.execute("SELECT * FROM activations WHERE id = ?", (activation_id,)).fetchone()
        return Activation(*row) if row else None

    def activations(
        self, license_id: str | None = None, *, active_only: bool = False
    ) -> list[Activation]:
        sql, args = "SELECT * FROM activations WHERE 1", []
        if license_id is not None:
            sql += " AND license_id = ?"
            args.append(license_id)
        if active_only:
            sql += " AND state = 'active'"
        return [Activation(*r) for r in self.db.execute(sql + " ORDER BY created_at", args)]

    def add_refresh(
        self, activation_id: str, at: float, address: str | None, floatd: str | None
    ) -> None:
        self.db.execute(
            "INSERT INTO refreshes VALUES (?, ?, ?, ?)", (activation_id, at, address, floatd)
        )
        self.db.execute(
            "DELETE FROM refreshes WHERE activation_id = ? AND rowid NOT IN (SELECT rowid FROM"
            " refreshes WHERE activation_id = ? ORDER BY at DESC LIMIT ?)",
            (activation_id, activation_id, REFRESHES_KEPT),
        )

    def refreshes(self, activation_id: str) -> list[tuple[float, str | None, str | None]]:
        """(at, address, floatd) of the newest refreshes, newest first."""
        rows = self.db.execute(
            "SELECT at, address, floatd FROM refreshes WHERE activation_id = ? ORDER BY at DESC",
            (activation_id,),
        ).fetchall()
        return [(float(a), b, c) for a, b, c in rows]

    def add_change(
        self,
        at: float,
        actor: str,
        action: str,
        subject: str,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
    ) -> None:
        self.db.execute(
            "INSERT INTO changes (at, actor, action, subject, before, after)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                at,
                actor,
                action,
                subject,
                None if before is None else json.dumps(before, sort_keys=True),
                None if after is None else json.dumps(after, sort_keys=True),
            ),
        )

    def changes(self, subject: str | None = None, limit: int = 100) -> list[Change]:
        """The newest changes first (of ``subject``, or of everything)."""
        where, args = ("WHERE subject = ?", [subject]) if subject else ("", [])
        rows = self.db.execute(
            f"SELECT at, actor, action, subject, before, after FROM changes {where}"
            " ORDER BY id DESC LIMIT ?",
            [*args, limit],
        ).fetchall()
        return [
            Change(
                at,
                actor,
                action,
                subject,
                None if b is None else json.loads(b),
                None if a is None else json.loads(a),
            )
            for at, actor, action, subject, b, a in rows
        ]

    def add_api_key(self, name: str, key_hash: bytes, now: float, rights: str = "all") -> None:
        try:
            self.db.execute(
                "INSERT INTO api_keys (name, key_hash, created_at, rights) VALUES (?, ?, ?, ?)",
                (name, key_hash, now, rights),
            )
        except sqlite3.IntegrityError:
            raise AuthorityError(409, "API_KEY_EXISTS", f"an API key {name!r} exists") from None

    def api_key(self, key_hash: bytes) -> tuple[str, str] | None:
        """(name, rights) of a live key."""
        row = self.db.execute(
            "SELECT name, rights FROM api_keys WHERE key_hash = ? AND revoked = 0", (key_hash,)
        ).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    def api_keys(self) -> list[tuple[str, float, bool, str]]:
        rows = self.db.execute(
            "SELECT name, created_at, revoked, rights FROM api_keys ORDER BY name"
        )
        return [(str(n), float(c), bool(r), str(g)) for n, c, r, g in rows]

    def revoke_api_key(self, name: str) -> bool:
        cur = self.db.execute(
            "UPDATE api_keys SET revoked = 1 WHERE name = ? AND revoked = 0", (name,)
        )
        return cur.rowcount == 1

    def set_local_users(self, activation_id: str, users: dict[str, list[str]]) -> None:
        self.db.execute("DELETE FROM local_users WHERE activation_id = ?", (activation_id,))
        self.db.executemany(
            "INSERT OR IGNORE INTO local_users VALUES (?, ?, ?)",
            [
                (activation_id, product, email)
                for product, emails in users.items()
                for email in emails
            ],
        )

    def local_users(self, license_id: str) -> dict[str, list[str]]:
        """{product: [e-mail, ...]} the license's active activations reported."""
        rows = self.db.execute(
            "SELECT DISTINCT u.product, u.email FROM local_users u JOIN activations a"
            " ON a.id = u.activation_id WHERE a.license_id = ? AND a.state = 'active'"
            " ORDER BY u.product, u.email",
            (license_id,),
        ).fetchall()
        out: dict[str, list[str]] = {}
        for product, email in rows:
            out.setdefault(product, []).append(email)
        return out

    def set_activation(
        self, activation_id: str, state: str | None = None, refreshed_at: float | None = None
    ) -> None:
        if state is not None:
            self.db.execute("UPDATE activations SET state = ? WHERE id = ?", (state, activation_id))
        if refreshed_at is not None:
            self.db.execute(
                "UPDATE activations SET refreshed_at = ? WHERE id = ?",
                (refreshed_at, activation_id),
            )


class _Transaction:
    """``with store.transaction():`` BEGIN IMMEDIATE ... COMMIT (or ROLLBACK)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
