"""The server's own Ed25519 key pair: what it signs borrow certificates with,
and what the vendor's entitlement names (``server_key``) so that only this
server can use it.

Created the first time it is needed (an activation request or the first
start) in ``[state] dir``, mode 0600, and never logged, listed or sent: only
its public half leaves the server.  Creation is exclusive (``O_EXCL``), so two
processes starting at once cannot end up with different keys: the loser reads
the winner's.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from floatd.core.entitlement import format_public_key, load_private_key, private_key_pem
from floatd.errors import StoreError

FILE_NAME = "server.key"


def key_path(state_dir: Path) -> Path:
    return state_dir / FILE_NAME


def load_or_create(state_dir: Path) -> Ed25519PrivateKey:
    """This server's private key, made (and durably written) if there is none."""
    path = key_path(state_dir)
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    key = Ed25519PrivateKey.generate()
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read(path)  # another process made it a moment ago
    except OSError as exc:
        raise StoreError(f"cannot create the server key {path}: {exc.strerror}") from None
    try:
        os.write(fd, private_key_pem(key))
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise StoreError(f"cannot write the server key {path}: {exc.strerror}") from None
    os.close(fd)
    dir_fd = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return key


def public_key_text(state_dir: Path) -> str:
    """``ed25519:<base64>`` of this server's key (made if there is none)."""
    return format_public_key(load_or_create(state_dir).public_key())


def _read(path: Path) -> Ed25519PrivateKey:
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise StoreError(f"cannot read the server key {path}: {exc.strerror}") from None
    try:
        return load_private_key(pem)
    except (ValueError, TypeError):
        raise StoreError(
            f"the server key {path} is damaged: restore it from a backup (entitlements"
            " issued for it name it; a new key needs a new activation)"
        ) from None
