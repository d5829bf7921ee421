"""What every node of a cluster must hold alike, kept in the database: the
server key (borrow.md: one key signs for the whole cluster) and the installed
entitlement (cluster.md: installed once, on any node, served by all).

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
from pathlib import Path
from typing import Any

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from floatd.core.entitlement import load_private_key, private_key_pem
from floatd.store.activation import atomic_write, read_armored
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

    The one installed last wins: a file that changed on this node since the
    last look (``floatd activate`` ran here) goes to the database; otherwise
    the database's, if different, replaces the file.  At start the database's
    wins, so a node that was down does not bring back an old entitlement."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._agreed: str | None = None
        self._started = False

    def _local(self) -> str | None:
        try:
            return read_armored(self.path)
        except FileNotFoundError:
            return None

    def sync(self, conn: Conn) -> str | None:
        """One look; returns "pushed", "pulled" or None (nothing to do)."""
        local, shared = self._local(), _meta(conn, "entitlement")
        if not self._started:
            self._started = True
            self._agreed = local if shared is not None else None
        if local is not None and local != self._agreed and local != shared:
            conn.execute(
                "INSERT INTO floatd_meta VALUES ('entitlement', %s)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (local,),
            )
            self._agreed = local
            return "pushed"
        if shared is not None and shared != local:
            atomic_write(self.path, shared)
            self._agreed = shared
            return "pulled"
        self._agreed = local
        return None
