"""What every node of a cluster must hold alike, kept in the database: the
server key (borrow.md: one key signs for the whole cluster), the installed
entitlement (cluster.md: installed once, on any node, served by all), and the
nonces of offline activation requests (made on one node, answered on any).

Each node keeps a copy of both in its state dir, where the single server's
code (activation, verification, the entitlement watcher) already looks, so a
cluster node verifies and installs exactly as a single server does; this
module only keeps the copies in step with the database.  Blocking code, on
the caller's connection: the key at start, the entitlement at every heartbeat
(every 2 s), so an entitlement installed on one node reaches every node within
about 3 s (a heartbeat, then the watcher's look a second later).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from floatd.config import Config
from floatd.core.entitlement import Entitlement, load_private_key, private_key_pem
from floatd.errors import EntitlementError, StoreError
from floatd.store.activation import atomic_write, installed_here, read_armored, record_installed
from floatd.store.server_key import key_path, load_or_create

Conn = psycopg.Connection[Any]


def _meta(conn: Conn, key: str) -> str | None:
    row = conn.execute("SELECT value FROM floatd_meta WHERE key = %s", (key,)).fetchone()
    return str(row[0]) if row is not None else None


def share_server_key(conn: Conn, state_dir: Path) -> Ed25519PrivateKey:
    """The cluster's key: the first node to start offers its own, and every
    node (this one included) keeps the one the database holds."""
    mine = private_key_pem(load_or_create(state_dir)).decode()
    conn.execute(
        "INSERT INTO floatd_meta VALUES ('server_key', %s) ON CONFLICT DO NOTHING", (mine,)
    )
    shared = _meta(conn, "server_key")
    assert shared is not None
    if shared != mine:
        path = key_path(state_dir)
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, shared.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    return load_private_key(shared.encode())


class EntitlementSync:
    """Keeps a node's entitlement file and the database's entitlement the same.

    The one installed last wins: a file that ``floatd activate`` (or the
    online refresh) installed on this node since the last look goes to the
    database; otherwise the database's, if different and if it verifies for
    this cluster, replaces the file and is recorded as installed here.  A file
    put in place by hand goes nowhere (the watcher refuses it as on a single
    server).  At start the database's wins, so a node that was down does not
    bring back an old entitlement."""

    def __init__(self, config: Config, verify: Callable[[str], Entitlement]) -> None:
        self.config = config
        self.path = config.entitlement_path
        self._verify = verify
        self._agreed: str | None = None
        self._started = False

    def _local(self) -> str | None:
        try:
            return read_armored(self.path)
        except FileNotFoundError:
            return None

    def sync(self, conn: Conn) -> str | None:
        """One look; returns "pushed", "pulled" or None (nothing to do).
        EntitlementError: the database's does not verify here (nothing changed)."""
        local, shared = self._local(), _meta(conn, "entitlement")
        if not self._started:
            self._started = True
            self._agreed = local if shared is not None else None
        if (
            local is not None
            and local != self._agreed
            and local != shared
            and installed_here(self.config, local)
        ):
            conn.execute(
                "INSERT INTO floatd_meta VALUES ('entitlement', %s)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (local,),
            )
            self._agreed = local
            return "pushed"
        if shared is not None and shared != local and shared != self._agreed:
            self._agreed = shared  # one try per new text, not one per heartbeat
            record_installed(self.config, self._verify(shared))
            atomic_write(self.path, shared)
            return "pulled"
        return None


def add_nonce(dsn: str, nonce: str, created_at: int) -> None:
    """An offline activation request's nonce, pending until its response."""
    from floatd.store import cluster

    conn = cluster.connect(dsn)
    try:
        conn.execute("INSERT INTO floatd_pending_nonces VALUES (%s, %s)", (nonce, created_at))
        conn.commit()
    except psycopg.Error as exc:
        raise StoreError(f"cannot record the request: {exc}") from None
    finally:
        conn.close()


@contextmanager
def consuming_nonce(dsn: str, nonce: str) -> Iterator[None]:
    """Use up ``nonce`` if the body (installing its response) succeeds; it
    stays pending if the body fails.  EntitlementError if it is not pending."""
    from floatd.store import cluster

    conn = cluster.connect(dsn)
    try:
        with conn.transaction():
            gone = conn.execute(
                "DELETE FROM floatd_pending_nonces WHERE nonce = %s RETURNING 1", (nonce,)
            ).fetchone()
            if gone is None:
                raise EntitlementError(
                    "this response answers no pending request of this cluster (already used,"
                    " or made for another request)"
                )
            yield
    except psycopg.Error as exc:
        raise StoreError(f"cannot install the entitlement: {exc}") from None
    finally:
        conn.close()
