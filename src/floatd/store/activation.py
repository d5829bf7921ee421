"""Activation state on disk: the installed entitlement and pending offline requests.

These run in the CLI, whether or not the daemon is up.  The entitlement is a
plain armored file in the state dir, replaced atomically; the daemon watches it
and installs a new one within a second.  Nonces of offline requests live in the
state database until their response is installed, which is what makes a
response usable once: installing it consumes its nonce in the same transaction.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import sqlite3
from pathlib import Path

from floatd import __version__
from floatd.config import Config, read_dsn
from floatd.core.entitlement import (
    MAX_ARMORED,
    ActivationRequest,
    Entitlement,
    trusted_keys,
    verify_entitlement,
)
from floatd.errors import EntitlementError, StoreError
from floatd.store.server_key import public_key_text
from floatd.store.sqlite import open_database

#: What was installed last through floatd (the CLI, or the daemon's refresh):
#: the armored text's SHA-256, and when the vendor issued it.
META_DIGEST = "entitlement_sha256"
META_ISSUED = "entitlement_issued_at"


def installed_record(ent: Entitlement) -> list[tuple[str, str]]:
    """The meta rows that record ``ent`` as the entitlement installed last."""
    return [
        (META_DIGEST, hashlib.sha256(ent.text.encode()).hexdigest()),
        (META_ISSUED, str(ent.issued_at)),
    ]


def check_history(meta: dict[str, str], ent: Entitlement) -> None:
    """Refuse a file in the state dir that floatd did not install and that is
    not newer than what it did: an earlier, validly signed entitlement copied
    back over the installed one (50 seats where the vendor now sells 5).

    The file installed last passes; so does any file when nothing is recorded
    yet (a state from before this check).  Any other offline response is
    refused (they are installed by ``floatd activate --offline-response``,
    which uses each once), and so is an entitlement issued before the recorded
    one."""
    recorded = meta.get(META_DIGEST)
    if recorded is None or recorded == installed_record(ent)[0][1]:
        return
    if ent.nonce is not None:
        raise EntitlementError(
            "this offline response is not the one installed last with `floatd activate"
            " --offline-response` (an old file copied back?)"
        )
    issued = int(meta.get(META_ISSUED, "0") or 0)
    if ent.issued_at < issued:
        raise EntitlementError(
            f"this entitlement was issued before the one installed last ({ent.issued_at} <"
            f" {issued}): an old file copied back?"
        )


def _record_installed(db: sqlite3.Connection, ent: Entitlement) -> None:
    db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", installed_record(ent))


def record_installed(config: Config, ent: Entitlement) -> None:
    """Record ``ent`` as installed last (a cluster node taking the database's
    entitlement, which another node installed)."""
    db = open_database(config.database_path)
    try:
        with db:
            _record_installed(db, ent)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot record the entitlement: {exc}") from None
    finally:
        db.close()


def installed_here(config: Config, text: str) -> bool:
    """Whether ``text`` is what floatd recorded as installed last here (or
    nothing is recorded yet): a file put in place by hand is not."""
    db = open_database(config.database_path)
    try:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (META_DIGEST,)).fetchone()
    except sqlite3.Error:
        return False
    finally:
        db.close()
    return row is None or row[0] == hashlib.sha256(text.encode()).hexdigest()


def read_armored(path: Path) -> str:
    """An armored file's text, read no further than the size any armored file
    may have: a huge file is refused after 1 MiB, not read whole first."""
    with open(path, "rb") as fh:
        data = fh.read(MAX_ARMORED + 1)
    if len(data) > MAX_ARMORED:
        raise EntitlementError(f"{path} is larger than {MAX_ARMORED} bytes")
    return data.decode("utf-8", errors="replace")


def atomic_write(path: Path, text: str) -> None:
    """Write-then-rename with fsyncs, so a reader sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def create_offline_request(config: Config, server_id: str, license_key: str, now: float) -> str:
    """Write a pending nonce and return the armored activation request."""
    request = ActivationRequest(
        license_key=license_key,
        server=server_id,
        hostname=socket.gethostname(),
        nonce=secrets.token_urlsafe(24),
        created_at=int(now),
        floatd=__version__,
        server_key=public_key_text(config.state_dir),
    )
    if config.state_backend == "postgresql":  # any node may install the response
        from floatd.store.pg_shared import add_nonce

        add_nonce(read_dsn(config), request.nonce, request.created_at)
        return request.to_armored()
    db = open_database(config.database_path)
    try:
        with db:
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "INSERT INTO pending_nonces VALUES (?, ?)", (request.nonce, request.created_at)
            )
    except sqlite3.Error as exc:
        raise StoreError(f"cannot record the request: {exc}") from None
    finally:
        db.close()
    return request.to_armored()


def verify_for_this_server(config: Config, server_id: str, text: str, now: float) -> Entitlement:
    return verify_entitlement(
        text,
        trusted_keys(config.vendor_keys),
        server_id,
        now,
        config.allowed_clock_offset,
        public_key_text(config.state_dir),
    )


def install_offline_response(config: Config, server_id: str, text: str, now: float) -> Entitlement:
    """Verify a vendor-signed response, consume its nonce and install it."""
    ent = verify_for_this_server(config, server_id, text, now)
    if ent.nonce is None:
        raise EntitlementError("this entitlement carries no nonce: it is not an offline response")
    if config.state_backend == "postgresql":
        from floatd.store.pg_shared import consuming_nonce

        with consuming_nonce(read_dsn(config), ent.nonce):
            _install(config, ent, None)
        return ent
    _install(config, ent, ent.nonce)
    return ent


def install_entitlement(config: Config, ent: Entitlement) -> None:
    """Install an already verified entitlement (online activation, the demo)."""
    _install(config, ent, None)


def _install(config: Config, ent: Entitlement, nonce: str | None) -> None:
    """Write the file and record it as the one installed last (see
    :func:`check_history`) in one transaction; with ``nonce``, that transaction
    also uses up the pending request it answers, so a response works once."""
    db = open_database(config.database_path)
    try:
        db.execute("BEGIN IMMEDIATE")
        if nonce is not None:
            if (
                db.execute("SELECT 1 FROM pending_nonces WHERE nonce=?", (nonce,)).fetchone()
                is None
            ):
                db.execute("ROLLBACK")
                raise EntitlementError(
                    "this response answers no pending request of this server (already used, or "
                    "made for another request)"
                )
            db.execute("DELETE FROM pending_nonces WHERE nonce=?", (nonce,))
        atomic_write(config.entitlement_path, ent.text)
        _record_installed(db, ent)
        db.execute("COMMIT")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot install the entitlement: {exc}") from None
    finally:
        db.close()
